"""Embeddings for evaluation: image-text splits read from shards, encoded in
batches, without gradients, in eval mode.

Preprocessing is PE's evaluation default (research section 1.5): a "squash"
resize to the model's input size with bilinear interpolation, then
normalisation with mean = std = 0.5 per channel (what `peflow pretrain` uses).

Shape legend: N images, M texts, E embedding dim, S image side.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from peflow.data.formats import find_shards, iter_image_text, shard_paths

PE_MEAN = 0.5
PE_STD = 0.5


@dataclasses.dataclass
class SplitFeatures:
    """One split's image embeddings (unnormalised), labels and captions, in shard order."""

    split: str
    image_emb: torch.Tensor  # [N, E]
    labels: torch.Tensor  # [N], label_id or -1 when the sample has none
    captions: list[str]
    keys: list[str]
    metas: list[dict[str, Any]]  # the sample jsons

    def __len__(self) -> int:
        return len(self.keys)


def eval_splits(root: str | Path, wanted: str | None = None) -> list[str]:
    """The image splits to classify: `wanted` (comma-separated), or by default
    `test` plus every `shift_*` split of `root` (any layout `peflow.data.formats.find_shards`
    resolves)."""
    if wanted:
        names = [s.strip() for s in wanted.split(",") if s.strip()]
        if not names:
            raise ValueError(f"no split names in {wanted!r}")
        return names
    try:
        splits = find_shards(root, "image")
    except FileNotFoundError as e:
        raise ValueError(f"{root}: no image split 'test': {e}") from None
    if "test" not in splits:
        raise ValueError(f"{root}: no image split 'test' (its image splits: {', '.join(splits)}; "
                         f"see docs/corpus.md and peflow.data.formats for the layouts read)")
    return ["test"] + sorted(s for s in splits if s.startswith("shift_"))


def preprocess(image: Any, size: int) -> torch.Tensor:
    """PIL image -> [3, S, S] float tensor: squash-resize (bilinear), scale to [0, 1], normalise."""
    from PIL import Image

    image = image.convert("RGB")
    if image.size != (size, size):
        image = image.resize((size, size), Image.BILINEAR)
    x = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255.0)
    return x.sub_(PE_MEAN).div_(PE_STD)


def _batched(items: Iterable[Any], n: int) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def _label_id(meta: dict[str, Any], classnames: Sequence[str] | None) -> int:
    if "label_id" in meta:
        return int(meta["label_id"])
    if classnames is not None and meta.get("label") in classnames:
        return list(classnames).index(meta["label"])
    return -1


@torch.no_grad()
def encode_image_split(
    model: torch.nn.Module,
    root: str | Path,
    split: str,
    *,
    image_size: int,
    batch_size: int = 256,
    max_samples: int | None = None,
    classnames: Sequence[str] | None = None,
    device: torch.device | str = "cpu",
) -> SplitFeatures:
    """Encode the first `max_samples` images of `split` (all when None)."""
    try:
        shards = shard_paths(root, split)
    except FileNotFoundError as e:
        raise ValueError(str(e)) from None
    if not shards:
        raise ValueError(f"{root}: split {split!r} has no shards")

    def samples() -> Iterator[dict[str, Any]]:
        for i, s in enumerate(iter_image_text(shards)):
            if max_samples is not None and i >= max_samples:
                return
            yield s

    embs, labels, captions, keys, metas = [], [], [], [], []
    for batch in _batched(samples(), batch_size):
        x = torch.stack([preprocess(s["image"], image_size) for s in batch]).to(device)
        embs.append(model.encode_image(x).float().cpu())
        labels += [_label_id(s["meta"], classnames) for s in batch]
        captions += [s["caption"] for s in batch]
        keys += [s["key"] for s in batch]
        metas += [s["meta"] for s in batch]
    if not keys:
        raise ValueError(f"{root}: split {split!r} holds no samples")
    return SplitFeatures(split=split, image_emb=torch.cat(embs), labels=torch.tensor(labels, dtype=torch.long),
                         captions=captions, keys=keys, metas=metas)


@torch.no_grad()
def encode_texts(
    model: torch.nn.Module, tokenizer: Any, texts: Sequence[str], *, batch_size: int = 256,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """[M, E] unnormalised text embeddings."""
    out = [model.encode_text(tokenizer(list(chunk)).to(device)).float().cpu()
           for chunk in _batched(texts, batch_size)]
    if not out:
        raise ValueError("no texts to encode")
    return torch.cat(out)
