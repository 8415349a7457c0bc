"""Rank-0 reporting of a training run: per-step metrics to MLflow, final numbers, the loss plot."""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any


#: Per-step history keys logged to MLflow as metrics (name in MLflow: `train/<key>`).
STEP_METRICS = ("loss", "clip_loss", "mask_reg_loss", "lr", "logit_scale", "resolution", "samples_per_s",
                "model_flops_per_s")


class StepLogger:
    """Buffers per-step rows and sends them to MLflow in batches."""

    def __init__(self, run: Any, every: int = 25) -> None:
        self.run_id, self.every, self.rows = run.info.run_id, every, []

    def __call__(self, row: Mapping[str, Any]) -> None:
        self.rows.append(dict(row))
        if len(self.rows) >= self.every:
            self.flush()

    def flush(self) -> None:
        if not self.rows:
            return
        from mlflow import MlflowClient
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(f"train/{k}", float(r[k]), now, int(r["step"])) for r in self.rows for k in STEP_METRICS
                   if k in r]
        client = MlflowClient()
        for i in range(0, len(metrics), 1000):
            client.log_batch(self.run_id, metrics=metrics[i:i + 1000])
        self.rows = []


def final_metrics(history: list[dict[str, Any]], tail: int = 10) -> dict[str, float]:
    """Flat final numbers: loss over the last steps, throughput (median, first step excluded)."""
    last = history[-tail:]
    timed = history[1:] or history
    return {
        "train/final_loss": statistics.fmean(r["loss"] for r in last),
        "train/final_clip_loss": statistics.fmean(r["clip_loss"] for r in last),
        "train/final_logit_scale": history[-1]["logit_scale"],
        "train/samples_per_s": statistics.median(r["samples_per_s"] for r in timed),
        "train/model_flops_per_s": statistics.median(r["model_flops_per_s"] for r in timed),
        "train/steps": float(len(history)),
        "train/seconds": sum(r["step_s"] for r in history),
    }


def loss_plot(history: list[dict[str, Any]], path: Path) -> None:
    from peflow.plots import pyplot, save

    plt = pyplot()

    steps = [r["step"] for r in history]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [r["loss"] for r in history], label="total", lw=1)
    if all("clip_loss" in r for r in history):
        ax.plot(steps, [r["clip_loss"] for r in history], label="CLIP", lw=1)
    if any(r.get("mask_reg_loss") for r in history):
        ax.plot(steps, [r["mask_reg_loss"] for r in history], label="mask regularization", lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    save(fig, path)
