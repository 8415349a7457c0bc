"""Caption quality against human captions: BLEU-4 and CIDEr (pycocoevalcap, the COCO
caption scorers) and attribute recall (the actor's shape, colour and action named).

Attribute recall reads the built-in corpus's ground truth (the sample json's
`objects[0]` and `category`): a caption names the shape when it holds one of
the shape's words, the colour when it holds the colour's name, the action when
it holds one of the action's phrases (`ACTION_CUES`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from peflow.data.synth import vocab

#: Phrases that name each action, in captions written as the corpus's human and web text words them.
ACTION_CUES: dict[str, tuple[str, ...]] = {
    "move left": ("to the left", "moves left", "moving left", "slides left"),
    "move right": ("to the right", "moves right", "moving right", "slides right"),
    "move up": ("up to the top", "moves up", "moving up"),
    "move down": ("down to the bottom", "moves down", "moving down"),
    "rotate": ("rotat", "spins", "turns"),
    "grow": ("grow", "bigger", "into a large"),
    "shrink": ("shrink", "smaller", "into a small"),
    "change colour": ("changes colour", "changing colour", "colour from", "recolour"),
    "bounce": ("bounc",),
    "shake": ("shak",),
}
ATTRIBUTES = ("shape", "colour", "action")


def tokenize(text: str) -> str:
    """Lower-cased words and numbers joined by spaces (the scorers' input; PTB tokenization needs Java)."""
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


def names_attribute(caption: str, meta: Mapping[str, Any], attribute: str) -> bool:
    """Whether `caption` names the true `attribute` (shape, colour or action) of the video in `meta`."""
    actor = meta["objects"][0]
    if attribute == "shape":
        return any(w in _words(caption) for w in vocab.SHAPE_WORDS[actor["category"]]) or \
            actor["category"] in _words(caption)
    if attribute == "colour":
        return actor["colour"] in _words(caption)
    if attribute == "action":
        text = " ".join(tokenize(caption).split())
        return any(c in text for c in ACTION_CUES[meta["category"]])
    raise ValueError(f"attribute must be one of {ATTRIBUTES}, got {attribute!r}")


def attribute_recall(captions: Sequence[str], metas: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Fraction of videos whose caption names the true shape, colour and action."""
    if len(captions) != len(metas) or not captions:
        raise ValueError(f"{len(captions)} captions for {len(metas)} videos")
    return {a: sum(names_attribute(c, m, a) for c, m in zip(captions, metas)) / len(captions) for a in ATTRIBUTES}


def caption_scores(captions: Sequence[str], references: Sequence[str | Sequence[str]]) -> dict[str, float]:
    """Corpus BLEU-4 and CIDEr of `captions` against their reference caption(s)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    if len(captions) != len(references) or not captions:
        raise ValueError(f"{len(captions)} captions for {len(references)} references")
    res = {i: [tokenize(c) or "empty"] for i, c in enumerate(captions)}
    gts = {i: [tokenize(r) for r in ([ref] if isinstance(ref, str) else ref)] for i, ref in enumerate(references)}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    return {"bleu4": float(bleu[3]), "cider": float(cider)}


def caption_metrics(captions: Sequence[str], metas: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """BLEU-4, CIDEr (against each video's `human_caption`) and attribute recall, as flat metrics."""
    out = caption_scores(captions, [m["human_caption"] for m in metas])
    out.update({f"recall_{k}": v for k, v in attribute_recall(captions, metas).items()})
    return out
