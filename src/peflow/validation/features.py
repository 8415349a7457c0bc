"""Per-sample features: one row per sample of every shard, for the GX suites.

Reading never raises on bad data: a sample that does not decode becomes a row
with `decodes=False` and the error text, a shard that cannot be read to the
end adds one row with `readable=False` after the samples read before the
error. Text is stored with invalid UTF-8 replaced by U+FFFD (the flag
`caption_utf8_valid` says it was invalid), so every row is JSON-safe.

Columns (None where a feature does not apply or could not be measured):
  kind, split, shard, position, key       where the sample lives
  readable                                the shard read on (False: error row)
  decodes, decode_error                   the image or video decodes
  width, height, num_frames, fps, duration  measured from the decoded media
  meta_valid, id_matches_key              json entry parses; its key/video_id is the tar key
  meta_num_frames                         the frame count the json claims (video)
  caption, has_caption, caption_length, caption_source, caption_utf8_valid
  label, label_id, label_set_id, has_label, label_in_label_set
  aux_ok, aux_error                       masks/depth decode and match the media size
  title, model_caption, has_model_caption, model_caption_length, model_caption_utf8_valid,
  model_caption_equals_title                (video: the generated caption, for the captions suite)
  key_repeat                              earlier rows of the same kind with the same key
"""

from __future__ import annotations

import io
import json
import os
import re
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from peflow.validation.shards import KINDS, find_shards, iter_raw

COLUMNS = (
    "kind", "split", "shard", "position", "key", "readable", "decodes", "decode_error", "width", "height",
    "num_frames", "fps", "duration", "meta_valid", "id_matches_key", "meta_num_frames", "caption", "has_caption",
    "caption_length", "caption_source", "caption_utf8_valid", "label", "label_id", "label_set_id", "has_label",
    "label_in_label_set", "aux_ok", "aux_error", "title", "model_caption", "has_model_caption",
    "model_caption_length", "model_caption_utf8_valid", "model_caption_equals_title", "model_caption_words",
    "model_caption_max_repeat", "model_caption_echoes_prompt", "key_repeat",
)

#: Text of the engine's summarization prompt (peflow.engine.summarize.PROMPT) and its field labels:
#: a generated caption holding one of these echoed the prompt instead of answering it.
PROMPT_ECHOES = ("create a concise caption", "frame captions:", "video caption:", "description:", "title:",
                 "alt text format", "prioritize key information")


def _error(e: Exception) -> str:
    """'Type: message' without memory addresses, so reports are reproducible."""
    return re.sub(r" at 0x[0-9a-fA-F]+", "", f"{type(e).__name__}: {e}")


def clean_text(value: Any) -> tuple[str | None, bool]:
    """(text with invalid UTF-8 replaced, whether it was valid); bytes or str in, None stays None."""
    if value is None:
        return None, True
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8"), True
        except UnicodeDecodeError:
            return value.decode("utf-8", "replace"), False
    text = str(value)
    try:
        text.encode("utf-8")
        return text, True
    except UnicodeEncodeError:  # lone surrogates: bytes that were not UTF-8, or bad \u escapes
        return text.encode("utf-8", "surrogateescape" if _escaped_only(text) else "replace").decode(
            "utf-8", "replace"), False


def _escaped_only(text: str) -> bool:
    return all(not 0xD800 <= ord(c) <= 0xDFFF or 0xDC80 <= ord(c) <= 0xDCFF for c in text)


def _meta(raw: dict[str, Any]) -> tuple[dict[str, Any] | None, bool | None]:
    """(json object, valid): json read with surrogateescape so bad UTF-8 in one string stays local."""
    data = raw.get("json")
    if data is None:
        return None, None
    try:
        meta = json.loads(data.decode("utf-8", "surrogateescape"))
    except ValueError:
        return None, False
    return (meta, True) if isinstance(meta, dict) else (None, False)


def _caption(value: Any) -> tuple[str | None, bool]:
    text, ok = clean_text(value)
    text = text.strip() if text is not None else None
    return (text or None), ok


def _label(row: dict[str, Any], label: Any, label_id: Any, label_set: Sequence[str] | None) -> None:
    row["label"] = str(label) if label is not None else None
    row["label_id"] = label_id if isinstance(label_id, int) and not isinstance(label_id, bool) else None
    row["has_label"] = label is not None
    if label_set is None:
        row["label_set_id"] = row["label_in_label_set"] = None
    else:
        row["label_in_label_set"] = row["label"] in label_set
        row["label_set_id"] = list(label_set).index(row["label"]) if row["label_in_label_set"] else None


def _png_size(data: bytes) -> tuple[int, int]:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im.load()
        return im.width, im.height


def image_row(raw: dict[str, Any], label_set: Sequence[str] | None) -> dict[str, Any]:
    """Features of one raw image-text sample."""
    from peflow.data.formats import IMAGE_EXTS, decode_image_text

    row: dict[str, Any] = {"decodes": False, "decode_error": None, "width": None, "height": None}
    ext = next((e for e in IMAGE_EXTS if e in raw), None)
    try:
        if ext is None:
            raise ValueError(f"no image entry (looked for {IMAGE_EXTS})")
        image = decode_image_text({"__key__": raw["__key__"], ext: raw[ext]})["image"]
        row.update(decodes=True, width=image.width, height=image.height)
    except Exception as e:
        row["decode_error"] = _error(e)
    meta, row["meta_valid"] = _meta(raw)
    meta = meta or {}
    row["id_matches_key"] = None if "key" not in meta else str(meta["key"]) == raw["__key__"]
    text = raw["txt"] if "txt" in raw else meta.get("caption")
    row["caption"], row["caption_utf8_valid"] = _caption(text)
    row["has_caption"] = row["caption"] is not None
    row["caption_source"] = "txt" if "txt" in raw else ("json" if "caption" in meta else None)
    _label(row, meta.get("label"), meta.get("label_id"), label_set)
    dense = [e for e in ("mask.png", "depth.png") if e in raw]
    row["aux_ok"], row["aux_error"] = (None, None) if not dense else (True, None)
    for e in dense:
        try:
            size = _png_size(raw[e])
            if row["decodes"] and size != (row["width"], row["height"]):
                raise ValueError(f"size {size} != image size {(row['width'], row['height'])}")
        except Exception as exn:
            row["aux_ok"], row["aux_error"] = False, f"{e}: {_error(exn)}"
            break
    return row


def probe_video(data: bytes) -> tuple[int, int, int, float | None]:
    """(frames, height, width, fps) after decoding every frame of the first video stream.

    Like `peflow.data.formats.decode_video` it decodes the whole bitstream (so
    a corrupt or truncated file fails here), but skips the RGB conversion,
    which is most of the cost and cannot fail on a decoded frame."""
    import av

    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        rate = stream.average_rate
        n, size = 0, None
        for frame in container.decode(stream):
            n, size = n + 1, (frame.height, frame.width)
    if size is None:
        raise ValueError("no decodable video frames")
    return n, size[0], size[1], float(rate) if rate else None


def max_ngram_repeat(text: str, n: int = 3) -> int:
    """How many times the most frequent word n-gram occurs back to back at its longest run (1 for no
    repeat): a generation loop ("the red circle the red circle the red circle") scores its loop count."""
    words = text.casefold().split()
    best = 1 if words else 0
    for size in range(1, n + 1):
        for start in range(size):
            run, prev = 1, None
            for i in range(start, len(words) - size + 1, size):
                gram = tuple(words[i:i + size])
                run = run + 1 if gram == prev else 1
                prev = gram
                best = max(best, run if size > 1 or run > 2 else 1)
    return best


def video_row(raw: dict[str, Any], label_set: Sequence[str] | None) -> dict[str, Any]:
    """Features of one raw video sample (PE Video Dataset layout)."""
    import numpy as np

    from peflow.data.formats import VIDEO_EXTS

    row: dict[str, Any] = {"decodes": False, "decode_error": None, "width": None, "height": None,
                           "num_frames": None, "fps": None, "duration": None}
    meta, row["meta_valid"] = _meta(raw)
    meta = meta or {}
    ext = next((e for e in VIDEO_EXTS if e in raw), None)
    shape = None
    try:
        if ext is None:
            raise ValueError(f"no video entry (looked for {VIDEO_EXTS})")
        *shape, stream_fps = probe_video(raw[ext])
        fps = stream_fps or (meta.get("fps") if isinstance(meta.get("fps"), (int, float)) else None)
        row.update(decodes=True, num_frames=shape[0], height=shape[1], width=shape[2], fps=fps,
                   duration=round(shape[0] / fps, 4) if fps else None)
    except Exception as e:
        row["decode_error"] = _error(e)
    row["id_matches_key"] = None if "video_id" not in meta else str(meta["video_id"]) == raw["__key__"]
    n = meta.get("num_frames")
    row["meta_num_frames"] = n if isinstance(n, int) and not isinstance(n, bool) else None
    texts = {f: _caption(meta.get(f)) for f in ("human_caption", "model_caption", "description", "title")}
    source = next((f for f in ("human_caption", "model_caption", "description", "title") if texts[f][0]), None)
    row["caption"] = texts[source][0] if source else None
    row["caption_source"] = source
    row["has_caption"] = source is not None
    row["caption_utf8_valid"] = all(ok for _, ok in texts.values())
    row["title"] = texts["title"][0]
    row["model_caption"], row["model_caption_utf8_valid"] = texts["model_caption"]
    row["has_model_caption"] = row["model_caption"] is not None
    mc, title = row["model_caption"], row["title"]
    row["model_caption_equals_title"] = None if mc is None or title is None else mc.casefold() == title.casefold()
    row["model_caption_words"] = None if mc is None else len(mc.split())
    row["model_caption_max_repeat"] = None if mc is None else max_ngram_repeat(mc)
    row["model_caption_echoes_prompt"] = None if mc is None else any(e in mc.casefold() for e in PROMPT_ECHOES)
    _label(row, meta.get("category"), meta.get("label_id"), label_set)
    row["aux_ok"] = row["aux_error"] = None
    if "masks.npy" in raw:
        try:
            masks = np.load(io.BytesIO(raw["masks.npy"]), allow_pickle=False)
            if shape is not None and masks.shape != tuple(shape):
                raise ValueError(f"shape {masks.shape} != frames {shape}")
            row["aux_ok"] = True
        except Exception as e:
            row["aux_ok"], row["aux_error"] = False, f"masks.npy: {_error(e)}"
    return row


def shard_rows(job: tuple[Path, str, str, str, Sequence[str] | None]) -> list[dict[str, Any]]:
    """Rows of one shard (a worker entry): (root, kind, split, relative path, label set)."""
    root, kind, split, rel, label_set = job
    make = image_row if kind == "image" else video_row
    rows = []
    for position, (raw, error) in enumerate(iter_raw(str(root / rel))):
        where = {"kind": kind, "split": split, "shard": rel, "position": position}
        if raw is None:
            if rows:  # the sample read last may have lost entries to the cut: not trusted either
                rows[-1]["readable"] = False
            rows.append({**where, "key": None, "readable": False, "decode_error": error})
            continue
        rows.append({**where, "key": raw["__key__"], "readable": True, **make(raw, label_set)})
    return rows


def extract(root: str | os.PathLike, label_sets: dict[str, Sequence[str] | None], *,
            kinds: Sequence[str] = KINDS, workers: int = 1) -> Any:
    """The feature DataFrame of every sample of `kinds` under `root`, a corpus folder in any layout
    `peflow.data.formats.find_corpus` resolves (see the module docstring for the columns)."""
    import pandas as pd

    root = Path(root)
    jobs = [(root, kind, split, rel, label_sets.get(kind)) for kind, split, rel in find_shards(root, kinds)]
    if workers > 1 and len(jobs) > 1:
        import multiprocessing as mp

        with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
            parts = list(pool.map(shard_rows, jobs))
    else:
        parts = [shard_rows(job) for job in jobs]
    # every column always present (a kind whose shards are all unreadable still has them), as objects
    # so None stays None (not NaN) and booleans stay booleans in the report and the Data Docs
    df = pd.DataFrame([r for part in parts for r in part], columns=list(COLUMNS), dtype=object)
    for col in ("caption", "model_caption"):
        df[f"{col}_length"] = df[col].map(lambda s: len(s) if isinstance(s, str) else None).astype(object)
    has_key = df["key"].notna()
    df.loc[has_key, "key_repeat"] = df[has_key].groupby(["kind", "key"]).cumcount().astype(object)
    return df.reset_index(drop=True)
