"""Readers for every dataset the pipeline consumes, built on webdataset + PyAV:

- image-text WebDataset shards: the built-in corpus and LAION-style shards
  (`jpg`/`jpeg`/`png`/`webp` + `txt`, optional `json`);
- video shards in the PE Video Dataset layout (`mp4` + `json` with
  `video_id`, `human_caption`, `model_caption`, `category`), the built-in
  corpus adding `masks.npy`.

Pointing a stage at real data is a change of path: `shard_paths` accepts the
built-in corpus root, a folder of tars, a glob, a brace pattern
("data/{000000..000099}.tar") or a list of shard URLs.

A sample that cannot be decoded raises `CorruptSampleError` naming its shard
and key (`on_error="skip"` warns and goes on instead).
"""

from __future__ import annotations

import glob
import io
import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
VIDEO_EXTS = ("mp4", "webm", "mkv", "mov", "avi")
Shards = str | os.PathLike | Sequence[str | os.PathLike]


class CorruptSampleError(ValueError):
    """A sample (or shard) that cannot be read; the message names the shard and key."""


def shard_paths(root: Shards, split: str | None = None, *, kind: str = "image") -> list[str]:
    """The sorted tar shards of one split.

    `root` may be a built-in corpus root (`root/<kind>/<split>/*.tar`), a folder
    holding `<split>/*.tar` or, with `split=None`, `*.tar` directly; a single
    tar; a glob; a brace pattern; a URL; or a list of any of these (kept in
    the given order)."""
    if isinstance(root, Sequence) and not isinstance(root, str):
        return [p for r in root for p in shard_paths(r, split, kind=kind)]
    text = os.fspath(root)
    if "{" in text:
        import braceexpand

        return list(braceexpand.braceexpand(text))
    if "://" in text or text.startswith("pipe:"):
        return [text]
    if any(c in text for c in "*?["):
        found = sorted(glob.glob(text))
        if not found:
            raise FileNotFoundError(f"no shards match {text!r}")
        return found
    path = Path(text)
    if path.is_file():
        return [text]
    candidates = [path / kind / split, path / split] if split else [path]
    for folder in candidates:
        if folder.is_dir():
            return sorted(str(p) for p in folder.glob("*.tar"))
    raise FileNotFoundError(f"no shards for split {split!r} under {text!r} (looked in "
                            f"{', '.join(str(c) for c in candidates)})")


def _samples(shards: Shards, on_error: str) -> Iterator[dict[str, Any]]:
    """Raw webdataset samples ({"__key__", "__url__", ext: bytes}) in shard order."""
    import webdataset as wds

    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    urls = shard_paths(shards)

    def handler(exn: Exception) -> bool:
        where = next((a for a in reversed(exn.args) if isinstance(a, str) and a in urls), None)
        if on_error == "skip":
            log.warning("skipping unreadable data in %s: %s", where or "a shard", exn)
            return True
        raise CorruptSampleError(f"{where or 'shard'}: cannot read tar data: {exn.args[0] if exn.args else exn}"
                                 ) from exn

    pipeline = wds.DataPipeline(wds.SimpleShardList(urls), wds.split_by_worker,
                                wds.tarfile_to_samples(handler=handler))
    yield from pipeline


def _guarded(shards: Shards, on_error: str, decode: Callable[[dict[str, Any]], dict[str, Any]]
             ) -> Iterator[dict[str, Any]]:
    for raw in _samples(shards, on_error):
        try:
            yield decode(raw)
        except Exception as e:
            msg = f"{raw.get('__url__')}: sample {raw.get('__key__')!r}: {type(e).__name__}: {e}"
            if on_error == "skip":
                log.warning("skipping corrupt sample: %s", msg)
                continue
            raise CorruptSampleError(msg) from e


def _meta(raw: dict[str, Any]) -> dict[str, Any]:
    data = raw.get("json")
    if data is None:
        return {}
    meta = json.loads(data)
    if not isinstance(meta, dict):
        raise ValueError(f"json entry is a {type(meta).__name__}, expected an object")
    return meta


def _png_array(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return np.array(im)


def decode_image_text(raw: dict[str, Any], *, with_dense: bool = False) -> dict[str, Any]:
    """One raw webdataset sample -> {"key", "image" (PIL RGB), "caption", "meta"[, "mask", "depth"]}."""
    from PIL import Image

    ext = next((e for e in IMAGE_EXTS if e in raw), None)
    if ext is None:
        raise ValueError(f"no image entry (looked for {IMAGE_EXTS}; has {sorted(k for k in raw if k[:2] != '__')})")
    with Image.open(io.BytesIO(raw[ext])) as im:
        image = im.convert("RGB")
    meta = _meta(raw)
    caption = raw["txt"].decode("utf-8").strip() if "txt" in raw else str(meta.get("caption", "")).strip()
    out = {"key": raw["__key__"], "image": image, "caption": caption, "meta": meta}
    if with_dense:
        for name in ("mask", "depth"):
            if f"{name}.png" not in raw:
                raise ValueError(f"no {name}.png entry (dense targets exist only in the built-in corpus)")
            out[name] = _png_array(raw[f"{name}.png"])
        if out["mask"].shape != (image.height, image.width):
            raise ValueError(f"mask shape {out['mask'].shape} != image size {(image.height, image.width)}")
        out["mask"] = out["mask"].astype(np.uint8)
    return out


def iter_image_text(shards: Shards, *, with_dense: bool = False, on_error: str = "raise"
                    ) -> Iterator[dict[str, Any]]:
    """Image-text samples: {"key", "image" (PIL RGB), "caption", "meta" ({} without json)};
    `with_dense` adds "mask" (uint8 [H, W], 0 = background, i = meta["objects"][i-1])
    and "depth" ([H, W], larger = farther)."""
    yield from _guarded(shards, on_error, lambda raw: decode_image_text(raw, with_dense=with_dense))


def frame_indices(total: int, num_frames: int | None) -> list[int]:
    """Uniform frame indices int(i*(T-1)/(N-1)), first and last included; the middle for N=1."""
    if num_frames is None:
        return list(range(total))
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if num_frames == 1:
        return [(total - 1) // 2]
    return [int(i * (total - 1) / (num_frames - 1)) for i in range(num_frames)]


def _decode_all(data: bytes) -> list[Any]:
    import av

    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        return [f.to_ndarray(format="rgb24") for f in container.decode(stream)]


def decode_video(data: bytes, num_frames: int | None = None) -> np.ndarray:
    """Video bytes -> uint8 [T, H, W, 3] RGB frames (all, or `num_frames` uniformly sampled)."""
    import av

    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        total = stream.frames
        if num_frames is not None and total > 0:  # convert only the frames we keep
            wanted = frame_indices(total, num_frames)
            keep: dict[int, np.ndarray] = {}
            n = 0
            for n, frame in enumerate(container.decode(stream)):
                if n in wanted:
                    keep[n] = frame.to_ndarray(format="rgb24")
                if n >= wanted[-1]:
                    break
            if all(i in keep for i in wanted):
                return np.stack([keep[i] for i in wanted])
    frames = _decode_all(data)  # frame count unknown or wrong in the header
    if not frames:
        raise ValueError("no decodable video frames")
    return np.stack([frames[i] for i in frame_indices(len(frames), num_frames)])


def decode_video_sample(raw: dict[str, Any], *, num_frames: int | None = None, with_masks: bool = False
                        ) -> dict[str, Any]:
    """One raw webdataset sample -> the dict `iter_video` yields."""
    ext = next((e for e in VIDEO_EXTS if e in raw), None)
    if ext is None:
        raise ValueError(f"no video entry (looked for {VIDEO_EXTS}; has {sorted(k for k in raw if k[:2] != '__')})")
    meta = _meta(raw)
    if num_frames is not None and with_masks:
        frames_all = decode_video(raw[ext])
        idx = frame_indices(len(frames_all), num_frames)
        frames = frames_all[idx]
    else:
        frames = decode_video(raw[ext], num_frames)
        idx = None
    out = {"key": raw["__key__"], "video_id": str(meta.get("video_id", raw["__key__"])), "frames": frames,
           "meta": meta, "human_caption": meta.get("human_caption"), "model_caption": meta.get("model_caption"),
           "category": meta.get("category")}
    if with_masks:
        if "masks.npy" not in raw:
            raise ValueError("no masks.npy entry (per-frame masks exist only in the built-in corpus)")
        masks = np.load(io.BytesIO(raw["masks.npy"]), allow_pickle=False)
        if idx is not None:
            if len(masks) != len(frames_all):
                raise ValueError(f"{len(masks)} masks for {len(frames_all)} frames")
            masks = masks[idx]
        if masks.shape != frames.shape[:3]:
            raise ValueError(f"masks shape {masks.shape} != frames shape {frames.shape[:3]}")
        out["masks"] = masks.astype(np.uint8)
    return out


def iter_video(shards: Shards, *, num_frames: int | None = None, with_masks: bool = False,
               on_error: str = "raise") -> Iterator[dict[str, Any]]:
    """Video samples: {"key", "video_id", "frames" (uint8 [T,H,W,3]), "meta", "human_caption",
    "model_caption", "category"}; `with_masks` adds "masks" (uint8 [T,H,W])."""
    yield from _guarded(shards, on_error,
                        lambda raw: decode_video_sample(raw, num_frames=num_frames, with_masks=with_masks))


def load_card(root: str | os.PathLike) -> dict[str, Any]:
    """The built-in corpus's `card.json`."""
    path = Path(root) / "card.json"
    if not path.is_file():
        raise FileNotFoundError(f"no dataset card at {path} (is {root} a `peflow synth` output?)")
    return json.loads(path.read_text())


def label_names(root: str | os.PathLike, kind: str = "image") -> list[str]:
    """Class names in label_id order: shape categories (kind="image") or actions (kind="video")."""
    if kind not in ("image", "video"):
        raise ValueError(f"kind must be 'image' or 'video', got {kind!r}")
    card = load_card(root)
    return list(card["categories" if kind == "image" else "actions"])
