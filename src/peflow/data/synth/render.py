"""Rendering a `Scene` to pixels: RGB image, instance mask and depth map.

Objects are composited far to near with anti-aliased coverage; the instance
mask gives each pixel to the nearest object covering at least half of it
(ids are 1 + the object's index in the scene, 0 is background), and the depth
map holds each object's depth layer (background = 255, far).
"""

from __future__ import annotations

import colorsys
import math
from functools import cache

import numpy as np

from peflow.data.synth import shapes, vocab
from peflow.data.synth.world import Scene, SceneObject

SKETCH_INK = np.array([35, 35, 40], np.float32)
OUTLINE_INK = np.array([15, 15, 15], np.float32)


def _grid(s: int) -> tuple[np.ndarray, np.ndarray]:
    c = np.arange(s, dtype=np.float32) + 0.5
    return np.meshgrid(c, c)


def _upsampled_noise(rng: np.random.Generator, s: int, cells: int) -> np.ndarray:
    """Smooth noise in -1..1, [s, s]: random cells bilinearly upsampled."""
    from PIL import Image

    low = rng.uniform(0, 255, size=(cells, cells)).astype(np.uint8)
    up = Image.fromarray(low).resize((s, s), Image.Resampling.BILINEAR)
    return np.asarray(up, np.float32) / 127.5 - 1.0


def depth_code(depth: float) -> int:
    """The depth map value of an object layer: round(255 * depth), depth as stored in json (3 decimals)."""
    return int(round(255 * round(depth, 3)))


def render_background(scene: Scene) -> np.ndarray:
    """The background as float32 [S, S, 3] in 0..255."""
    s, kind = scene.image_size, scene.background
    rng = np.random.default_rng(scene.bg_seed)
    c0 = np.array(scene.bg_colours[0], np.float32)
    c1 = np.array(scene.bg_colours[-1], np.float32)
    img = np.broadcast_to(c0, (s, s, 3)).copy()
    if kind == "gradient":
        x, y = _grid(s)
        a = rng.uniform(0, 2 * np.pi)
        t = ((x - s / 2) * np.cos(a) + (y - s / 2) * np.sin(a)) / s + 0.5
        t = np.clip(t, 0, 1)[..., None]
        img = c0 * (1 - t) + c1 * t
    elif kind == "noise":
        img = img + 35 * _upsampled_noise(rng, s, 6)[..., None] + rng.normal(0, 8, (s, s, 1))
    elif kind == "grid":
        step = max(4, s // 8)
        off = int(rng.integers(step))
        lines = ((np.arange(s) + off) % step) < max(1, s // 64)
        img[lines, :] = c1 * 0.7
        img[:, lines] = c1 * 0.7
    elif kind == "paper":
        img = img + 10 * _upsampled_noise(rng, s, 12)[..., None] + rng.normal(0, 4, (s, s, 1))
    elif kind == "dark":
        img = img + rng.normal(0, 4, (s, s, 1))
    elif kind == "static":
        img = rng.uniform(40, 215, (s, s, 1)).repeat(3, axis=2) + rng.normal(0, 20, (s, s, 3))
    return np.clip(img, 0, 255).astype(np.float32)


def _texture_amount(texture: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """How much of the secondary colour each pixel gets (0..1), in local coords."""
    soft = lambda z: np.clip(z * 3.0 + 0.5, 0.0, 1.0)  # noqa: E731
    if texture == "striped":
        return soft(np.sin(2 * np.pi * 2.2 * u) - 0.35)
    if texture == "dotted":
        du, dv = (u * 2.6) % 1.0 - 0.5, (v * 2.6) % 1.0 - 0.5
        return soft((0.3 - np.hypot(du, dv)) * 4)
    if texture == "checkered":
        return ((np.floor(u * 2.4) + np.floor(v * 2.4)) % 2).astype(np.float32) * 0.85
    if texture == "wavy":
        return soft(np.sin(2 * np.pi * (2.0 * v + 0.3 * np.sin(2 * np.pi * 1.3 * u))) - 0.35)
    if texture == "marbled":
        return soft(np.sin(6.0 * u + 2.5 * np.sin(4.0 * v) + 1.5 * np.sin(7.0 * u * v)) - 0.2)
    if texture == "scribbled":
        return soft(np.abs(np.sin(9 * u + 4 * v) * np.sin(7 * v - 3 * u)) - 0.55)
    return np.zeros_like(u)


@cache
def _rainbow_lut() -> np.ndarray:
    return np.array([colorsys.hsv_to_rgb(h, 0.85, 0.95) for h in np.linspace(0, 0.85, 64)], np.float32)


def object_colour(obj: SceneObject, s: int) -> np.ndarray:
    """Per-pixel colour of an object's surface, float32 [S, S, 3]."""
    x, y = _grid(s)
    c, si = math.cos(math.radians(obj.angle)), math.sin(math.radians(obj.angle))
    dx, dy = x - obj.cx, y - obj.cy
    u = (c * dx + si * dy) / max(obj.radius, 1e-3)
    v = (-si * dx + c * dy) / max(obj.radius, 1e-3)
    base = np.array(obj.rgb if obj.rgb is not None else vocab.all_colours()[obj.colour], np.float32)
    if obj.texture == "rainbow":
        hues = (np.clip(u, -1, 1) * 0.5 + 0.5) * 0.85
        col = _rainbow_lut()[np.clip((hues / 0.85 * 63).astype(int), 0, 63)] * 255
        return 0.75 * col + 0.25 * base
    luma = 0.299 * base[0] + 0.587 * base[1] + 0.114 * base[2]
    second = base * 0.45 if luma > 150 else base * 0.45 + 255 * 0.55
    t = _texture_amount(obj.texture, u, v)[..., None]
    shade = (1.0 - 0.10 * np.clip(v, -1, 1))[..., None]  # soft light from above
    return np.clip((base * (1 - t) + second * t) * shade, 0, 255)


def render_scene(scene: Scene, background: np.ndarray | None = None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[int]]:
    """Pixels of a scene: (rgb uint8 [S,S,3], mask uint8 [S,S], depth uint8 [S,S],
    visible pixel count per object). `background` reuses a `render_background`."""
    s = scene.image_size
    bg = render_background(scene) if background is None else background
    img = bg.copy()
    mask = np.zeros((s, s), np.uint8)
    depth = np.full((s, s), 255, np.uint8)
    stroke = max(1.0, s / 48) if scene.style == "sketch" else 0.0
    for i in scene.draw_order():
        o = scene.objects[i]
        width = stroke if scene.style == "sketch" else float(o.outline)
        fill, edge = shapes.coverage(o.category, o.cx, o.cy, o.radius, o.angle, s, edge_width=width)
        a = fill[..., None]
        if scene.style == "sketch":
            img = img * (1 - a) + bg * a  # unfilled paper hides what is behind
        else:
            img = img * (1 - a) + object_colour(o, s) * a
        if edge is not None:
            e = edge[..., None]
            img = img * (1 - e) + (SKETCH_INK if scene.style == "sketch" else OUTLINE_INK) * e
        inside = fill >= 0.5
        mask[inside] = i + 1
        depth[inside] = depth_code(o.depth)
    visible = np.bincount(mask.ravel(), minlength=len(scene.objects) + 1)[1:].tolist()
    rgb = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return rgb, mask, depth, [int(v) for v in visible]


def render_visible(scene: Scene, *, min_pixels: int, keep_primary: bool = True
                   ) -> tuple[Scene, np.ndarray, np.ndarray, np.ndarray, list[int]]:
    """Render, drop objects showing fewer than `min_pixels` pixels, render again.

    Afterwards every object of the returned scene is visible in the mask, so
    counts and mask ids agree with the scene graph.
    """
    rgb, mask, depth, vis = render_scene(scene)
    keep = [i for i, v in enumerate(vis) if v >= min_pixels or (keep_primary and i == 0)]
    if len(keep) < len(scene.objects):
        scene = scene.copy()
        scene.objects = [scene.objects[i] for i in keep]
        rgb, mask, depth, vis = render_scene(scene)
    return scene, rgb, mask, depth, vis


def object_bbox(mask: np.ndarray, obj_id: int) -> list[int]:
    """[x0, y0, x1, y1] (exclusive end) of one id in the mask, or zeros if absent."""
    ys, xs = np.nonzero(mask == obj_id)
    if len(xs) == 0:
        return [0, 0, 0, 0]
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]
