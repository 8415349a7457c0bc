"""PE-core pretraining's entry to the trainer: the plan, and `train` = CLIP objective + `trainer.fit`.

The loop itself (processes, accumulation, autocast, checkpoints and exact resume, history,
progress, throughput) is `peflow.train.trainer`; the loss, data and model are
`peflow.train.objectives.clip.ClipObjective`. The names other modules import from here
(`init_distributed`, `Dist`, `HISTORY`) are the trainer's.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from peflow.train.objectives.clip import ClipObjective, flops_per_sample
from peflow.train.recipe import Recipe
from peflow.train.trainer import HISTORY, Dist, StepHook, TrainSettings, fit, init_distributed

__all__ = ["HISTORY", "Dist", "TrainPlan", "flops_per_sample", "init_distributed", "objective", "plan_dict",
           "train"]


@dataclass(kw_only=True)
class TrainPlan(TrainSettings):
    """Everything one pretraining run needs, resolved from the stage config, recipe and budget.

    The trainer's fields (ckpt_dir, steps, global_batch, micro_batch, lr, warmup_steps, seed,
    checkpoint_every, keep_checkpoints) come from `TrainSettings`.
    """

    data: Path
    preset: str
    recipe: Recipe
    #: architecture switches off the preset's (`ModelPreset.with_arch`: rope, pool)
    arch: dict[str, Any] = dataclasses.field(default_factory=dict)
    resolutions: list[tuple[int, float]]
    train_shards: str = ""  #: shards (local or s3://) to train on instead of data's train split
    init_from: str = ""
    compile: bool = False  #: torch.compile the forward + loss (`clip_forward`)


def objective(plan: TrainPlan, name: str = "pretrain") -> ClipObjective:
    """The CLIP + mask-regularization objective of `plan`."""
    return ClipObjective(data=plan.train_shards or plan.data, preset=plan.preset, arch=plan.arch, recipe=plan.recipe,
                         resolutions=plan.resolutions, init_from=plan.init_from, compile=plan.compile, name=name)


def train(plan: TrainPlan, dist: Dist, *, on_step: StepHook | None = None,
          progress: bool = True) -> tuple[torch.nn.Module, list[dict[str, Any]]]:
    """Run (or resume) `plan`; returns the trained model and the per-step history (rank 0: all steps)."""
    return fit(objective(plan), plan, dist, on_step=on_step, progress=progress)


def plan_dict(plan: TrainPlan) -> dict[str, Any]:
    """The plan as plain values (for params and the manifest)."""
    d = dataclasses.asdict(plan)
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in d.items()}
