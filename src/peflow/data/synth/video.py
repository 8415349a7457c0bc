"""Videos of objects acting: trajectories per action class, per-frame
rendering with instance masks, and H.264 encoding with PyAV.

One primary object (the actor, `objects[0]`, nearest to the camera) performs
the video's action; 0-2 static distractors sit behind it, placed off its
path so that every object is visible in every frame.
"""

from __future__ import annotations

import io
from fractions import Fraction
from typing import Any

import numpy as np

from peflow.data.synth import vocab
from peflow.data.synth.render import object_bbox, render_background, render_scene
from peflow.data.synth.scenes import size_of
from peflow.data.synth.world import (
    Scene, SceneObject, pick, place_secondary, sample_background, sample_colour, sample_object,
)


def _motion(rng: np.random.Generator, action: str, s: int) -> dict[str, float]:
    """Start state and per-action parameters (fractions of the side `s`, degrees)."""
    m = {"cx": rng.uniform(0.4, 0.6), "cy": rng.uniform(0.4, 0.6), "r0": rng.uniform(0.15, 0.19), "r1": 0.0,
         "dx": 0.0, "dy": 0.0, "turn": 0.0, "amp": 0.0, "direction": 1.0}
    m["r1"] = m["r0"]
    span = rng.uniform(0.38, 0.46)
    if action in ("move left", "move right"):
        m["dx"] = span if action == "move right" else -span
        m["cx"], m["cy"] = 0.5 - m["dx"] / 2, rng.uniform(0.3, 0.7)
    elif action in ("move up", "move down"):
        m["dy"] = span if action == "move down" else -span
        m["cx"], m["cy"] = rng.uniform(0.3, 0.7), 0.5 - m["dy"] / 2
    elif action == "rotate":
        m["direction"] = float(rng.choice([-1.0, 1.0]))
        m["turn"] = m["direction"] * rng.uniform(150, 300)
    elif action in ("grow", "shrink"):
        small, big = rng.uniform(0.09, 0.12), rng.uniform(0.27, 0.32)
        m["r0"], m["r1"] = (small, big) if action == "grow" else (big, small)
    elif action == "bounce":
        m["cy"], m["amp"] = rng.uniform(0.62, 0.7), rng.uniform(0.24, 0.3)
    elif action == "shake":
        m["amp"] = rng.uniform(0.07, 0.1)
    return {k: float(v) for k, v in m.items()}


def actor_at(base: SceneObject, action: str, m: dict[str, float], t: float, s: int,
             rgb0: np.ndarray, rgb1: np.ndarray) -> SceneObject:
    """The actor's state at time t in [0, 1]."""
    o = SceneObject(**{**base.__dict__})
    o.cx = (m["cx"] + m["dx"] * t) * s
    o.cy = (m["cy"] + m["dy"] * t) * s
    o.radius = (m["r0"] + (m["r1"] - m["r0"]) * t) * s
    o.angle = base.angle + m["turn"] * t
    if action == "bounce":
        o.cy -= m["amp"] * abs(np.sin(2 * np.pi * t)) * s
    elif action == "shake":
        o.cx += m["amp"] * np.sin(2 * np.pi * 3 * t) * s
    if action == "change colour":
        w = float(np.clip((t - 0.25) / 0.5, 0, 1))
        o.rgb = tuple(float(c) for c in rgb0 * (1 - w) + rgb1 * w)
    return o


def sample_video(rng: np.random.Generator, action: str, s: int, num_frames: int,
                 min_pixels: int) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """One video: (json record without text/QA, frames uint8 [T,S,S,3], masks uint8 [T,S,S])."""
    kind = pick(rng, vocab.BACKGROUNDS)
    scene = Scene(s, kind, sample_background(rng, kind), int(rng.integers(2**31)))
    cats = [c for c in vocab.CATEGORIES if not (action == "rotate" and c in vocab.ROUND_CATEGORIES)]
    base = sample_object(rng, image_size=s, size="medium", category=pick(rng, cats), bg=scene.bg_colours,
                         textures=vocab.TEXTURES[1:] if action == "rotate" else vocab.TEXTURES, depth=0.2)
    m = _motion(rng, action, s)
    end_colour = base.colour
    if action == "change colour":
        end_colour = sample_colour(rng, vocab.COLOURS, scene.bg_colours, avoid={base.colour})
    rgb0 = np.array(vocab.COLOURS[base.colour], np.float32)
    rgb1 = np.array(vocab.COLOURS[end_colour], np.float32)
    times = np.linspace(0.0, 1.0, num_frames)
    # ghosts of the actor along its path keep distractors out of its way
    ghosts = Scene(s, kind, scene.bg_colours, 0, [actor_at(base, action, m, t, s, rgb0, rgb1) for t in times[::2]])
    distractors = []
    used = {base.category}
    for _ in range(int(rng.integers(0, 3))):
        cat = pick(rng, [c for c in vocab.CATEGORIES if c not in used])
        o = sample_object(rng, image_size=s, size="small", category=cat, bg=scene.bg_colours,
                          depth=float(rng.uniform(0.5, 0.85)))
        if place_secondary(rng, ghosts, o, overlap=0.0, tries=20):
            ghosts.objects.append(o)
            distractors.append(o)
            used.add(cat)
    bg = render_background(scene)
    frames, masks, vis_min = [], [], None
    for t in times:
        scene.objects = [actor_at(base, action, m, t, s, rgb0, rgb1), *distractors]
        rgb, mask, _, vis = render_scene(scene, background=bg)
        frames.append(rgb)
        masks.append(mask)
        vis_min = vis if vis_min is None else [min(a, b) for a, b in zip(vis_min, vis)]
    if any(v < min_pixels for v in vis_min[1:]):  # a distractor got hidden: drop it, render again
        keep = [d for d, v in zip(distractors, vis_min[1:]) if v >= min_pixels]
        frames, masks = [], []
        for t in times:
            scene.objects = [actor_at(base, action, m, t, s, rgb0, rgb1), *keep]
            rgb, mask, _, _ = render_scene(scene, background=bg)
            frames.append(rgb)
            masks.append(mask)
        distractors = keep
    masks_arr = np.stack(masks)
    first = actor_at(base, action, m, 0.0, s, rgb0, rgb1)
    last = actor_at(base, action, m, 1.0, s, rgb0, rgb1)
    objects = []
    for i, o in enumerate([first, *distractors]):
        objects.append({"category": o.category, "colour": o.colour, "size": o.size, "texture": o.texture,
                        "bbox": object_bbox(masks_arr[0], i + 1), "position": o.position(s),
                        "depth": round(o.depth, 3), "role": "actor" if i == 0 else "distractor"})
    objects[0].update(size=size_of(first.radius / s), end_size=size_of(last.radius / s), end_colour=end_colour,
                      end_position=last.position(s), end_bbox=object_bbox(masks_arr[-1], 1))
    record = {"category": action, "label_id": vocab.ACTIONS.index(action), "objects": objects,
              "background": kind, "num_frames": num_frames, "width": s, "height": s,
              "motion": {"direction": m["direction"]}}
    return record, np.stack(frames), masks_arr


def rgb_to_yuv420p(rgb: np.ndarray) -> np.ndarray:
    """BT.601 limited-range planar YUV 4:2:0, laid out as PyAV's `yuv420p` ndarray [H*3/2, W].

    Done here rather than by the encoder's implicit conversion, which gave
    run-to-run byte differences."""
    h, w, _ = rgb.shape
    r, g, b = (rgb[..., i].astype(np.float32) for i in range(3))
    y = 16 + (65.481 * r + 128.553 * g + 24.966 * b) / 255
    cb = 128 + (-37.797 * r - 74.203 * g + 112.0 * b) / 255
    cr = 128 + (112.0 * r - 93.786 * g - 18.214 * b) / 255
    sub = lambda c: c.reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3))  # noqa: E731
    planes = [y.ravel(), sub(cb).ravel(), sub(cr).ravel()]
    return np.clip(np.rint(np.concatenate(planes)), 0, 255).astype(np.uint8).reshape(h * 3 // 2, w)


def encode_mp4(frames: np.ndarray, fps: int, crf: int = 18) -> bytes:
    """H.264 (libx264, yuv420p) mp4 bytes of uint8 [T,H,W,3] frames; H and W must be even.

    Single-threaded with bit-exact flags so the same frames give the same bytes."""
    import av

    t, h, w, _ = frames.shape
    if h % 2 or w % 2:
        raise ValueError(f"H.264 yuv420p needs an even frame size, got {w}x{h}")
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4", options={"fflags": "+bitexact"}) as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        # single-threaded and no macroblock-tree: with either, x264 gave run-to-run byte differences
        stream.options = {"crf": str(crf), "preset": "veryfast",
                          "x264-params": "threads=1:lookahead-threads=1:mbtree=0"}
        stream.codec_context.thread_count = 1
        stream.codec_context.flags |= av.codec.context.Flags.bitexact
        for i, f in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(rgb_to_yuv420p(f), format="yuv420p")
            frame.pts, frame.time_base = i, Fraction(1, fps)  # explicit timestamps: x264's rate control reads them
            for pkt in stream.encode(frame):
                container.mux(pkt)
        for pkt in stream.encode():
            container.mux(pkt)
    return buf.getvalue()
