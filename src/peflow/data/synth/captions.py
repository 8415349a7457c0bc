"""Captions from the scene graph: templates, synonyms, optional attributes and
spatial relations, so that one scene can be described many ways while every
word stays true."""

from __future__ import annotations

import numpy as np

from peflow.data.synth import vocab
from peflow.data.synth.world import Scene, SceneObject


def choice(rng: np.random.Generator, options: tuple[str, ...] | list[str]) -> str:
    return str(options[int(rng.integers(len(options)))])


def article(phrase: str) -> str:
    return ("an " if phrase[:1] in "aeiou" else "a ") + phrase


def object_phrase(rng: np.random.Generator, o: SceneObject, *, p_size: float = 0.7, p_colour: float = 0.9,
                  p_texture: float = 0.6, with_article: bool = True) -> str:
    """E.g. "a large red striped star" or "a blue circle with polka dots"."""
    words: list[str] = []
    if rng.random() < p_size:
        words.append(choice(rng, vocab.SIZE_WORDS[o.size]))
    if o.texture != "outline" and rng.random() < p_colour:
        words.append(o.colour)
    tex = vocab.TEXTURE_WORDS.get(o.texture)
    suffix = ""
    if tex is not None and rng.random() < p_texture:
        if rng.random() < 0.5:
            words.append(tex[0])
        else:
            suffix = " " + tex[1]
    words.append(choice(rng, vocab.SHAPE_WORDS[o.category]))
    phrase = " ".join(w for w in words if w) + suffix
    return article(phrase) if with_article else phrase


def relation(a: SceneObject, b: SceneObject) -> str:
    """Where `a` is relative to `b`: "to the left of", "above", ..."""
    dx, dy = a.cx - b.cx, a.cy - b.cy
    if abs(dx) >= abs(dy):
        return "to the left of" if dx < 0 else "to the right of"
    return "above" if dy < 0 else "below"


_PREFIX = {
    None: ("", "", "a photo of ", "an image of ", "a picture showing "),
    "sketch": ("a sketch of ", "a line drawing of ", "a pencil drawing of ", "an outline drawing of "),
    "rendition": ("a cartoon of ", "an illustration of ", "a stylized painting of ", "clip art of "),
    "clutter": ("", "a cluttered scene with ", "a busy picture of "),
    "pose": ("", "an unusual view of ", "a photo of "),
}


def image_caption(rng: np.random.Generator, scene: Scene) -> str:
    """One caption of an image's scene graph (objects[0] is the primary)."""
    s = scene.image_size
    p, others = scene.objects[0], scene.objects[1:]
    pp = object_phrase(rng, p, p_size=0.8, with_article=False)
    if scene.shift == "pose" and abs(p.angle) > 120 and rng.random() < 0.6:
        pp = "upside-down " + pp
    elif scene.shift == "pose" and abs(p.angle) > 45 and rng.random() < 0.5:
        pp = "tilted " + pp
    pp = article(pp)
    pos = choice(rng, vocab.POSITION_WORDS[p.position(s)]) if rng.random() < 0.7 else ""
    parts = [pp + (" " + pos if pos else "")]
    if scene.shift == "clutter":
        if any(o.depth < p.depth for o in others) and rng.random() < 0.6:
            parts.append(choice(rng, ("partly hidden behind smaller shapes", "partially occluded by other shapes")))
        elif others:
            parts.append(choice(rng, ("among many small shapes", "surrounded by other shapes")))
    else:
        for o in others:
            op = object_phrase(rng, o, p_texture=0.3)
            template = int(rng.integers(3))
            if template == 0:
                parts.append(f"next to {op}")
            elif template == 1:
                parts.append(f"with {op} {relation(o, p)} it")
            else:
                parts.append(f"and {op} {relation(o, p)} the {vocab.SHAPE_WORDS[p.category][0]}")
    if rng.random() < 0.35:
        parts.append(choice(rng, vocab.BACKGROUND_WORDS[scene.background]))
    text = choice(rng, _PREFIX[scene.shift]) + ", ".join(parts[:1]) + (" " if len(parts) > 1 else "")
    text += ", ".join(parts[1:])
    if rng.random() < 0.5:
        text = text[0].upper() + text[1:] + "."
    return text.strip()
