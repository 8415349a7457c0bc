"""A quick zero-shot check at the end of pretraining (the evaluate stage does the full protocol).

Label set: the shape category of each image's primary object (the corpus
card's `categories`, `meta["label_id"]`); prompts from the `corpus` template
set of `peflow.evaluate.templates`; images resized (squashed) to the final
training resolution. Where the corpus records them, also the attribute label
sets and the colour-typicality split of `peflow.evaluate.labelsets`.
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
def zeroshot_check(model: torch.nn.Module, tokenizer: Any, data_root: str | Path, splits: Sequence[str], *,
                   resolution: int, batch_size: int = 256, templates: str = "corpus") -> dict[str, float]:
    """Metrics of zero-shot classification over the corpus's shape categories: `zeroshot/<split>/top1`,
    `zeroshot/chance_top1`, and the `peflow.evaluate.labelsets` metrics."""
    from PIL import Image

    from peflow.data.formats import load_card
    from peflow.evaluate.labelsets import attribute_metrics, typicality_metrics
    from peflow.evaluate.templates import get_templates
    from peflow.evaluate.zeroshot import class_embeddings, zeroshot_accuracy

    was_training = model.training
    model.eval()
    classnames = label_names(data_root)

    def encode_texts(texts: list[str]) -> torch.Tensor:
        return torch.cat([model.encode_text(tokenizer(texts[i:i + 512])) for i in range(0, len(texts), 512)])

    classifier_CE = class_embeddings(encode_texts, classnames, get_templates(templates))
    out: dict[str, float] = {"zeroshot/chance_top1": 1.0 / len(classnames)}
    encoded: dict[str, tuple[torch.Tensor, torch.Tensor, list[dict[str, Any]]]] = {}
    for split in splits:
        embs, labels, images, metas = [], [], [], []

        def flush() -> None:
            if images:
                embs.append(F.normalize(model.encode_image(to_tensor(images)).float(), dim=-1))
                images.clear()

        for s in iter_image_text(shard_paths(data_root, split)):
            images.append(s["image"].resize((resolution, resolution), Image.BILINEAR))
            labels.append(int(s["meta"]["label_id"]))
            metas.append(s["meta"])
            if len(images) == batch_size:
                flush()
        flush()
        encoded[split] = (torch.cat(embs), torch.tensor(labels), metas)
        out[f"zeroshot/{split}/top1"] = zeroshot_accuracy(*encoded[split][:2], classifier_CE, ks=(1,))["top1"]
    card = load_card(data_root)
    out.update(typicality_metrics(encoded, card, classifier_CE))
    out.update(attribute_metrics({s: (e, m) for s, (e, _, m) in encoded.items()}, card, encode_texts))
    model.train(was_training)
    return out
