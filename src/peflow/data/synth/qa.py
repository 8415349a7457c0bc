"""Question-answer pairs from the ground truth, for language alignment.

Every answer is one word or a number and is computed from the same scene
graph the sample's json stores, so it can be checked against the json.
Question types: count, colour, shape, position (images); action, colour,
shape, count (videos).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from peflow.data.synth import vocab
from peflow.data.synth.captions import choice
from peflow.data.synth.world import Scene


def _qa(question: str, answer: str | int, kind: str) -> dict[str, str]:
    return {"question": question, "answer": str(answer), "type": kind}


def image_qa(rng: np.random.Generator, scene: Scene) -> list[dict[str, str]]:
    """Count, colour, shape and position questions about one image."""
    s, objs = scene.image_size, scene.objects
    p = objs[0]
    shape = vocab.SHAPE_WORDS[p.category][0]
    out = [_qa(choice(rng, ("How many objects are there?", "How many shapes are in the image?",
                            "How many objects can you see?")), len(objs), "count")]
    cats = Counter(o.category for o in objs)
    colours = Counter(o.colour for o in objs)
    if scene.style != "sketch":
        out.append(_qa(choice(rng, (f"What colour is the {shape}?", f"What is the colour of the {shape}?")),
                       p.colour, "colour"))
        if colours[p.colour] == 1:
            out.append(_qa(f"What shape is the {p.colour} object?", p.category, "shape"))
        else:
            out.append(_qa("What shape is the largest object?", p.category, "shape"))
    else:
        out.append(_qa("What shape is the largest object?", p.category, "shape"))
    out.append(_qa(choice(rng, (f"Where is the {shape}?", f"Where is the {shape} in the image?")),
                   p.position(s), "position"))
    for o in objs[1:]:
        if cats[o.category] == 1 and scene.style != "sketch" and scene.shift != "clutter":
            out.append(_qa(f"What colour is the {vocab.SHAPE_WORDS[o.category][0]}?", o.colour, "colour"))
            break
    return out


def video_qa(rng: np.random.Generator, video: dict[str, Any]) -> list[dict[str, str]]:
    """Action, colour, shape and count questions about one video's json record."""
    objs = video["objects"]
    p = objs[0]
    act = vocab.ACTION_BY_NAME[video["category"]]
    shape = vocab.SHAPE_WORDS[p["category"]][0]
    if act.name.startswith("move"):
        action_q = choice(rng, (f"Which way does the {shape} move?", f"In which direction does the {shape} go?"))
    else:
        action_q = choice(rng, (f"What is the {shape} doing?", f"What happens to the {shape}?"))
    out = [_qa(action_q, act.answer, "action")]
    if act.name == "change colour":
        out.append(_qa(f"What colour is the {shape} at the start?", p["colour"], "colour"))
        out.append(_qa(f"What colour is the {shape} at the end?", p["end_colour"], "colour"))
    else:
        out.append(_qa(choice(rng, (f"What colour is the {shape}?", f"What colour is the moving {shape}?")),
                       p["colour"], "colour"))
    out.append(_qa(f"What shape is {act.gerund}?", p["category"], "shape"))
    out.append(_qa(choice(rng, ("How many objects are in the video?", "How many shapes appear in the video?")),
                   len(objs), "count"))
    return out
