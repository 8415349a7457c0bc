"""What a stage's `run(cfg, out)` returns to the stage runner (peflow.runner)."""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass
class Result:
    """What a stage's `run` returns (rank 0; other ranks return None).

    Attributes:
        metrics: flat name -> number; written to metrics.json and logged to MLflow.
        counts: sample counts and the like, for the manifest.
        resolved: resolved settings (a preset's budget, the checkpoint found) for the manifest.
        model: a torch module to log as an MLflow model and register (stages with `model_name`).
        artifacts: files in the output folder to log (default: every .png and .json).
        tags: extra MLflow tags of the stage run.
    """

    metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    counts: dict[str, Any] = dataclasses.field(default_factory=dict)
    resolved: dict[str, Any] = dataclasses.field(default_factory=dict)
    model: Any = None
    artifacts: tuple[str, ...] | None = None
    tags: dict[str, str] = dataclasses.field(default_factory=dict)
