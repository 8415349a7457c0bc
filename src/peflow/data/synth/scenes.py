"""Per-split scene samplers: the ordinary world and its four distribution shifts.

All splits share one label space (the primary object's category):
- ordinary (train/val/test): 1-3 objects, the primary large or medium and on top;
- `sketch` (ImageNet-Sketch): outlines only, white paper, no fill or colour;
- `rendition` (ImageNet-R): unusual palette and textures, thick cartoon outlines;
- `clutter` (ImageNet-A / ObjectNet occlusion): many distractors, some in
  front of the primary, which keeps most of its area and stays the largest;
- `pose` (ObjectNet): unusual rotation, scale, placement and background.
"""

from __future__ import annotations

import numpy as np

from peflow.data.synth import shapes, vocab
from peflow.data.synth.render import render_visible
from peflow.data.synth.world import (
    Scene, pick, place_secondary, sample_background, sample_object,
)


def size_of(radius_frac: float) -> str:
    """The size word of a radius given as a fraction of the image side."""
    return "small" if radius_frac < 0.145 else "medium" if radius_frac < 0.23 else "large"


def _secondaries(rng: np.random.Generator, scene: Scene, n: int, *, palette: dict, textures: tuple,
                 max_radius: float, angle_range: float, overlap: float) -> None:
    primary = scene.objects[0]
    used = {primary.category}
    for _ in range(n):
        size = "medium" if primary.size == "large" and rng.random() < 0.3 else "small"
        cat = pick(rng, [c for c in vocab.CATEGORIES if c not in used])
        o = sample_object(rng, image_size=scene.image_size, size=size, category=cat, palette=palette,
                          bg=scene.bg_colours, textures=textures, angle_range=angle_range,
                          depth=float(rng.uniform(0.4, 0.85)))
        # the primary stays clearly the largest object whatever the two shapes are
        by_area = primary.radius * np.sqrt(0.5 * shapes.unit_area(primary.category) / shapes.unit_area(cat))
        o.radius = min(o.radius, max_radius, float(by_area))
        o.size = size_of(o.radius / scene.image_size)
        if place_secondary(rng, scene, o, overlap=overlap):
            scene.objects.append(o)
            used.add(cat)


def _ordinary(rng: np.random.Generator, s: int, category: str | None, *, palette: dict = vocab.COLOURS,
              textures: tuple = vocab.TEXTURES, backgrounds: tuple = vocab.BACKGROUNDS) -> Scene:
    kind = pick(rng, backgrounds)
    scene = Scene(s, kind, sample_background(rng, kind), int(rng.integers(2**31)))
    size = "large" if rng.random() < 0.7 else "medium"
    scene.objects.append(sample_object(rng, image_size=s, size=size, category=category, palette=palette,
                                       bg=scene.bg_colours,
                                       textures=textures, position=pick(rng, vocab.POSITIONS),
                                       depth=float(rng.uniform(0.1, 0.3))))
    n = int(rng.integers(0, 3))
    _secondaries(rng, scene, n, palette=palette, textures=textures,
                 max_radius=scene.objects[0].radius * 0.72, angle_range=15.0, overlap=0.15)
    return scene


def _sketch(rng: np.random.Generator, s: int, category: str | None) -> Scene:
    scene = _ordinary(rng, s, category)
    scene.background, scene.bg_colours, scene.style = "white", [(255, 255, 255)], "sketch"
    for o in scene.objects:
        o.colour, o.texture = "black", "outline"
    return scene


def _rendition(rng: np.random.Generator, s: int, category: str | None) -> Scene:
    scene = _ordinary(rng, s, category, palette=vocab.RENDITION_COLOURS, textures=vocab.RENDITION_TEXTURES + ("solid",),
                      backgrounds=("paper", "plain", "gradient"))
    scene.style = "rendition"
    for o in scene.objects:
        o.outline = max(1, round(s / 40))
    return scene


def _clutter(rng: np.random.Generator, s: int, category: str | None, min_pixels: int) -> Scene:
    kind = pick(rng, vocab.BACKGROUNDS)
    scene = Scene(s, kind, sample_background(rng, kind), int(rng.integers(2**31)))
    p = sample_object(rng, image_size=s, size="large", category=category, bg=scene.bg_colours,
                      position=pick(rng, vocab.POSITIONS), depth=0.5)
    p.radius = float(rng.uniform(0.25, 0.29)) * s
    scene.objects.append(p)
    others = [c for c in vocab.CATEGORIES if c != p.category]
    for j in range(int(rng.integers(4, 8))):
        front = j < int(rng.integers(1, 4))
        o = sample_object(rng, image_size=s, size="small", category=pick(rng, others), bg=scene.bg_colours,
                          angle_range=180.0,
                          depth=float(rng.uniform(0.2, 0.45) if front else rng.uniform(0.55, 0.9)))
        if front:  # an occluder overlapping the primary's outline
            a, d = rng.uniform(0, 2 * np.pi), rng.uniform(0.55, 1.0) * p.radius
            o.cx, o.cy = p.cx + d * np.cos(a), p.cy + d * np.sin(a)
        scene.objects.append(o)
    full = int((shapes.coverage(p.category, p.cx, p.cy, p.radius, p.angle, s)[0] >= 0.5).sum())
    while True:  # keep at least 55% of the primary visible: drop occluders until it is
        _, _, _, _, vis = render_visible(scene, min_pixels=min_pixels)
        occluders = [i for i, o in enumerate(scene.objects) if o.depth < p.depth]
        if vis[0] >= 0.55 * full or not occluders:
            return scene
        del scene.objects[occluders[-1]]


def _pose(rng: np.random.Generator, s: int, category: str | None) -> Scene:
    kind = pick(rng, ("dark", "static", "noise"))
    scene = Scene(s, kind, sample_background(rng, kind), int(rng.integers(2**31)))
    big = rng.random() < 0.5
    p = sample_object(rng, image_size=s, size="large" if big else "medium", category=category, bg=scene.bg_colours,
                      depth=float(rng.uniform(0.1, 0.3)))
    p.radius = float(rng.uniform(0.33, 0.40) if big else rng.uniform(0.15, 0.19)) * s
    p.size = size_of(p.radius / s)
    p.angle = float(rng.choice([-1, 1]) * rng.uniform(70, 180))
    lo, hi = (0.3, 0.7) if big else (0.22, 0.78)
    p.cx, p.cy = (float(v) for v in rng.uniform(lo, hi, size=2) * s)
    scene.objects.append(p)
    _secondaries(rng, scene, int(rng.integers(0, 3)), palette=vocab.COLOURS, textures=vocab.TEXTURES,
                 max_radius=p.radius * 0.6, angle_range=180.0, overlap=0.1)
    return scene


def sample_image_scene(rng: np.random.Generator, shift: str | None, image_size: int, min_pixels: int,
                       category: str | None = None) -> Scene:
    """A scene for an ordinary split (`shift=None`) or one of `vocab.SHIFTS`; `category` fixes the label."""
    if shift is None:
        scene = _ordinary(rng, image_size, category)
    elif shift == "sketch":
        scene = _sketch(rng, image_size, category)
    elif shift == "rendition":
        scene = _rendition(rng, image_size, category)
    elif shift == "clutter":
        scene = _clutter(rng, image_size, category, min_pixels)
    elif shift == "pose":
        scene = _pose(rng, image_size, category)
    else:
        raise ValueError(f"unknown shift {shift!r}; known: {vocab.SHIFTS}")
    scene.shift = shift
    return scene
