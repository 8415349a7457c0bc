"""Shape geometry: unit outlines per category and anti-aliased coverage maps.

Outlines live in object-local coordinates (radius 1, y down, upright); an
object's centre, radius and angle place them in the image. Coverage is drawn
with PIL at a supersampled resolution inside the object's bounding box and
averaged down, which gives soft edges for the RGB image and a clean >= 0.5
threshold for the instance mask.
"""

from __future__ import annotations

import math
from functools import cache

import numpy as np

Polygon = np.ndarray  # [N, 2] float, local coordinates


def _ngon(n: int, r: float = 1.0, start_deg: float = -90.0, cx: float = 0.0, cy: float = 0.0) -> Polygon:
    t = np.deg2rad(start_deg) + 2 * np.pi * np.arange(n) / n
    return np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], axis=1)


def _star(points: int = 5, inner: float = 0.45) -> Polygon:
    t = np.deg2rad(-90.0) + np.pi * np.arange(2 * points) / points
    r = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return np.stack([r * np.cos(t), r * np.sin(t)], axis=1)


def _heart(n: int = 48) -> Polygon:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    return np.stack([x, y + 2.5], axis=1) / 16.5


@cache
def outline(category: str) -> tuple[tuple[Polygon, int], ...]:
    """The shape as polygons with a fill value (255 adds, 0 cuts a hole), drawn in order."""
    box = lambda x0, y0, x1, y1: np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=float)  # noqa: E731
    w = 0.34
    shapes: dict[str, tuple[tuple[Polygon, int], ...]] = {
        "circle": ((_ngon(48, 0.95), 255),),
        "square": ((box(-0.78, -0.78, 0.78, 0.78), 255),),
        "triangle": ((_ngon(3, 1.0, -90.0, 0.0, 0.18), 255),),
        "star": ((_star(), 255),),
        "hexagon": ((_ngon(6, 0.98, 0.0), 255),),
        "pentagon": ((_ngon(5, 0.98, -90.0, 0.0, 0.08), 255),),
        "cross": ((np.array([[-w, -1], [w, -1], [w, -w], [1, -w], [1, w], [w, w], [w, 1], [-w, 1],
                             [-w, w], [-1, w], [-1, -w], [-w, -w]], dtype=float), 255),),
        "heart": ((_heart(), 255),),
        "diamond": ((np.array([[0, -1], [0.62, 0], [0, 1], [-0.62, 0]], dtype=float), 255),),
        "ring": ((_ngon(48, 0.98), 255), (_ngon(40, 0.55), 0)),
        "crescent": ((_ngon(48, 0.95), 255), (_ngon(48, 0.8, cx=0.42, cy=-0.12), 0)),
        "arrow": ((np.array([[-1, -0.25], [0.15, -0.25], [0.15, -0.68], [1, 0], [0.15, 0.68],
                             [0.15, 0.25], [-1, 0.25]], dtype=float), 255),),
    }
    if category not in shapes:
        raise ValueError(f"unknown shape category {category!r}")
    return shapes[category]


def supersample(image_size: int) -> int:
    return 4 if image_size <= 96 else 3 if image_size <= 160 else 2


def coverage(category: str, cx: float, cy: float, radius: float, angle: float, image_size: int,
             *, edge_width: float = 0.0) -> tuple[np.ndarray, np.ndarray | None]:
    """Fill coverage [S,S] float32 in 0..1 and, if `edge_width` > 0, the coverage of an
    inner band of that width (pixels) along the shape's boundary."""
    from PIL import Image, ImageDraw, ImageFilter

    s, k = image_size, supersample(image_size)
    c, si = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    rot = np.array([[c, -si], [si, c]]) * radius
    polys = [(p @ rot.T + (cx, cy), v) for p, v in outline(category)]
    pts = np.concatenate([p for p, _ in polys])
    pad = 1 + int(math.ceil(edge_width))
    x0, y0 = (max(0, int(math.floor(v)) - pad) for v in pts.min(0))
    x1, y1 = (min(s, int(math.ceil(v)) + pad) for v in pts.max(0))
    fill = np.zeros((s, s), np.float32)
    edge = np.zeros((s, s), np.float32) if edge_width > 0 else None
    if x1 <= x0 or y1 <= y0:
        return fill, edge
    w, h = x1 - x0, y1 - y0
    canvas = Image.new("L", (w * k, h * k), 0)
    draw = ImageDraw.Draw(canvas)
    for p, v in polys:
        q = (p - (x0, y0)) * k
        draw.polygon([(float(a), float(b)) for a, b in q], fill=v)
    hi = np.asarray(canvas, dtype=np.float32)
    fill[y0:y1, x0:x1] = hi.reshape(h, k, w, k).mean(axis=(1, 3)) / 255.0
    if edge is not None:
        eroded_img = canvas
        for _ in range(max(1, int(round(edge_width * k)))):  # n 3x3 passes = (2n+1) square, cheaper
            eroded_img = eroded_img.filter(ImageFilter.MinFilter(3))
        eroded = np.asarray(eroded_img, dtype=np.float32)
        band = hi - eroded
        edge[y0:y1, x0:x1] = band.reshape(h, k, w, k).mean(axis=(1, 3)) / 255.0
    return fill, edge


@cache
def unit_area(category: str) -> float:
    """Area of the shape at radius 1 (holes subtracted; polygons of one shape do not overlap
    except holes inside the first)."""
    area = 0.0
    for p, v in outline(category):
        x, y = p[:, 0], p[:, 1]
        a = 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))
        area += a if v else -a
    return area
