"""A quick zero-shot check at the end of pretraining (the evaluate stage does the full protocol).

Label set: the shape category of each image's primary object (the corpus
card's `categories`, `meta["label_id"]`); prompts from the `corpus` template
set of `peflow.evaluate.templates`; images encoded as the evaluate stage
encodes them (`evaluate.features`), squashed to the final training resolution. Where the corpus records them, also the attribute label
sets and the colour-typicality split of `peflow.evaluate.labelsets`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from peflow.data.formats import label_names, load_card


@torch.no_grad()
def zeroshot_check(model: torch.nn.Module, tokenizer: Any, data_root: str | Path, splits: Sequence[str], *,
                   resolution: int, batch_size: int = 256, templates: str = "corpus") -> dict[str, float]:
    """Metrics of zero-shot classification over the corpus's shape categories: `zeroshot/<split>/top1`,
    `zeroshot/chance_top1`, and the `peflow.evaluate.labelsets` metrics."""
    from peflow.evaluate.features import encode_image_split, encode_texts
    from peflow.evaluate.labelsets import labelset_metrics
    from peflow.evaluate.templates import get_templates
    from peflow.evaluate.zeroshot import class_embeddings, zeroshot_accuracy

    was_training = model.training
    model.eval()
    classnames = label_names(data_root)

    def texts(t: list[str]) -> torch.Tensor:
        return encode_texts(model, tokenizer, t, batch_size=batch_size)

    classifier_CE = class_embeddings(texts, classnames, get_templates(templates))
    feats = {s: encode_image_split(model, data_root, s, image_size=resolution, batch_size=batch_size,
                                   classnames=classnames) for s in splits}
    out: dict[str, float] = {"zeroshot/chance_top1": 1.0 / len(classnames)}
    for split, f in feats.items():
        out[f"zeroshot/{split}/top1"] = zeroshot_accuracy(f.image_emb, f.labels, classifier_CE, ks=(1,))["top1"]
    out.update(labelset_metrics(feats, load_card(data_root), classifier_CE, texts))
    model.train(was_training)
    return out
