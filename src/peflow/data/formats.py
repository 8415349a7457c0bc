"""Readers for every dataset the pipeline consumes, built on webdataset + PyAV:

- image-text WebDataset shards: the built-in corpus and LAION-style shards
  (`jpg`/`jpeg`/`png`/`webp` + `txt`, optional `json`);
- video shards in the PE Video Dataset layout (`mp4` + `json` with
  `video_id`, `human_caption`, `model_caption`, `category`), the built-in
  corpus adding `masks.npy`.

Pointing a stage at real data is a change of path: `shard_paths` accepts the
built-in corpus root, a folder of tars, a glob, a brace pattern
("data/{000000..000099}.tar") or a list of shard URLs.

Corpus layouts
--------------
`find_corpus(root)` ({kind: {split: [shard, ...]}}) and `find_shards(root,
kind)` ({split: [shard, ...]}) are the one place a corpus folder's layout is
resolved; every stage reads a folder through them. Only `*.tar` files are
shards: anything else (img2dataset's `00000.parquet`, `00000_stats.json`, a
README) is ignored. The first rule that applies wins:

1. a manifest, `root/splits.json`: {split: pattern or [patterns]}, each
   pattern a shard path or glob relative to `root` (`*`, `?`, `[...]`,
   `**`, and braces `{000..009}`), e.g.
   `{"train": ["part-0*.tar", "extra/*.tar"], "val": "part-1000.tar"}`.
   Every pattern must match a tar; a shard may be in one split only.
2. the canonical layout (what `peflow synth` and `peflow validate` write):
   `root/image/<split>/*.tar` and `root/video/<split>/*.tar`; the folder
   names the kind.
3. split folders directly under the root, `root/<split>/*.tar` (the PE Video
   Dataset's hub layout: `train/`, `test/`); the folder names the split.
4. flat: `root/*.tar` (img2dataset writes `00000.tar`, `00001.tar`, ...).
   A shard whose name has a split word as a `-`/`_`/`.`-separated token
   (`train`, `val`, `validation`, `test`: `train-0000.tar`,
   `laion-val-0003.tar`, `test_00.tar`) is in that split; when no shard name
   has one, every shard is in split `train`. Names marking a split for some
   shards but not for others are refused (rename them or write splits.json).

Outside the canonical layout the kind of a shard is read from the extensions
of its first members (IMAGE_EXTS: image, VIDEO_EXTS: video); a shard that
tells nothing there (empty, cut off) takes the kind of the other shards of
its split, or of the folder. Each split's shards are sorted by path.
Split names are kept as found (`validation` stays `validation`).

A folder with no shards raises `FileNotFoundError`, one that is ambiguous or
has a bad manifest `LayoutError`; both name the folder and the layouts
accepted.

A sample that cannot be decoded raises `CorruptSampleError` naming its shard
and key (`on_error="skip"` warns and goes on instead).
"""

from __future__ import annotations

import glob
import io
import json
import logging
import os
import re
import tarfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
VIDEO_EXTS = ("mp4", "webm", "mkv", "mov", "avi")
KINDS = ("image", "video")
Shards = str | os.PathLike | Sequence[str | os.PathLike]
SPLITS_MANIFEST = "splits.json"
#: split names recognised in flat shard names (as `-`/`_`/`.`-separated tokens)
SPLIT_WORDS = ("train", "val", "validation", "test")
#: how many members of a shard `shard_kind` looks at
PEEK_MEMBERS = 64
LAYOUTS = ("splits.json (split -> shard globs), image/<split>/*.tar or video/<split>/*.tar, "
           "<split>/*.tar (e.g. train/, test/), or *.tar directly in the folder (split from names like "
           "train-0000.tar / val-0000.tar, else all 'train')")


class CorruptSampleError(ValueError):
    """A sample (or shard) that cannot be read; the message names the shard and key."""


class LayoutError(ValueError):
    """A corpus folder whose layout is ambiguous or whose splits.json is invalid."""


def shard_kind(path: str | os.PathLike) -> str | None:
    """'image' or 'video' from the extension of a local tar's first media member (the
    webdataset extension: what follows the first dot of the member's base name), or None
    when its first PEEK_MEMBERS members name no media or it cannot be read that far."""
    try:
        with tarfile.open(path, "r:") as tar:
            for i, member in enumerate(tar):
                if i >= PEEK_MEMBERS:
                    break
                if not member.isfile():
                    continue
                ext = os.path.basename(member.name).partition(".")[2].lower()
                if ext in IMAGE_EXTS:
                    return "image"
                if ext in VIDEO_EXTS:
                    return "video"
    except (tarfile.TarError, OSError, EOFError):
        pass
    return None


def split_words(name: str) -> list[str]:
    """The SPLIT_WORDS a shard file name holds as `-`/`_`/`.`-separated tokens
    ('laion-val-0003.tar' -> ['val']; '00000.tar' -> [])."""
    tokens = set(re.split(r"[-_.]", name.lower().removesuffix(".tar")))
    return [w for w in SPLIT_WORDS if w in tokens]


def _tars(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*.tar") if p.is_file() and not p.name.startswith("."))


def _split_folders(root: Path) -> dict[str, list[Path]]:
    return {d.name: t for d in sorted(root.iterdir())
            if d.is_dir() and not d.name.startswith(".") and (t := _tars(d))}


_SPLIT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def _manifest(root: Path) -> dict[str, list[Path]]:
    """root/splits.json -> {split: shards}, every pattern checked."""
    import braceexpand

    path = root / SPLITS_MANIFEST
    form = '{"train": ["train-*.tar"], "val": "val-0000.tar"} (split -> shard path or glob, or a list of them)'
    try:
        spec = json.loads(path.read_text())
    except ValueError as e:
        raise LayoutError(f"{path}: not valid JSON ({e}); expected {form}") from None
    if not isinstance(spec, dict) or not spec:
        raise LayoutError(f"{path}: expected a non-empty object like {form}")
    owner: dict[Path, str] = {}
    out: dict[str, list[Path]] = {}
    for split, patterns in spec.items():
        if not _SPLIT_NAME.fullmatch(split):
            raise LayoutError(f"{path}: split name {split!r} is not a plain name (letters, digits, '_', '.', '-')")
        patterns = [patterns] if isinstance(patterns, str) else patterns
        if not isinstance(patterns, list) or not patterns or not all(isinstance(q, str) for q in patterns):
            raise LayoutError(f"{path}: split {split!r}: expected a pattern or a list of patterns, got {patterns!r}")
        found: set[Path] = set()
        for pattern in patterns:
            if os.path.isabs(pattern) or ".." in Path(pattern).parts:
                raise LayoutError(f"{path}: split {split!r}: {pattern!r} must be relative to {root} and stay in it")
            matched = {root / m for q in braceexpand.braceexpand(pattern)
                       for m in glob.glob(q, root_dir=root, recursive=True)}
            matched = {m for m in matched if m.suffix == ".tar" and m.is_file()}
            if not matched:
                raise LayoutError(f"{path}: split {split!r}: {pattern!r} matches no .tar file under {root}")
            found |= matched
        for shard in sorted(found):
            if owner.setdefault(shard, split) != split:
                raise LayoutError(f"{path}: {shard.relative_to(root)} is in split {owner[shard]!r} and in "
                                  f"{split!r}; a shard belongs to one split")
        out[split] = sorted(found)
    return out


def _flat(root: Path, tars: list[Path]) -> dict[str, list[Path]]:
    """Shards directly in `root`: split from the names, else all 'train'."""
    words = {p: split_words(p.name) for p in tars}
    if two := [p.name for p, w in words.items() if len(w) > 1]:
        raise LayoutError(f"{root}: shard names {two[:3]} name more than one split; rename them or list "
                          f"the splits in {root / SPLITS_MANIFEST}")
    marked = {p: w[0] for p, w in words.items() if w}
    if not marked:
        return {"train": tars}
    if unmarked := [p.name for p in tars if p not in marked]:
        example = next(iter(marked))
        raise LayoutError(f"{root}: some shard names name a split ({example.name}: {marked[example]!r}) and "
                          f"some do not ({', '.join(unmarked[:3])}{', ...' if len(unmarked) > 3 else ''}); "
                          f"rename them or list the splits in {root / SPLITS_MANIFEST}")
    out: dict[str, list[Path]] = {}
    for p in tars:
        out.setdefault(marked[p], []).append(p)
    return out


def _by_kind(splits: dict[str, list[Path]]) -> dict[str, dict[str, list[Path]]]:
    """{split: shards} -> {kind: {split: shards}}, each shard's kind peeked (`shard_kind`)."""
    peeked = {split: [shard_kind(p) for p in shards] for split, shards in splits.items()}
    everywhere = {k for ks in peeked.values() for k in ks if k}
    out: dict[str, dict[str, list[Path]]] = {}
    for split in sorted(splits):
        here = {k for k in peeked[split] if k}
        fallback = here if len(here) == 1 else everywhere if len(everywhere) == 1 else set()
        for shard, kind in zip(splits[split], peeked[split]):
            kind = kind or next(iter(fallback), None)
            if kind is None:
                raise LayoutError(f"{shard}: cannot tell whether it holds images or videos: none of its first "
                                  f"{PEEK_MEMBERS} members has an image {IMAGE_EXTS} or video {VIDEO_EXTS} "
                                  f"extension (and its split mixes kinds or has none)")
            out.setdefault(kind, {}).setdefault(split, []).append(shard)
    return {k: out[k] for k in KINDS if k in out}


def _resolve(root: Path) -> tuple[str, dict[str, dict[str, list[Path]]]]:
    """(layout name, {kind: {split: shards}}) of a corpus folder (rules in the module docstring)."""
    if not root.is_dir():
        raise FileNotFoundError(f"no corpus folder at {root} (accepted layouts: {LAYOUTS})")
    if (root / SPLITS_MANIFEST).is_file():
        return "manifest", _by_kind(_manifest(root))
    canonical = {k: s for k in KINDS if (root / k).is_dir() and (s := _split_folders(root / k))}
    if canonical:
        return "canonical", canonical
    folders, flat = _split_folders(root), _tars(root)
    if folders and flat:
        raise LayoutError(f"{root}: shards both directly in it ({flat[0].name}, ...) and in folders "
                          f"{', '.join(f'{n}/' for n in folders)}; move them into split folders or list the "
                          f"splits in {root / SPLITS_MANIFEST}")
    if folders:
        return "split_folders", _by_kind(folders)
    if flat:
        return "flat", _by_kind(_flat(root, flat))
    raise FileNotFoundError(f"no shards under {root} (accepted layouts: {LAYOUTS})")


def corpus_layout(root: str | os.PathLike) -> str:
    """Which rule `find_corpus` applies to `root`: 'manifest', 'canonical', 'split_folders' or 'flat'."""
    return _resolve(Path(root))[0]


def find_corpus(root: str | os.PathLike, kinds: Sequence[str] = KINDS) -> dict[str, dict[str, list[str]]]:
    """{kind: {split: sorted shard paths}} of the `kinds` found in a corpus folder, in KINDS and
    split-name order; paths are `root` joined with the shard's path inside it.

    Raises FileNotFoundError when the folder holds no shard of `kinds`, LayoutError when its
    layout is ambiguous (see the module docstring)."""
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise ValueError(f"unknown kinds {bad}; choose from {KINDS}")
    found = _resolve(Path(root))[1]
    out = {k: {split: [str(p) for p in shards] for split, shards in found[k].items()} for k in kinds if k in found}
    if not out:
        held = "; ".join(f"{k}: {', '.join(s)}" for k, s in found.items())
        raise FileNotFoundError(f"no {' or '.join(kinds)} shards under {root} (it holds {held or 'none'}; "
                                f"accepted layouts: {LAYOUTS})")
    return out


def find_shards(root: str | os.PathLike, kind: str = "image") -> dict[str, list[str]]:
    """{split: sorted shard paths} of one kind in a corpus folder (any layout in the module
    docstring); FileNotFoundError when it has none of that kind."""
    return find_corpus(root, (kind,))[kind]


def shard_paths(root: Shards, split: str | None = None, *, kind: str = "image") -> list[str]:
    """The sorted tar shards of one split.

    `root` may be a corpus folder in any layout `find_shards` resolves (with
    `split`), a folder holding `*.tar` directly (with `split=None`: all of
    them); a single tar; a glob; a brace pattern; a URL; or a list of any of
    these (kept in the given order)."""
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
    if split is None:
        if not path.is_dir():
            raise FileNotFoundError(f"no shard or folder at {text!r}")
        return [str(p) for p in _tars(path)]
    splits = find_shards(path, kind)
    if split not in splits:
        raise FileNotFoundError(f"no {kind} split {split!r} under {text!r} (its {kind} splits: "
                                f"{', '.join(splits)}; layout: {corpus_layout(path)})")
    return splits[split]


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
