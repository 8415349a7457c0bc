"""Scene graphs: sampling the objects and background of one image.

A `Scene` is pure data (no pixels): `render.render_scene` turns it into an
image, an instance mask and a depth map. `objects[0]` is always the primary
object, whose category is the image label.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from peflow.data.synth import vocab


@dataclass
class SceneObject:
    """One object of the scene graph; lengths are in pixels, angle in degrees."""

    category: str
    colour: str
    size: str
    texture: str
    cx: float
    cy: float
    radius: float
    angle: float
    depth: float  #: 0 = nearest, 1 = background
    outline: int = 0  #: width of a dark cartoon outline (rendition), 0 = none
    rgb: tuple[float, float, float] | None = None  #: overrides `colour` (colour changes in videos)

    def position(self, image_size: int) -> str:
        return position_of(self.cx, self.cy, image_size)


@dataclass
class Scene:
    """A whole image: background and objects (drawn far to near by depth)."""

    image_size: int
    background: str
    bg_colours: list[tuple[int, int, int]]
    bg_seed: int
    objects: list[SceneObject] = field(default_factory=list)
    style: str = "normal"  #: "normal" | "sketch" | "rendition"
    shift: str | None = None

    def draw_order(self) -> list[int]:
        """Object indices from far to near (ties: later index on top)."""
        return sorted(range(len(self.objects)), key=lambda i: (-self.objects[i].depth, i))

    def copy(self) -> Scene:
        return dataclasses.replace(self, objects=[dataclasses.replace(o) for o in self.objects])


def position_of(cx: float, cy: float, image_size: int) -> str:
    """The coarse position word of a point: left/right/top/bottom/center."""
    dx, dy = cx / image_size - 0.5, cy / image_size - 0.5
    if max(abs(dx), abs(dy)) < 0.11:
        return "center"
    if abs(dx) >= abs(dy):
        return "left" if dx < 0 else "right"
    return "top" if dy < 0 else "bottom"


def sample_position(rng: np.random.Generator, label: str, image_size: int) -> tuple[float, float]:
    """A centre point whose `position_of` is `label`."""
    if label == "center":
        dx, dy = rng.uniform(-0.07, 0.07, size=2)
    else:
        along, across = rng.uniform(0.15, 0.27), rng.uniform(-0.09, 0.09)
        dx, dy = {"left": (-along, across), "right": (along, across),
                  "top": (across, -along), "bottom": (across, along)}[label]
    cx, cy = (0.5 + dx) * image_size, (0.5 + dy) * image_size
    assert position_of(cx, cy, image_size) == label
    return float(cx), float(cy)


def pick(rng: np.random.Generator, seq: tuple[str, ...] | list[str]) -> str:
    return str(seq[int(rng.integers(len(seq)))])


def _luma(rgb: tuple[int, int, int]) -> float:
    return 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]


def sample_background(rng: np.random.Generator, kind: str) -> list[tuple[int, int, int]]:
    """Muted colours for a background kind (objects stay the salient thing)."""
    if kind == "white":
        return [(255, 255, 255)]
    if kind == "paper":
        return [(236, 226, 200)]
    if kind == "dark":
        g = int(rng.integers(10, 40))
        return [(g, g, g + int(rng.integers(0, 20)))]
    if kind == "static":
        return [(128, 128, 128)]
    out = []
    for _ in range(2):
        g = int(rng.integers(95, 205))
        tint = rng.integers(-18, 19, size=3)
        out.append(tuple(int(np.clip(g + t, 0, 255)) for t in tint))
    return out


def _contrasts(rgb: tuple[int, int, int], bg: list[tuple[int, int, int]]) -> bool:
    bg_rgb = np.mean(np.array(bg, dtype=float), axis=0)
    return bool(np.abs(np.array(rgb, dtype=float) - bg_rgb).max() > 70 and abs(_luma(rgb) - _luma(tuple(bg_rgb))) > 25)


def sample_colour(rng: np.random.Generator, palette: dict[str, tuple[int, int, int]],
                  bg: list[tuple[int, int, int]], avoid: set[str] = frozenset()) -> str:
    """A colour name that stands out from the background (luma or hue contrast)."""
    names = [n for n in palette if n not in avoid] or list(palette)
    for _ in range(20):
        name = pick(rng, names)
        if _contrasts(palette[name], bg):
            return name
    return name


def sample_object(rng: np.random.Generator, *, image_size: int, size: str, category: str | None = None,
                  colour: str | None = None, palette: dict[str, tuple[int, int, int]] = vocab.COLOURS,
                  bg: list[tuple[int, int, int]] = ((128, 128, 128),), textures: tuple[str, ...] = vocab.TEXTURES,
                  position: str | None = None, angle_range: float = 15.0, depth: float = 0.5) -> SceneObject:
    """One object with random attributes (any attribute can be fixed)."""
    category = category or pick(rng, vocab.CATEGORIES)
    if colour is None and palette is vocab.COLOURS and rng.random() < vocab.TYPICAL_COLOUR_P:
        typical = vocab.TYPICAL_COLOUR.get(category)
        if typical and _contrasts(palette[typical], list(bg)):
            colour = typical
    colour = colour or sample_colour(rng, palette, list(bg))
    lo, hi = vocab.SIZES[size]
    radius = float(rng.uniform(lo, hi)) * image_size
    texture = pick(rng, textures) if rng.random() < 0.6 else textures[0]
    if position is None:
        cx, cy = (float(v) for v in rng.uniform(0.12, 0.88, size=2) * image_size)
    else:
        cx, cy = sample_position(rng, position, image_size)
    angle = float(rng.uniform(-angle_range, angle_range))
    return SceneObject(category, colour, size, texture, cx, cy, radius, angle, depth)


def place_secondary(rng: np.random.Generator, scene: Scene, obj: SceneObject, *, overlap: float,
                    tries: int = 30) -> bool:
    """Move `obj` to a spot overlapping the others at most `overlap` (0..1); False if none found."""
    s = scene.image_size
    for _ in range(tries):
        m = obj.radius * 0.6
        obj.cx, obj.cy = (float(v) for v in rng.uniform(m, s - m, size=2))
        ok = all(np.hypot(obj.cx - o.cx, obj.cy - o.cy) > (1.0 - overlap) * (obj.radius + o.radius)
                 for o in scene.objects)
        if ok:
            return True
    return False
