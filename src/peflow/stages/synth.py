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

from peflow.config import opt, req

if TYPE_CHECKING:
    from peflow.data.synth.presets import CorpusPreset


@dataclass(kw_only=True)
class Config:
    """Options of `peflow synth`."""

    out: str = req("Output folder (replaced atomically when generation completes).")
    preset: str = opt("nano", "Corpus size: test, nano, small or full.")
    seed: int = opt(0, "Random seed; the same seed gives byte-identical shards.")
    image_size: int | None = opt(None, "Override the preset's image and video side in pixels (even).")
    num_frames: int | None = opt(None, "Override the preset's frames per video.")
    human_caption_fraction: float | None = opt(None, "Override the fraction of videos with a human caption.")
    workers: int | None = opt(None, "Worker processes (default: all CPUs); does not change the output.")


def corpus_preset(cfg: Config) -> CorpusPreset:
    """The preset named by `cfg` with its overrides applied and checked."""
    from peflow.data.synth import presets

    p = presets.get(cfg.preset)
    changes = {k: getattr(cfg, k) for k in ("image_size", "num_frames", "human_caption_fraction")
               if getattr(cfg, k) is not None}
    p = dataclasses.replace(p, **changes)
    p.validate()
    return p


def run(cfg: Config) -> Path:
    """Generate the corpus into `cfg.out`; returns that path."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from peflow.data.synth.generate import generate, write_card
    from peflow.io import atomic_output_dir, write_json_atomic, write_manifest

    p = corpus_preset(cfg)
    workers = cfg.workers if cfg.workers is not None else (os.cpu_count() or 1)
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    columns = (TextColumn("{task.description:<22}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    # Everything written is a function of (preset, seed): no timings, no worker count.
    config = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "workers"}
    with atomic_output_dir(cfg.out) as out, Progress(*columns, transient=False) as progress:
        result = generate(out, p, seed=cfg.seed, workers=workers, progress=progress)
        write_card(out, p, cfg.seed, result)
        counts = {f"{kind}/{split}": n for kind, splits in result["counts"].items() for split, n in splits.items()}
        metrics = {f"synth/{kind}s": sum(splits.values()) for kind, splits in result["counts"].items()}
        write_json_atomic(out / "metrics.json", metrics)
        write_manifest(out, stage="synth", config={**config, "resolved": dataclasses.asdict(p)}, counts=counts)
    speed = result["speed"]
    progress.console.print(f"synth: {speed['images_per_s']} images/s, {speed['videos_per_s']} videos/s "
                           f"with {workers} worker(s) -> {cfg.out}")
    _log_mlflow(cfg, config, metrics, speed)
    return Path(cfg.out)


def _log_mlflow(cfg: Config, config: dict, metrics: dict[str, float], speed: dict[str, float]) -> None:
    """The stage's MLflow run: counts as metrics (as in metrics.json); speed as tags (not reproducible)."""
    import mlflow

    from peflow.tracking import stage_run

    with stage_run("synth", out_dir=cfg.out, config=config,
                   tags={f"speed.{k}": str(v) for k, v in speed.items()}):
        mlflow.log_metrics(metrics)
        mlflow.log_artifact(str(Path(cfg.out) / "card.md"))
