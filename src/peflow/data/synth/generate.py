"""Writing the whole corpus: every split's shards (in parallel worker
processes, written in order), the dataset card and the speed numbers."""

from __future__ import annotations

import json
import multiprocessing as mp
import sys
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path
from typing import Any

from peflow.data.synth import vocab
from peflow.data.synth.presets import CorpusPreset
from peflow.data.synth.samples import make_chunk
from peflow.data.synth.writers import ShardWriter

CHUNK = {"image": 50, "video": 8}


def _jobs(kind: str, seed: int, split: str, n: int, p: CorpusPreset) -> list[tuple]:
    step = CHUNK[kind]
    return [(kind, seed, split, i, min(n, i + step), p) for i in range(0, n, step)]


def _run_jobs(jobs: list[tuple], pool: ProcessPoolExecutor | None, window: int) -> Iterator[list]:
    """Chunk results in job order (so shard bytes do not depend on scheduling), at most
    `window` chunks in flight (so memory stays bounded on big presets)."""
    if pool is None:
        yield from map(make_chunk, jobs)
        return
    pending: deque[Future] = deque()
    for job in jobs:
        pending.append(pool.submit(make_chunk, job))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _mp_context() -> mp.context.BaseContext:
    """fork when it is safe (fast, no `__main__` guard needed); spawn once torch (and its
    thread pools) is loaded in this process, where forking can deadlock."""
    if "torch" not in sys.modules and "fork" in mp.get_all_start_methods():
        return mp.get_context("fork")
    return mp.get_context("spawn")


def generate(out: Path, p: CorpusPreset, *, seed: int, workers: int, progress: Any = None) -> dict[str, Any]:
    """Write `out/image/<split>/` and `out/video/<split>/` shards; returns counts and timings.

    `progress` is an optional rich `Progress`; one task per split."""
    parts = [("image", s, n) for s, n in p.image_counts().items()]
    parts += [("video", s, n) for s, n in p.video_counts().items()]
    tasks = {(k, s): progress.add_task(f"{k} {s}", total=n, start=False) for k, s, n in parts} if progress else {}
    counts: dict[str, dict[str, int]] = {"image": {}, "video": {}}
    shards: dict[str, dict[str, int]] = {"image": {}, "video": {}}
    seconds = {"image": 0.0, "video": 0.0}
    pool = None
    if workers > 1:
        pool = ProcessPoolExecutor(max_workers=workers, mp_context=_mp_context())
    try:
        for kind, split, n in parts:
            start = time.perf_counter()
            if progress:
                progress.start_task(tasks[(kind, split)])
            maxcount = p.images_per_shard if kind == "image" else p.videos_per_shard
            with ShardWriter(out / kind / split, maxcount) as writer:
                for chunk in _run_jobs(_jobs(kind, seed, split, n, p), pool, 4 * workers):
                    for key, entries in chunk:
                        writer.write(key, entries)
                    if progress:
                        progress.advance(tasks[(kind, split)], len(chunk))
            seconds[kind] += time.perf_counter() - start
            counts[kind][split] = n
            shards[kind][split] = len(writer.shards)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    n_img, n_vid = sum(counts["image"].values()), sum(counts["video"].values())
    speed = {
        "image_seconds": round(seconds["image"], 3), "video_seconds": round(seconds["video"], 3),
        "images_per_s": round(n_img / seconds["image"], 2) if seconds["image"] else 0.0,
        "videos_per_s": round(n_vid / seconds["video"], 2) if seconds["video"] else 0.0,
    }
    return {"counts": counts, "shards": shards, "speed": speed}


def card(p: CorpusPreset, seed: int, result: dict[str, Any]) -> dict[str, Any]:
    """The dataset card (deterministic: no timings; speed goes to the console and MLflow)."""
    return {
        "name": "peflow-synth",
        "preset": p.name,
        "seed": seed,
        "image_size": p.image_size,
        "video": {"num_frames": p.num_frames, "fps": p.fps, "width": p.image_size, "height": p.image_size,
                  "codec": "h264", "pix_fmt": "yuv420p"},
        "splits": result["counts"],
        "shards": result["shards"],
        "shard_size": {"image": p.images_per_shard, "video": p.videos_per_shard},
        "human_caption_fraction": p.human_caption_fraction,
        "categories": list(vocab.CATEGORIES),
        "actions": list(vocab.ACTIONS),
        "colours": {k: list(v) for k, v in vocab.COLOURS.items()},
        "typical_colours": dict(vocab.TYPICAL_COLOUR),
        "typical_colour_p": vocab.TYPICAL_COLOUR_P,
        "rendition_colours": {k: list(v) for k, v in vocab.RENDITION_COLOURS.items()},
        "sizes": list(vocab.SIZES),
        "textures": list(vocab.TEXTURES),
        "rendition_textures": list(vocab.RENDITION_TEXTURES),
        "positions": list(vocab.POSITIONS),
        "backgrounds": list(vocab.BACKGROUNDS),
        "shift_backgrounds": list(vocab.SHIFT_BACKGROUNDS),
        "shifts": {
            "shift_sketch": "line drawing: outlines only, white background, no fill (ImageNet-Sketch)",
            "shift_rendition": "unusual palette and textures, thick cartoon outlines (ImageNet-R)",
            "shift_clutter": "many distractors, some occluding the primary (ImageNet-A / ObjectNet)",
            "shift_pose": "unusual rotation, scale, placement and background (ObjectNet)",
        },
        "label": "image: category of objects[0], the primary (largest) object; video: the actor's action",
        "mask_ids": "0 = background, i = objects[i-1] in the sample json",
        "depth": "uint8, round(255 * depth) of the nearest object; background 255 (far)",
    }


def card_markdown(c: dict[str, Any]) -> str:
    """card.md: the card for people (deterministic, like everything in the corpus)."""
    rows = [f"| image | {s} | {n} |" for s, n in c["splits"]["image"].items()]
    rows += [f"| video | {s} | {n} |" for s, n in c["splits"]["video"].items()]
    return "\n".join([
        f"# peflow-synth corpus (preset `{c['preset']}`, seed {c['seed']})", "",
        "Procedurally generated by `peflow synth`; format reference: docs/corpus.md.", "",
        f"- image size: {c['image_size']} px; videos: {c['video']['num_frames']} frames at {c['video']['fps']} fps",
        f"- human captions on {c['human_caption_fraction']:.0%} of train videos and on every held-out video",
        f"- categories ({len(c['categories'])}): {', '.join(c['categories'])}",
        f"- actions ({len(c['actions'])}): {', '.join(c['actions'])}",
        f"- colours: {', '.join(c['colours'])}; rendition colours: {', '.join(c['rendition_colours'])}",
        f"- textures: {', '.join(c['textures'])}; rendition textures: {', '.join(c['rendition_textures'])}",
        f"- backgrounds: {', '.join(c['backgrounds'])}; shift backgrounds: {', '.join(c['shift_backgrounds'])}",
        "", "| kind | split | samples |", "|---|---|---|", *rows, "",
        "## Shift splits", "", *[f"- `{k}`: {v}" for k, v in c["shifts"].items()], "",
    ])


def write_card(out: Path, p: CorpusPreset, seed: int, result: dict[str, Any]) -> dict[str, Any]:
    c = card(p, seed, result)
    (out / "card.json").write_text(json.dumps(c, indent=2, sort_keys=True) + "\n")
    (out / "card.md").write_text(card_markdown(c))
    return c
