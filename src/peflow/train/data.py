"""The pretraining loader over image-text WebDataset shards.

Random access: `ShardIndex` reads the tar headers once and keeps (shard,
offset, size) of every sample's image and caption, so a batch is a set of
seeks. Shards may be local files or `s3://` objects (read with ranged GETs
through `peflow.remote.open_binary`: streamed, never downloaded whole). That
makes the order a pure function of (seed, epoch, step):

- epoch e visits the samples in `permutation(default_rng([seed, e]))`, in
  global batches of `global_batch` (the last partial batch is dropped);
- rank r of W takes rows [r * G/W, (r+1) * G/W) of each global batch, so the
  global batch, and every sample's augmentation (seeded by
  (seed, step, row)), are the same for any number of processes;
- resuming at step s needs nothing but s.

Shape legend: B batch, C channels, H/W pixels, T context length.
"""

from __future__ import annotations

import math
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image

from peflow import remote
from peflow.data.formats import IMAGE_EXTS, decode_image_text, shard_paths
from peflow.train.recipe import PE_MEAN, PE_STD, Recipe, hflip_caption


@dataclass(frozen=True)
class _Entry:
    shard: int
    key: str
    spans: tuple[tuple[str, int, int], ...]  # (extension, offset, size) in the tar


class ShardIndex:
    """Every (image, caption) sample of a list of tar shards, addressable by position."""

    def __init__(self, shards: Sequence[str | Path]) -> None:
        self.shards = [s if remote.is_remote(s) else Path(s) for s in shards]
        if not self.shards:
            raise ValueError("no image-text shards given")
        self.entries: list[_Entry] = []
        for si, path in enumerate(self.shards):
            members: dict[str, dict[str, tuple[int, int]]] = {}
            with _open(path) as f, tarfile.open(fileobj=f, mode="r:") as tar:
                for m in tar:
                    if not m.isfile():
                        continue
                    key, _, ext = m.name.partition(".")
                    members.setdefault(key, {})[ext.lower()] = (m.offset_data, m.size)
            for key in sorted(members):
                ent = members[key]
                img = next((e for e in IMAGE_EXTS if e in ent), None)
                if img is not None and "txt" in ent:
                    self.entries.append(_Entry(si, key, tuple((e, *ent[e]) for e in (img, "txt"))))
        if not self.entries:
            raise ValueError(f"no (image, caption) samples in {len(self.shards)} shard(s), e.g. {self.shards[0]}")
        self._files: dict[int, BinaryIO] = {}

    def __len__(self) -> int:
        return len(self.entries)

    @classmethod
    def from_corpus(cls, root: str | Path, split: str = "train") -> ShardIndex:
        """The index of one split of a corpus: a folder in any layout `peflow.data.formats.find_shards`
        resolves (canonical, split folders, a flat folder of shards, splits.json), or anything else
        `peflow.data.formats.shard_paths` accepts; or `s3://` shards: a brace pattern or glob of objects,
        or a folder in the canonical layout (`<root>/image/<split>/*.tar`)."""
        text = str(root)
        if remote.is_remote(text):
            if text.endswith(".tar") or any(c in text for c in "*?[{"):
                return cls(remote.expand(text))
            shards = remote.tar_shards(remote.join(text, "image", split))
            if not shards:
                raise FileNotFoundError(f"no image shards under {remote.join(text, 'image', split)}")
            return cls(shards)
        return cls(shard_paths(root, split, kind="image"))

    def _read(self, shard: int, offset: int, size: int) -> bytes:
        f = self._files.get(shard)
        if f is None:
            f = self._files[shard] = _open(self.shards[shard])  # kept open for seeks
        f.seek(offset)
        return f.read(size)

    def get(self, i: int) -> tuple[Image.Image, str]:
        """Sample i's (RGB image, caption), decoded by `peflow.data.formats.decode_image_text`."""
        e = self.entries[i]
        raw: dict[str, object] = {"__key__": e.key, "__url__": str(self.shards[e.shard])}
        raw.update({ext: self._read(e.shard, off, size) for ext, off, size in e.spans})
        sample = decode_image_text(raw)
        return sample["image"], sample["caption"]


def _open(shard: str | Path) -> BinaryIO:
    """A seekable binary file over a local shard or an `s3://` object."""
    return remote.open_binary(shard) if isinstance(shard, str) else open(shard, "rb")  # noqa: SIM115


def _crop_box(rng: np.random.Generator, w: int, h: int, scale: tuple[float, float],
              ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    """RandomResizedCrop's box (torchvision's algorithm: 10 tries, then a centre crop)."""
    area = w * h
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        ar = math.exp(rng.uniform(*log_r))
        cw, ch = round(math.sqrt(target * ar)), round(math.sqrt(target / ar))
        if 0 < cw <= w and 0 < ch <= h:
            x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            return x0, y0, x0 + cw, y0 + ch
    in_ratio = w / h
    if in_ratio < ratio[0]:
        cw, ch = w, round(w / ratio[0])
    elif in_ratio > ratio[1]:
        cw, ch = round(h * ratio[1]), h
    else:
        cw, ch = w, h
    x0, y0 = (w - cw) // 2, (h - ch) // 2
    return x0, y0, x0 + cw, y0 + ch


def augment(img: Image.Image, caption: str, res: int, recipe: Recipe, rng: np.random.Generator
            ) -> tuple[Image.Image, str]:
    """The PE augmentation on one sample: crop+resize, brightness/saturation jitter, hflip (caption follows)."""
    from PIL import ImageEnhance

    if not recipe.augment:
        return img.resize((res, res), Image.BILINEAR), caption
    box = _crop_box(rng, img.width, img.height, recipe.crop_scale, recipe.crop_ratio)
    img = img.resize((res, res), Image.BILINEAR, box=box)
    b = rng.uniform(1 - recipe.brightness, 1 + recipe.brightness)
    s = rng.uniform(1 - recipe.saturation, 1 + recipe.saturation)
    img = ImageEnhance.Brightness(img).enhance(b)
    img = ImageEnhance.Color(img).enhance(s)
    if rng.random() < recipe.hflip:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
        caption = hflip_caption(caption)
    return img, caption


def to_tensor(images: Sequence[Image.Image]) -> torch.Tensor:
    """[B, 3, H, W] float, normalised with PE's mean/std."""
    arr = np.stack([np.asarray(im, dtype=np.uint8) for im in images])
    x = torch.from_numpy(arr).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(PE_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(PE_STD).view(1, 3, 1, 1)
    return (x - mean) / std


class EpochOrder:
    """Which samples each rank reads at each step: epoch e visits `permutation(default_rng([seed, e]))`
    of the n samples in global batches (the last partial batch dropped); rank r of W takes rows
    [r * G/W, (r+1) * G/W) of each. A pure function of (seed, step): resuming needs only the step."""

    def __init__(self, n: int, *, global_batch: int, rank: int = 0, world_size: int = 1, seed: int = 0) -> None:
        if global_batch % world_size:
            raise ValueError(f"global_batch {global_batch} is not divisible by {world_size} processes")
        if global_batch > n:
            raise ValueError(f"global_batch {global_batch} is larger than the training set ({n} samples)")
        self.n, self.global_batch, self.rank, self.world_size, self.seed = n, global_batch, rank, world_size, seed
        self.local_batch = global_batch // world_size
        self.steps_per_epoch = n // global_batch
        self._perm: tuple[int, np.ndarray] | None = None

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n))
        return self._perm[1]

    def position(self, step: int) -> dict[str, int]:
        """Where step `step` reads: epoch and batch within the epoch (recorded in checkpoints)."""
        return {"epoch": step // self.steps_per_epoch, "batch": step % self.steps_per_epoch}

    def rows(self, step: int) -> list[tuple[int, int]]:
        """(sample index, row in the global batch) of this rank's rows at `step`."""
        pos = self.position(step)
        perm = self._permutation(pos["epoch"])
        start = pos["batch"] * self.global_batch + self.rank * self.local_batch
        return [(int(perm[row]), row % self.global_batch) for row in range(start, start + self.local_batch)]


class TrainLoader:
    """Deterministic, resumable, rank-sharded batches of (images, tokens)."""

    def __init__(self, index: ShardIndex, *, global_batch: int, rank: int, world_size: int, seed: int,
                 recipe: Recipe, tokenizer: object) -> None:
        self.order = EpochOrder(len(index), global_batch=global_batch, rank=rank, world_size=world_size, seed=seed)
        self.index, self.seed, self.recipe, self.tokenizer = index, seed, recipe, tokenizer
        self.steps_per_epoch = self.order.steps_per_epoch

    def position(self, step: int) -> dict[str, int]:
        """Where step `step` reads: epoch and batch within the epoch (recorded in checkpoints)."""
        return self.order.position(step)

    def batch(self, step: int, resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's share of global batch `step` at `resolution`: ([B, 3, R, R], [B, T] tokens)."""
        images, captions = [], []
        for i, row in self.order.rows(step):
            img, cap = self.index.get(i)
            rng = np.random.default_rng([self.seed, step, row, 7])
            img, cap = augment(img, cap, resolution, self.recipe, rng)
            images.append(img)
            captions.append(cap)
        return to_tensor(images), self.tokenizer(captions)
