"""The vocabulary of the procedural world: label sets and their words.

Every list here is part of the corpus contract: label ids are positions in
`CATEGORIES` (images) and `ACTIONS` (videos), and the dataset card repeats the
lists so readers never need this module.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Shape categories, the image label space (label_id = index).
CATEGORIES: tuple[str, ...] = (
    "circle", "square", "triangle", "star", "hexagon", "pentagon",
    "cross", "heart", "diamond", "ring", "crescent", "arrow",
)

#: Shapes whose rotation is invisible (never given the `rotate` action).
ROUND_CATEGORIES: frozenset[str] = frozenset({"circle", "ring"})

#: Named colours of the ordinary splits, RGB.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 35),
    "green": (40, 170, 60),
    "blue": (35, 75, 220),
    "yellow": (245, 215, 30),
    "orange": (245, 130, 20),
    "purple": (130, 50, 180),
    "pink": (245, 120, 185),
    "brown": (125, 75, 35),
    "black": (25, 25, 25),
    "white": (245, 245, 245),
}

#: Like real objects (bananas are yellow), categories have a typical colour in
#: the ordinary palette, used with probability TYPICAL_COLOUR_P. Colour is then
#: a useful but unreliable cue, as in natural images: `shift_sketch` (no
#: colour) and `shift_rendition` (unusual palette) take it away, which is what
#: their robustness numbers measure.
TYPICAL_COLOUR: dict[str, str] = {
    "circle": "orange", "square": "blue", "triangle": "green", "star": "yellow", "hexagon": "purple",
    "pentagon": "brown", "cross": "black", "heart": "red", "diamond": "pink", "ring": "white",
    "crescent": "yellow", "arrow": "red",
}
TYPICAL_COLOUR_P = 0.6

#: Unusual palette used only by `shift_rendition` (same label space).
RENDITION_COLOURS: dict[str, tuple[int, int, int]] = {
    "gold": (212, 175, 55),
    "teal": (0, 128, 128),
    "magenta": (255, 0, 255),
    "lime": (170, 255, 0),
    "navy": (20, 20, 110),
    "maroon": (110, 10, 30),
    "cyan": (0, 230, 240),
    "olive": (128, 128, 0),
}

#: Size classes -> object radius as a fraction of the image side.
SIZES: dict[str, tuple[float, float]] = {
    "small": (0.09, 0.13),
    "medium": (0.16, 0.21),
    "large": (0.25, 0.32),
}

TEXTURES: tuple[str, ...] = ("solid", "striped", "dotted", "checkered", "wavy")
RENDITION_TEXTURES: tuple[str, ...] = ("rainbow", "marbled", "scribbled")

POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom", "center")

BACKGROUNDS: tuple[str, ...] = ("plain", "gradient", "noise", "grid")
#: Backgrounds of the shift splits only.
SHIFT_BACKGROUNDS: tuple[str, ...] = ("white", "paper", "dark", "static")

SHIFTS: tuple[str, ...] = ("sketch", "rendition", "clutter", "pose")

IMAGE_SPLITS: tuple[str, ...] = ("train", "val", "test") + tuple(f"shift_{s}" for s in SHIFTS)
VIDEO_SPLITS: tuple[str, ...] = ("train", "val", "test")


@dataclass(frozen=True)
class Action:
    """One video action class: its label and the words used to describe it."""

    name: str  #: the label, e.g. "move left"
    verb: str  #: third person, e.g. "moves to the left"
    gerund: str  #: e.g. "moving to the left"
    answer: str  #: the one-word QA answer, e.g. "left"


ACTION_DEFS: tuple[Action, ...] = (
    Action("move left", "moves to the left", "moving to the left", "left"),
    Action("move right", "moves to the right", "moving to the right", "right"),
    Action("move up", "moves up", "moving up", "up"),
    Action("move down", "moves down", "moving down", "down"),
    Action("rotate", "rotates", "rotating", "rotating"),
    Action("grow", "grows bigger", "growing", "growing"),
    Action("shrink", "shrinks", "shrinking", "shrinking"),
    Action("change colour", "changes colour", "changing colour", "recolouring"),
    Action("bounce", "bounces up and down", "bouncing", "bouncing"),
    Action("shake", "shakes from side to side", "shaking", "shaking"),
)
ACTIONS: tuple[str, ...] = tuple(a.name for a in ACTION_DEFS)
ACTION_BY_NAME: dict[str, Action] = {a.name: a for a in ACTION_DEFS}

#: Caption synonyms; the first entry is the canonical word.
SHAPE_WORDS: dict[str, tuple[str, ...]] = {
    "circle": ("circle", "disc", "round dot"),
    "square": ("square", "box", "block"),
    "triangle": ("triangle", "triangular shape"),
    "star": ("star", "five-pointed star"),
    "hexagon": ("hexagon", "six-sided shape"),
    "pentagon": ("pentagon", "five-sided shape"),
    "cross": ("cross", "plus sign"),
    "heart": ("heart", "heart shape"),
    "diamond": ("diamond", "rhombus"),
    "ring": ("ring", "donut", "hoop"),
    "crescent": ("crescent", "crescent moon"),
    "arrow": ("arrow", "arrow sign"),
}
SIZE_WORDS: dict[str, tuple[str, ...]] = {
    "small": ("small", "little", "tiny"),
    "medium": ("medium-sized", "mid-sized", ""),
    "large": ("large", "big", "huge"),
}
#: (adjective form, "with ..." form); None means the texture is not worth a word.
TEXTURE_WORDS: dict[str, tuple[str, str] | None] = {
    "solid": None,
    "striped": ("striped", "with stripes"),
    "dotted": ("dotted", "with polka dots"),
    "checkered": ("checkered", "with a checkerboard pattern"),
    "wavy": ("wavy", "with wavy lines"),
    "rainbow": ("rainbow", "painted in rainbow bands"),
    "marbled": ("marbled", "with a marble pattern"),
    "scribbled": ("scribbled", "covered in scribbles"),
}
BACKGROUND_WORDS: dict[str, tuple[str, ...]] = {
    "plain": ("on a plain background", "on a flat backdrop"),
    "gradient": ("on a gradient background", "against a smooth gradient"),
    "noise": ("on a noisy background", "against a grainy backdrop"),
    "grid": ("on a grid background", "over a grid pattern"),
    "white": ("on white paper", "on a white background"),
    "paper": ("on textured paper", "on an old sheet of paper"),
    "dark": ("on a dark background", "against a black backdrop"),
    "static": ("on a background of static", "over TV static"),
}
POSITION_WORDS: dict[str, tuple[str, ...]] = {
    "left": ("on the left", "at the left side", "in the left part of the image"),
    "right": ("on the right", "at the right side", "in the right part of the image"),
    "top": ("at the top", "near the top", "in the upper part of the image"),
    "bottom": ("at the bottom", "near the bottom", "in the lower part of the image"),
    "center": ("in the center", "in the middle", "at the center of the image"),
}


def all_colours() -> dict[str, tuple[int, int, int]]:
    """Every named colour, ordinary and rendition palettes together."""
    return {**COLOURS, **RENDITION_COLOURS}
