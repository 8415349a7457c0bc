"""Attribute label sets: what a model learned about colour and position, and whether
its shape answers hold when colour does not give them away.

`zeroshot/*` classifies the corpus's label, the shape of each image's primary object
(card `categories`). The sample json also records that object's colour and position,
and the card each category's typical colour (`typical_colours`: 60% of circles are
orange, as bananas are yellow). The same image embeddings then answer two more questions:

- label sets `colour` (card `colours`, 10 classes) and `position` (card `positions`,
  5 classes): zero-shot top-1 with attribute prompts (`templates.ATTRIBUTE_TEMPLATES`);
- shape top-1 split by colour typicality: on images whose primary object has its
  category's typical colour, and on the others. A model that names shapes by their
  colour scores well on the first and at or below chance on the second.

Keys, for each ordinary split (a `shift_*` split changes colours and positions on purpose,
so its attributes are not labels): `zeroshot_<set>/<split>/top1`,
`zeroshot_<set>/<split>/majority_top1` (always answering the split's most frequent class),
`zeroshot_<set>/chance_top1` (a uniform guess), `zeroshot/<split>/top1_typical_colour`
and `zeroshot/<split>/top1_atypical_colour`. A corpus without these fields gets none.

Shape legend: N images, C classes, E embedding dim.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from peflow.evaluate.templates import ATTRIBUTE_PHRASES, ATTRIBUTE_TEMPLATES
from peflow.evaluate.zeroshot import class_embeddings, zeroshot_accuracy

if TYPE_CHECKING:
    from peflow.evaluate.features import SplitFeatures

#: label set -> the card field listing its classes
CARD_FIELDS: dict[str, str] = {"colour": "colours", "position": "positions"}


def is_ordinary(split: str) -> bool:
    """True for splits whose attributes are labels (not the `shift_*` splits)."""
    return not split.startswith("shift_")


def primary(meta: Mapping[str, Any]) -> Mapping[str, Any]:
    """The primary object's record in a sample json (empty when there is none)."""
    objects = meta.get("objects") or [{}]
    return objects[0]


def label_sets(card: Mapping[str, Any]) -> dict[str, list[str]]:
    """{label set: class names} for the attribute label sets the card lists."""
    return {name: list(card[field]) for name, field in CARD_FIELDS.items() if card.get(field)}


def attribute_labels(metas: Sequence[Mapping[str, Any]], attribute: str, classes: Sequence[str]) -> torch.Tensor:
    """[N] class index of each primary object's `attribute`, -1 where missing or not a class."""
    index = {c: i for i, c in enumerate(classes)}
    return torch.tensor([index.get(primary(m).get(attribute), -1) for m in metas], dtype=torch.long)


def _top1(image_emb_NE: torch.Tensor, labels_N: torch.Tensor, classifier_CE: torch.Tensor, keep_N: torch.Tensor
          ) -> float:
    return zeroshot_accuracy(image_emb_NE[keep_N], labels_N[keep_N], classifier_CE, ks=(1,))["top1"]


@torch.no_grad()
def attribute_metrics(
    splits: Mapping[str, tuple[torch.Tensor, Sequence[Mapping[str, Any]]]],
    card: Mapping[str, Any],
    encode_texts: Callable[[list[str]], torch.Tensor],
) -> dict[str, float]:
    """`zeroshot_<set>/...` metrics over the ordinary splits in {split: (image_emb [N, E], metas)}."""
    out: dict[str, float] = {}
    for name, classes in label_sets(card).items():
        phrases = [ATTRIBUTE_PHRASES.get(name, {}).get(c, c) for c in classes]
        classifier_CE: torch.Tensor | None = None
        for split, (emb, metas) in splits.items():
            if not is_ordinary(split):
                continue
            labels = attribute_labels(metas, name, classes)
            keep = labels >= 0
            if not bool(keep.any()):
                continue
            if classifier_CE is None:
                classifier_CE = class_embeddings(encode_texts, phrases, ATTRIBUTE_TEMPLATES[name])
            out[f"zeroshot_{name}/{split}/top1"] = _top1(emb, labels, classifier_CE, keep)
            out[f"zeroshot_{name}/{split}/majority_top1"] = int(torch.bincount(labels[keep]).max()) / int(keep.sum())
        if classifier_CE is not None:
            out[f"zeroshot_{name}/chance_top1"] = 1.0 / len(classes)
    return out


def typicality_metrics(
    splits: Mapping[str, tuple[torch.Tensor, torch.Tensor, Sequence[Mapping[str, Any]]]],
    card: Mapping[str, Any],
    classifier_CE: torch.Tensor,
) -> dict[str, float]:
    """Shape top-1 on typical- and atypical-colour images of each ordinary split in
    {split: (image_emb [N, E], shape labels [N], metas)}."""
    typical: Mapping[str, str] = card.get("typical_colours") or {}
    categories: Sequence[str] = card.get("categories") or []
    if not typical or not categories:
        return {}
    out: dict[str, float] = {}
    for split, (emb, labels, metas) in splits.items():
        if not is_ordinary(split):
            continue
        flags = [primary(m).get("colour") == typical.get(categories[y]) if 0 <= y < len(categories) else None
                 for m, y in zip(metas, labels.tolist())]
        for key, want in (("top1_typical_colour", True), ("top1_atypical_colour", False)):
            chosen = torch.tensor([f is want for f in flags], dtype=torch.bool)
            if bool(chosen.any()):
                out[f"zeroshot/{split}/{key}"] = _top1(emb, labels, classifier_CE, chosen)
    return out


def labelset_metrics(
    feats: Mapping[str, SplitFeatures],
    card: Mapping[str, Any],
    shape_classifier_CE: torch.Tensor,
    encode_texts: Callable[[list[str]], torch.Tensor],
) -> dict[str, float]:
    """Both kinds of metrics above for encoded splits (`features.encode_image_split`), as
    `peflow evaluate` and the pretrain stage's end-of-run check report them."""
    out = typicality_metrics({s: (f.image_emb, f.labels, f.metas) for s, f in feats.items()}, card,
                             shape_classifier_CE)
    out.update(attribute_metrics({s: (f.image_emb, f.metas) for s, f in feats.items()}, card, encode_texts))
    return out
