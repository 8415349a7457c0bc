"""Attribute label sets and the colour-typicality split, on constructed embeddings: a
model that sees only colour is perfect on the colour label set, perfect on shape where
the colour is typical and wrong where it is not; a model that sees shape is not fooled."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from peflow.evaluate.labelsets import attribute_labels, attribute_metrics, label_sets, typicality_metrics
from peflow.evaluate.zeroshot import class_embeddings

E = 48
COLOURS = ["red", "green", "blue", "yellow"]
SHAPES = ["circle", "square", "star", "heart"]
TYPICAL = {"circle": "yellow", "square": "blue", "star": "green", "heart": "red"}
POSITIONS = ["left", "right", "top", "bottom", "center"]
CARD = {"categories": SHAPES, "colours": {c: [0, 0, 0] for c in COLOURS}, "positions": POSITIONS,
        "typical_colours": TYPICAL}

g = torch.Generator().manual_seed(0)
COLOUR_DIR = F.normalize(torch.randn(len(COLOURS), E, generator=g), dim=-1)
SHAPE_DIR = F.normalize(torch.randn(len(SHAPES), E, generator=g), dim=-1)
POSITION_DIR = F.normalize(torch.randn(len(POSITIONS), E, generator=g), dim=-1)


def text_encoder(shape_by_colour: bool):
    """Prompts -> the direction of the colour, position or shape they name. With
    `shape_by_colour`, a shape word means its typical colour (what a colour-shortcut model learns)."""

    def encode(texts: list[str]) -> torch.Tensor:
        out = []
        for t in texts:
            words = t.rstrip(".").split()
            if any(c in words for c in COLOURS):
                out.append(COLOUR_DIR[next(i for i, c in enumerate(COLOURS) if c in words)])
            elif any(s in words for s in SHAPES):
                s = next(s for s in SHAPES if s in words)
                out.append(COLOUR_DIR[COLOURS.index(TYPICAL[s])] if shape_by_colour else SHAPE_DIR[SHAPES.index(s)])
            else:
                out.append(POSITION_DIR[next(i for i, p in enumerate(POSITIONS) if p in words)])
        return torch.stack(out)

    return encode


def scenes(n: int = 200):
    """Metas with a primary object (shape, colour typical for the first half), shape labels."""
    metas, labels = [], []
    for i in range(n):
        shape = SHAPES[i % len(SHAPES)]
        colour = TYPICAL[shape] if i < n // 2 else COLOURS[(COLOURS.index(TYPICAL[shape]) + 1 + i % 3) % len(COLOURS)]
        metas.append({"label_id": i % len(SHAPES),
                      "objects": [{"category": shape, "colour": colour, "position": POSITIONS[i % 5]}]})
        labels.append(i % len(SHAPES))
    return metas, torch.tensor(labels)


def images(metas, *, colour: float, shape: float, position: float) -> torch.Tensor:
    rows = []
    for m in metas:
        o = m["objects"][0]
        rows.append(colour * COLOUR_DIR[COLOURS.index(o["colour"])] + shape * SHAPE_DIR[SHAPES.index(o["category"])]
                    + position * POSITION_DIR[POSITIONS.index(o["position"])])
    return torch.stack(rows)


def test_a_colour_only_model_is_exposed_by_the_atypical_split():
    metas, labels = scenes()
    emb = images(metas, colour=1.0, shape=0.0, position=0.0)
    encode = text_encoder(shape_by_colour=True)
    shape_classifier = class_embeddings(encode, SHAPES, ("a {c}.", "a photo of a {c}."))
    typ = typicality_metrics({"test": (emb, labels, metas), "shift_sketch": (emb, labels, metas)}, CARD,
                             shape_classifier)
    assert typ == {"zeroshot/test/top1_typical_colour": 1.0, "zeroshot/test/top1_atypical_colour": 0.0}

    attrs = attribute_metrics({"test": (emb, metas), "shift_pose": (emb, metas)}, CARD, encode)
    assert attrs["zeroshot_colour/test/top1"] == 1.0
    assert attrs["zeroshot_colour/chance_top1"] == 1 / len(COLOURS)
    assert attrs["zeroshot_position/chance_top1"] == 1 / len(POSITIONS)
    assert attrs["zeroshot_position/test/majority_top1"] == 40 / 200
    assert attrs["zeroshot_position/test/top1"] < 0.5  # the images hold no position
    assert not any("shift_" in k for k in attrs)


def test_a_shape_and_position_model_scores_on_both_halves():
    metas, labels = scenes()
    emb = images(metas, colour=0.3, shape=1.0, position=1.0)
    encode = text_encoder(shape_by_colour=False)
    shape_classifier = class_embeddings(encode, SHAPES, ("a {c}.",))
    typ = typicality_metrics({"val": (emb, labels, metas)}, CARD, shape_classifier)
    assert typ == {"zeroshot/val/top1_typical_colour": 1.0, "zeroshot/val/top1_atypical_colour": 1.0}
    assert attribute_metrics({"val": (emb, metas)}, CARD, encode)["zeroshot_position/val/top1"] == 1.0


def test_corpora_without_the_fields_get_no_metrics():
    metas, labels = scenes(8)
    emb = images(metas, colour=1.0, shape=0.0, position=0.0)
    bare = {"categories": SHAPES}
    assert label_sets(bare) == {}
    assert attribute_metrics({"test": (emb, metas)}, bare, text_encoder(True)) == {}
    assert typicality_metrics({"test": (emb, labels, metas)}, bare, torch.eye(len(SHAPES), E)) == {}
    # samples without objects (e.g. LAION-style shards) are not labelled
    assert attribute_labels([{}, {"objects": [{"colour": "mauve"}]}], "colour", COLOURS).tolist() == [-1, -1]
    assert attribute_metrics({"test": (emb[:2], [{}, {}])}, CARD, text_encoder(True)) == {}
