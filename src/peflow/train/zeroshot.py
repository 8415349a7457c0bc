"""A quick zero-shot check at the end of pretraining (the evaluate stage does the full protocol).

Label set: the shape category of each image's primary object (the corpus
card's `categories`, `meta["label_id"]`); prompts from the `corpus` template
set of `peflow.evaluate.templates`; images resized (squashed) to the final
training resolution.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from peflow.data.formats import iter_image_text, label_names, shard_paths
from peflow.train.data import to_tensor


@torch.no_grad()
def zeroshot_top1(model: torch.nn.Module, tokenizer: Any, data_root: str | Path, splits: Sequence[str], *,
                  resolution: int, batch_size: int = 256, templates: str = "corpus") -> dict[str, float]:
    """{split: top-1 accuracy} of zero-shot classification over the corpus's shape categories."""
    from PIL import Image

    from peflow.evaluate.templates import get_templates
    from peflow.evaluate.zeroshot import class_embeddings, zeroshot_accuracy

    was_training = model.training
    model.eval()
    classnames = label_names(data_root)

    def encode_texts(texts: list[str]) -> torch.Tensor:
        return torch.cat([model.encode_text(tokenizer(texts[i:i + 512])) for i in range(0, len(texts), 512)])

    classifier_CE = class_embeddings(encode_texts, classnames, get_templates(templates))
    out: dict[str, float] = {}
    for split in splits:
        embs, labels, images = [], [], []

        def flush() -> None:
            if images:
                embs.append(F.normalize(model.encode_image(to_tensor(images)).float(), dim=-1))
                images.clear()

        for s in iter_image_text(shard_paths(data_root, split)):
            images.append(s["image"].resize((resolution, resolution), Image.BILINEAR))
            labels.append(int(s["meta"]["label_id"]))
            if len(images) == batch_size:
                flush()
        flush()
        out[split] = zeroshot_accuracy(torch.cat(embs), torch.tensor(labels), classifier_CE, ks=(1,))["top1"]
    model.train(was_training)
    return out


def chance(data_root: str | Path) -> float:
    """Top-1 of a uniform guess over the label set."""
    return 1.0 / len(label_names(data_root))
