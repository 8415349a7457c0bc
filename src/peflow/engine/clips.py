"""Clips and images for the captioner: reading them from a corpus, their frozen vision tokens,
and captioning them in batches.

A clip is `frames` uniformly sampled frames of a video (`peflow.data.formats.frame_indices`,
decoding stops at the last sampled frame); an image is a clip of one frame.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

#: The base (phase 1) captioner's folder inside a train-captioner output: the engine's frame captioner.
BASE = "base"


def web_text(meta: dict[str, Any]) -> str:
    """A video's title and description, as one text (what a video has without the engine)."""
    return " ".join(t.strip() for t in (meta.get("title") or "", meta.get("description") or "") if t.strip())


@dataclass
class Clip:
    """One video's (or image's) sampled frames and its json record."""

    key: str
    frames: np.ndarray  # uint8 [F, H, W, 3]
    meta: dict[str, Any] = field(default_factory=dict)
    caption: str = ""  # an image's caption (images only)


def read_clips(root: str | Path, split: str, *, frames: int, limit: int | None = None) -> list[Clip]:
    """The first `limit` videos (all when None) of a corpus split, `frames` frames each."""
    from peflow.data.formats import iter_video, shard_paths

    out = []
    for v in iter_video(shard_paths(root, split, kind="video"), num_frames=frames):
        if limit is not None and len(out) >= limit:
            break
        out.append(Clip(v["key"], v["frames"], v["meta"]))
    return out


def read_images(root: str | Path, split: str, *, limit: int) -> list[Clip]:
    """The first `limit` images of a corpus split, as one-frame clips with their captions."""
    from peflow.data.formats import iter_image_text, shard_paths

    out = []
    for s in iter_image_text(shard_paths(root, split, kind="image")):
        if len(out) >= limit:
            break
        out.append(Clip(s["key"], np.asarray(s["image"], dtype=np.uint8)[None], s["meta"], s["caption"]))
    return out


@torch.no_grad()
def vision_bank(model: Any, groups: Sequence[Sequence[Clip]], *, batch_size: int = 256,
                dtype: torch.dtype = torch.float16) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The frozen tower's tokens of every frame of every clip, stored once: (bank [M, P, D],
    per group the frame rows [N, F] of its clips, -1 padding to the group's widest clip)."""
    from peflow.models.vlm import frames_tensor

    flat = [f for g in groups for c in g for f in c.frames]
    parts = []
    for i in range(0, len(flat), batch_size):
        x = frames_tensor(np.stack(flat[i:i + batch_size]), model.image_size)
        parts.append(model.vision_tokens(x[:, None])[:, 0].to(dtype))
    bank = torch.cat(parts) if parts else torch.zeros(0)
    ids, row = [], 0
    for g in groups:
        width = max((len(c.frames) for c in g), default=1)
        t = torch.full((len(g), width), -1, dtype=torch.long)
        for n, c in enumerate(g):
            t[n, :len(c.frames)] = torch.arange(row, row + len(c.frames))
            row += len(c.frames)
        ids.append(t)
    return bank, ids


@torch.no_grad()
def caption_clips(model: Any, clips: Sequence[np.ndarray], *, batch_size: int = 64, max_new_tokens: int = 72,
                  on_batch: Callable[[int], None] | None = None) -> list[str]:
    """Greedy captions of clips (uint8 [F, H, W, 3] each; one call's clips share F)."""
    from peflow.models.vlm import frames_tensor

    out: list[str] = []
    for i in range(0, len(clips), batch_size):
        chunk = np.stack(clips[i:i + batch_size])
        out += model.generate(frames=frames_tensor(chunk, model.image_size), max_new_tokens=max_new_tokens)
        if on_batch:
            on_batch(len(chunk))
    return out
