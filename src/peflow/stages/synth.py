"""Generate the built-in corpus: a procedural world whose ground truth makes
every PE task measurable, written in the formats real data comes in.

Outputs (layout reference: docs/corpus.md):
  OUT/image/<split>/shard-*.tar   WebDataset image-text shards (jpg, txt, json,
                                  mask.png, depth.png): train, val, test and the
                                  shift splits shift_sketch, shift_rendition,
                                  shift_clutter, shift_pose
  OUT/video/<split>/shard-*.tar   PE Video Dataset layout (mp4, json, masks.npy)
  OUT/card.json, OUT/card.md      dataset card; OUT/metrics.json sample counts
  OUT/manifest.json

Same preset, seed and overrides => byte-identical shards and card.json, with
any number of workers.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from peflow.config import opt
from peflow.stages.base import Result

if TYPE_CHECKING:
    from peflow.data.synth.presets import CorpusPreset


@dataclass(kw_only=True)
class Config:
    """Options of `peflow synth`."""

    out: str = opt("", "Output folder (replaced atomically when generation completes).")
    corpus: str = opt("nano", "Corpus size preset.", choices=lambda: sorted(_presets().PRESETS))
    seed: int = opt(0, "Random seed; the same seed gives byte-identical shards.")
    image_size: int | None = opt(None, "Override the corpus preset's image and video side in pixels (even).", min=8)
    num_frames: int | None = opt(None, "Override the corpus preset's frames per video.", min=2)
    human_caption_fraction: float | None = opt(None, "Override the fraction of train videos with a human caption (held-out videos always have one).", min=0.0)
    workers: int | None = opt(None, "Worker processes (default: all CPUs); does not change the output.", min=1,
                              key=False)

    def validate(self) -> None:
        corpus_preset(self)


def _presets():  # noqa: ANN202  (the corpus preset module, imported when needed)
    from peflow.data.synth import presets

    return presets


def corpus_preset(cfg: Config) -> CorpusPreset:
    """The corpus preset named by `cfg` with its overrides applied and checked."""
    p = _presets().get(cfg.corpus)
    changes = {k: getattr(cfg, k) for k in ("image_size", "num_frames", "human_caption_fraction")
               if getattr(cfg, k) is not None}
    p = dataclasses.replace(p, **changes)
    p.validate()
    return p


def run(cfg: Config, out: Path) -> Result:
    """Generate the corpus into `out` (the runner's staging folder)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from peflow.data.synth.generate import generate, write_card

    p = corpus_preset(cfg)
    workers = cfg.workers if cfg.workers is not None else (os.cpu_count() or 1)
    columns = (TextColumn("{task.description:<22}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    # Everything written is a function of (preset, seed): no timings, no worker count.
    with Progress(*columns, transient=False) as progress:
        result = generate(out, p, seed=cfg.seed, workers=workers, progress=progress)
        write_card(out, p, cfg.seed, result)
    counts = {f"{kind}/{split}": n for kind, splits in result["counts"].items() for split, n in splits.items()}
    metrics = {f"synth/{kind}s": sum(splits.values()) for kind, splits in result["counts"].items()}
    speed = result["speed"]
    progress.console.print(f"synth: {speed['images_per_s']} images/s, {speed['videos_per_s']} videos/s "
                           f"with {workers} worker(s) -> {cfg.out}")
    # Speed as tags, not metrics: it is not reproducible.
    return Result(metrics=metrics, counts=counts, resolved={"resolved": dataclasses.asdict(p)},
                  artifacts=("card.md",), tags={f"speed.{k}": str(v) for k, v in speed.items()})
