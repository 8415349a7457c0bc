"""Rank-0 reporting of a pretraining run: MLflow run, per-step metrics, final outputs.

The final outputs land in the stage's folder atomically (model, history,
loss plot, metrics.json, manifest.json); the same final numbers go to MLflow
with the model (as an MLflow model), the last checkpoint and the loss plot.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import statistics
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

#: Per-step history keys logged to MLflow as metrics (name in MLflow: `train/<key>`).
STEP_METRICS = ("loss", "clip_loss", "mask_reg_loss", "lr", "logit_scale", "resolution", "samples_per_s",
                "model_flops_per_s")


@contextlib.contextmanager
def tracked_run(cfg: Any, *, config: Mapping[str, Any], plan: Mapping[str, Any], inputs: Mapping[str, str]
                ) -> Iterator[Any]:
    """The stage's MLflow run (via peflow.tracking), with the resolved plan and data hash added."""
    from peflow import tracking

    if cfg.tracking_uri:
        os.environ["MLFLOW_TRACKING_URI"] = cfg.tracking_uri
    with tracking.stage_run("pretrain", out_dir=cfg.out, config=config, inputs=inputs, datasets={"data": cfg.data},
                            experiment=cfg.experiment, tags={"peflow.recipe": cfg.recipe,
                                                             "peflow.preset": cfg.preset}) as run:
        import mlflow

        resolved = {f"plan.{k}": str(v) for k, v in plan.items() if k not in ("data", "ckpt_dir")}
        mlflow.log_params({**resolved, "data_digest": inputs["data"]})
        yield run


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
        metrics = [Metric(f"train/{k}", float(r[k]), now, int(r["step"])) for r in self.rows for k in STEP_METRICS]
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
    ax.plot(steps, [r["clip_loss"] for r in history], label="CLIP", lw=1)
    if any(r["mask_reg_loss"] for r in history):
        ax.plot(steps, [r["mask_reg_loss"] for r in history], label="mask regularization", lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    save(fig, path)


def finish(cfg: Any, plan: Any, model: torch.nn.Module, history: list[dict[str, Any]], *,
           config: Mapping[str, Any], inputs: Mapping[str, str], run_info: Any) -> dict[str, float]:
    """Zero-shot check, then write OUT atomically and log metrics and artifacts to MLflow."""
    import mlflow

    from peflow.io import atomic_output_dir, write_json_atomic, write_manifest
    from peflow.models.pe import get_tokenizer, save_model
    from peflow.train import checkpoint as ckpt
    from peflow.train.loop import HISTORY
    from peflow.train.zeroshot import zeroshot_check

    model = model.float().cpu().eval()
    metrics = final_metrics(history)
    splits = [s.strip() for s in cfg.eval_splits.split(",") if s.strip()]
    if splits:
        metrics.update(zeroshot_check(model, get_tokenizer(plan.preset), plan.data, splits,
                                      resolution=plan.resolutions[-1][0]))
    with atomic_output_dir(cfg.out) as out:
        save_model(model, out, extra={"stage": "pretrain", "recipe": cfg.recipe, "steps": plan.steps})
        shutil.copyfile(plan.ckpt_dir / HISTORY, out / HISTORY)
        loss_plot(history, out / "loss.png")
        write_json_atomic(out / "metrics.json", metrics)
        write_manifest(out, stage="pretrain", config=config, inputs=inputs,
                       counts={"steps": plan.steps, "samples_seen": plan.steps * plan.global_batch})
    out = Path(cfg.out)
    mlflow.log_metrics(metrics)
    mlflow.log_artifact(str(out / "loss.png"))
    mlflow.log_artifact(str(out / "metrics.json"))
    last = ckpt.latest(plan.ckpt_dir)
    if last is not None:
        mlflow.log_artifacts(str(last), artifact_path="checkpoint")
    if cfg.log_model:
        _log_model(model, out)
    return metrics


def _log_model(model: torch.nn.Module, out: Path) -> None:
    """The model as an MLflow pytorch model: pickled (pt2 export would trace the model), requirements
    pinned (no environment inference, offline). Registered as a new version of `peflow-core` (alias
    `candidate`) tagged with the digest of `out`, the checkpoint digest `peflow evaluate` computes;
    without a model registry it warns and goes on."""
    import mlflow

    from peflow import registry
    from peflow.io import dataset_digest

    card = json.loads((out / "model.json").read_text())
    info = mlflow.pytorch.log_model(model, name="model", serialization_format="pickle",
                                    pip_requirements=["torch", "open_clip_torch", "timm"],
                                    metadata={"peflow_preset": str(card.get("preset"))})
    run = mlflow.active_run()
    tags = {registry.DIGEST_TAG: dataset_digest(out), "peflow.preset": str(card.get("preset")),
            "peflow.recipe": str(card.get("recipe")), "peflow.run_id": run.info.run_id if run else ""}
    try:
        version = registry.register(info.model_uri, registry.MODEL_NAMES["pretrain"], tags=tags)
        registry.set_candidate(version.name, version.version)
    except Exception as e:  # noqa: BLE001 -- the model is trained and saved: never fail the stage here
        import warnings

        # A warning, not logging: importing mlflow.pytorch calls logging.basicConfig(level=ERROR).
        warnings.warn(f"model not registered ({type(e).__name__}: {e}); the training output is complete",
                      stacklevel=2)
