"""Video finetuning of PE-core (paper section 2.2, Tab. 19): from the pretrain checkpoint, each
clip's `frames` uniformly sampled frames are encoded and averaged into one embedding, and the
CLIP loss pairs it with the clip's caption.

Which caption (`captions`): `engine`, the data engine's `model_caption` (the caption stage
through validate-captions), or `metadata`, the video's title and description: the paper's
Tab. 2 ablation, which `peflow run --engine-ablation` (the `engine_ablation` Param) runs
next to the main model under OUT/metadata/. `human` trains on the human captions (only the
videos that have one). Distributed like pretrain (`peflow launch finetune-video -j 2x1`):
every process runs this function, rank 0 writes the outputs.

Outputs:
  OUT/model.safetensors, OUT/model.json   the finetuned model (peflow.models.pe.load_model)
  OUT/history.jsonl, OUT/loss.png, OUT/metrics.json, OUT/manifest.json
  OUT.ckpt/step-*/                        resumable checkpoints
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peflow.config import opt
from peflow.stages.base import Result

CAPTIONS = ("engine", "metadata", "human")


def _recipes() -> list[str]:
    from peflow.train.recipe import RECIPES

    return sorted(RECIPES)


@dataclass(kw_only=True)
class Config:
    """Options of `peflow finetune-video`."""

    checkpoint: str = opt("", "PE-core model to finetune (the pretrain stage's output).")
    data: str = opt("", "Videos with engine captions (the validate-captions stage's output).")
    out: str = opt("", "Output folder for the finetuned model; checkpoints go to OUT.ckpt beside it.")
    captions: str = opt("engine", "Caption each clip is paired with: engine (model_caption), metadata (title + "
                                  "description) or human (only videos with a human caption).", choices=CAPTIONS)
    split: str = opt("train", "Video split to train on.")
    frames: int = opt(8, "Frames per clip, uniformly sampled and averaged.", min=1)
    recipe: str = opt("pe", "Optimizer and temperature settings of this pretraining recipe (pe: LAMB).",
                      choices=_recipes)
    steps: int = opt(200, "Optimizer steps.", min=1)
    global_batch: int = opt(32, "Clips per step over all processes.", min=1)
    lr: float = opt(2e-4, "Peak learning rate (warm-up, then cosine).", min=0.0)
    warmup_steps: int = opt(20, "Linear warm-up steps.", min=0)
    crop_scale_min: float = opt(0.8, "Smallest area fraction of the crop shared by a clip's frames.", min=0.05)
    seed: int = opt(0, "Seed of data order and crops.")
    checkpoint_every: int = opt(50, "Write a resumable checkpoint every N steps (and at the end).", min=1, key=False)
    keep_checkpoints: int = opt(2, "How many checkpoints to keep in OUT.ckpt.", min=1, key=False)
    threads: int = opt(0, "torch threads per process (0: torch's default).", min=0, key=False)
    log_model: bool = opt(True, "Log the model as an MLflow model and register it (peflow-video).", key=False)
    progress: bool = opt(True, "Show a progress bar (rank 0).", key=False)

    def validate(self) -> None:
        if not 0.05 <= self.crop_scale_min <= 1.0:
            raise ValueError(f"crop_scale_min must be in [0.05, 1], got {self.crop_scale_min}")


def clip_caption(meta: dict[str, Any], captions: str) -> str | None:
    """The text a clip is trained on, or None when it has none of that kind."""
    if captions == "engine":
        return meta.get("model_caption") or None
    if captions == "human":
        return meta.get("human_caption") or None
    from peflow.engine.clips import web_text

    return web_text(meta) or None


def run(cfg: Config, out: Path | None) -> Result | None:
    """Finetune (or resume) and write the model into `out` (rank 0; other ranks get None)."""
    import numpy as np
    import torch

    from peflow.config import InputError
    from peflow.engine.clips import read_clips
    from peflow.models.pe import resolve_checkpoint
    from peflow.train.checkpoint import ckpt_dir
    from peflow.train.objectives.video_clip import VideoClipObjective
    from peflow.train.recipe import get_recipe
    from peflow.train.trainer import TrainSettings, fit, init_distributed

    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    try:
        clips = read_clips(cfg.data, cfg.split, frames=cfg.frames)
    except FileNotFoundError as e:
        raise InputError(f"data {cfg.data}: {e}") from None
    pairs = [(c, clip_caption(c.meta, cfg.captions)) for c in clips]
    pairs = [(c, t) for c, t in pairs if t]
    if len(pairs) < cfg.global_batch:
        raise InputError(f"data {cfg.data}: {len(pairs)} {cfg.split} videos have a {cfg.captions} caption, fewer "
                         f"than one batch ({cfg.global_batch})")
    objective = VideoClipObjective(init_from=str(resolve_checkpoint(cfg.checkpoint)),
                                   frames=np.stack([c.frames for c, _ in pairs]), captions=[t for _, t in pairs],
                                   recipe=get_recipe(cfg.recipe), crop_scale=(cfg.crop_scale_min, 1.0))
    settings = TrainSettings(ckpt_dir=ckpt_dir(cfg.out or "out"), steps=cfg.steps, global_batch=cfg.global_batch,
                             lr=cfg.lr, warmup_steps=min(cfg.warmup_steps, cfg.steps), seed=cfg.seed,
                             checkpoint_every=cfg.checkpoint_every, keep_checkpoints=cfg.keep_checkpoints)
    dist = init_distributed()
    try:
        if dist.rank != 0:
            fit(objective, settings, dist, progress=False)
            return None
        import mlflow

        from peflow.train.report import StepLogger

        logger = StepLogger(mlflow.active_run())
        model, history = fit(objective, settings, dist, on_step=logger, progress=cfg.progress)
        logger.flush()
        return _finish(cfg, model, history, settings, out, len(pairs))
    finally:
        if dist.world_size > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _finish(cfg: Config, model: Any, history: list[dict[str, Any]], settings: Any, out: Path, n: int) -> Result:
    import shutil
    import statistics

    import mlflow

    from peflow.models.pe import save_model
    from peflow.train import checkpoint as ckpt
    from peflow.train.report import loss_plot
    from peflow.train.trainer import HISTORY

    model = model.float().cpu().eval()
    save_model(model, out, extra={"stage": "finetune-video", "captions": cfg.captions, "frames": cfg.frames,
                                  "steps": cfg.steps})
    shutil.copyfile(settings.ckpt_dir / HISTORY, out / HISTORY)
    loss_plot(history, out / "loss.png")
    last = ckpt.latest(settings.ckpt_dir)
    if last is not None:
        mlflow.log_artifacts(str(last), artifact_path="checkpoint")
    tail = history[-10:]
    metrics = {"train/final_loss": statistics.fmean(r["loss"] for r in tail),
               "train/first_loss": float(history[0]["loss"]),
               "train/clips_per_s": statistics.median(r["samples_per_s"] for r in (history[1:] or history)),
               "train/seconds": sum(r["step_s"] for r in history)}
    print(f"finetune-video ({cfg.captions} captions, {n} clips): loss {metrics['train/first_loss']:.3f} -> "
          f"{metrics['train/final_loss']:.3f} in {cfg.steps} steps -> {cfg.out}")
    return Result(metrics=metrics, counts={"clips": n, "steps": cfg.steps, "frames": cfg.frames},
                  model=model if cfg.log_model else None, artifacts=("loss.png", "metrics.json"),
                  tags={"peflow.captions": cfg.captions})
