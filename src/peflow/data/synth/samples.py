"""One corpus sample, end to end: seeded generator -> scene -> pixels ->
caption/QA/json -> encoded entries ready for a shard.

Each sample draws from its own `numpy.random.Generator` seeded by
(seed, split, index), so samples are independent of generation order and of
the number of worker processes.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np

from peflow.data.synth import captions, qa, vocab, vtext
from peflow.data.synth.presets import CorpusPreset
from peflow.data.synth.render import object_bbox, render_visible
from peflow.data.synth.scenes import sample_image_scene
from peflow.data.synth.video import encode_mp4, sample_video
from peflow.data.synth.writers import json_bytes

_IMAGE_STREAM, _VIDEO_STREAM = 1, 2


def sample_rng(seed: int, kind: int, split: str, index: int) -> np.random.Generator:
    splits = vocab.IMAGE_SPLITS if kind == _IMAGE_STREAM else vocab.VIDEO_SPLITS
    return np.random.default_rng([seed, kind, splits.index(split), index])


def sample_key(split: str, index: int) -> str:
    return f"{split}-{index:07d}"


def _png(arr: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def _jpg(arr: np.ndarray, quality: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr, mode="RGB").save(buf, format="JPEG", quality=quality, subsampling=0)
    return buf.getvalue()


def image_sample(seed: int, split: str, index: int, p: CorpusPreset) -> tuple[str, dict[str, bytes]]:
    """(key, entries) of one image-text sample."""
    rng = sample_rng(seed, _IMAGE_STREAM, split, index)
    shift = split.removeprefix("shift_") if split.startswith("shift_") else None
    # balanced labels: the primary's category cycles with the index
    category = vocab.CATEGORIES[index % len(vocab.CATEGORIES)]
    scene = sample_image_scene(rng, shift, p.image_size, p.min_pixels, category)
    scene, rgb, mask, depth, vis = render_visible(scene, min_pixels=p.min_pixels)
    key = sample_key(split, index)
    objects = [{"category": o.category, "colour": o.colour, "size": o.size, "texture": o.texture,
                "bbox": object_bbox(mask, i + 1), "position": o.position(p.image_size),
                "depth": round(o.depth, 3), "angle": round(o.angle, 1), "visible_pixels": vis[i]}
               for i, o in enumerate(scene.objects)]
    meta: dict[str, Any] = {
        "key": key, "split": split, "label": scene.objects[0].category,
        "label_id": vocab.CATEGORIES.index(scene.objects[0].category), "objects": objects,
        "background": scene.background, "shift": shift, "width": p.image_size, "height": p.image_size,
        "qa": qa.image_qa(rng, scene),
    }
    caption = captions.image_caption(rng, scene)
    return key, {"jpg": _jpg(rgb, p.jpeg_quality), "txt": caption.encode(), "json": json_bytes(meta),
                 "mask.png": _png(mask), "depth.png": _png(depth)}


def has_human_caption(index: int, fraction: float) -> bool:
    """A low-discrepancy pick: close to `fraction` of any run of indices."""
    return ((index + 0.5) * 0.6180339887498949) % 1.0 < fraction


def video_sample(seed: int, split: str, index: int, p: CorpusPreset) -> tuple[str, dict[str, bytes]]:
    """(key, entries) of one video sample in PE Video Dataset layout."""
    rng = sample_rng(seed, _VIDEO_STREAM, split, index)
    action = vocab.ACTIONS[index % len(vocab.ACTIONS)]
    record, frames, masks = sample_video(rng, action, p.image_size, p.num_frames, p.min_pixels)
    key = sample_key(split, index)
    record.update(video_id=key, split=split, fps=p.fps, model_caption=None)
    record["title"] = vtext.title(rng, record)
    record["description"] = vtext.description(rng, record)
    hc = vtext.human_caption(record, rng)
    # Train videos carry a human caption at the preset's fraction (what the captioner's second phase learns
    # from); held-out videos always do, as the PVD benchmark's test split (caption and retrieval scoring).
    keep = split != "train" or has_human_caption(index, p.human_caption_fraction)
    record["human_caption"] = hc if keep else None
    record["qa"] = qa.video_qa(rng, record)
    buf = io.BytesIO()
    np.save(buf, masks, allow_pickle=False)
    return key, {"mp4": encode_mp4(frames, p.fps), "json": json_bytes(record), "masks.npy": buf.getvalue()}


def make_chunk(job: tuple[str, int, str, int, int, CorpusPreset]) -> list[tuple[str, dict[str, bytes]]]:
    """Worker entry: samples [start, stop) of one split ("image" or "video" kind)."""
    kind, seed, split, start, stop, p = job
    make = image_sample if kind == "image" else video_sample
    return [make(seed, split, i, p) for i in range(start, stop)]
