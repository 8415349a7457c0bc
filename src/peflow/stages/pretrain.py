"""PE-core robust contrastive image pretraining (paper section 2.1).

`peflow pretrain --data CORPUS --out OUT [--recipe vanilla|pe]` trains a
PE-core CLIP model in this process; under torchrun (`peflow launch pretrain
-j 2x1 -- ...`, or `torchrun -m peflow.cli pretrain ...`) every process runs
the same function and rank 0 writes the outputs. The budget (steps, batch,
resolutions, lr) comes from the pipeline preset (`--preset`, peflow.presets).

Outputs:
  OUT/model.safetensors, OUT/model.json   the final model (peflow.models.pe.load_model)
  OUT/history.jsonl                       per-step loss, lr, logit scale, resolution, samples/s
  OUT/loss.png, OUT/metrics.json, OUT/manifest.json
  OUT.ckpt/step-*/                        resumable checkpoints (outlive a kill; rerun to resume)

MLflow (rank 0, through the stage runner): the config and resolved plan as
params, per-step metrics, the final metrics, the last checkpoint, the loss
plot, and the model as a version of `peflow-core`.
"""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peflow.config import opt
from peflow.stages.base import Result


def _model_presets() -> list[str]:
    from peflow.models.presets import MODEL_PRESETS

    return sorted(MODEL_PRESETS)


@dataclass(kw_only=True)
class Config:
    """Options of `peflow pretrain`."""

    data: str = opt("", "Corpus folder with image-text shards (a `peflow validate` output, or LAION-style shards).")
    out: str = opt("", "Output folder for the final model; checkpoints go to OUT.ckpt beside it.")
    model: str = opt("nano", "Model preset: nano, micro, small-cpu or an official size (T/S/B/L/G).",
                     choices=_model_presets)
    recipe: str = opt("pe", "Training recipe: `pe` (robust PE-core), `vanilla` (CLIP baseline), `pe-adamw` (PE with "
                            "AdamW for short runs), or vanilla plus pieces of PE's: "
                            "`vanilla+progressive+lamb+augment+mask_reg` is `pe`.")
    rope: bool = opt(True, "2D RoPE in the vision tower's attention (off: absolute position embedding only).")
    pool: str = opt("attn", "Image embedding: `attn` (attention pooling) or `cls` (the class token's output).",
                    choices=("attn", "cls"))
    steps: int = opt(2000, "Optimizer steps.", min=1)
    global_batch: int = opt(64, "Image-text pairs per step over all processes.", min=1)
    micro_batch: int = opt(0, "Rows per forward on each process; smaller than the local batch accumulates "
                              "gradients (0 = no accumulation).", min=0)
    lr: float | None = opt(None, "Peak learning rate (default: the recipe's).", min=0.0)
    plain_lr: float | None = opt(None, "Peak learning rate of the parameters LAMB does not adapt (biases, norms, "
                                       "embeddings, logit scale; default: --lr).", min=0.0)
    warmup_steps: int | None = opt(None, "Linear warm-up steps (default: the recipe's fraction of steps).", min=0)
    seed: int = opt(0, "Seed of initialisation, data order, augmentation and masks.")
    resolutions: str = opt("48:0.5,64:0.5", "Progressive resolution as RES:FRACTION,... e.g. 32:0.4,48:0.35,64:0.25 "
                                            "(empty: the model's image size).")
    crop_scale_min: float | None = opt(None, "Smallest random-crop area fraction (default: the recipe's, 0.08).",
                                       min=0.0)
    mask_reg_fraction: float | None = opt(None, "Share of each batch duplicated and 40%-masked for mask "
                                                "regularization (default: recipe's, 1/16; 0 = off).", min=0.0)
    mask_reg_weight: float | None = opt(None, "Weight of the mask-regularization loss (default: recipe's).",
                                        min=0.0)
    checkpoint_every: int = opt(100, "Write a resumable checkpoint every N steps (and at the end).", min=1,
                                key=False)
    keep_checkpoints: int = opt(2, "How many checkpoints to keep in OUT.ckpt.", min=1, key=False)
    init_from: str = opt("", "Start from an official PE-Core .pt (in --model's size) or a peflow model folder.",
                         input=True)
    train_shards: str = opt("", "Training shards to stream instead of DATA's train split: an s3:// brace pattern "
                                "or glob ('s3://bucket/laion/{00000..41407}.tar'), an s3:// corpus folder, or local "
                                "shards; DATA still gives the evaluation splits.", input=True, stream=True)
    eval_splits: str = opt("val", "Comma-separated corpus splits for a quick zero-shot top-1 at the end "
                                  "(empty: none).")
    log_model: bool = opt(True, "Log the final model as an MLflow model and register it (peflow-core).",
                          key=False)
    threads: int = opt(0, "torch threads per process (0: torch's default; torchrun sets 1 per process).",
                       min=0, key=False)
    compile: bool = opt(False, "Run the forward and loss through torch.compile: up to 1.07x faster steps on 2 CPU "
                               "cores (bench/README.md) after a compile of one to two minutes per resolution.")
    # Not in the output key, like the process count: both change how a step is computed, not what (FSDP's
    # losses match DDP's to float rounding, activation checkpointing's bit for bit; tests/unit/test_fsdp.py).
    parallelism: str = opt("ddp", "How the processes share the model: `ddp` (a whole copy on each, gradients averaged "
                                  "by one all-reduce) or `fsdp` (FSDP2: each transformer block's weights, gradients "
                                  "and optimizer state sharded over the processes; bf16 compute on GPUs).",
                           choices=("ddp", "fsdp"), key=False)
    recompute: bool = opt(False, "Activation checkpointing: recompute each transformer block's activations in "
                                 "backward instead of keeping them: far less memory for about a third more compute.",
                          key=False)
    progress: bool = opt(True, "Show a progress bar (rank 0).", key=False)

    def validate(self) -> None:
        plan_from_config(self)


def plan_from_config(cfg: Config) -> Any:
    """The resolved TrainPlan: config values over the recipe's defaults."""
    from peflow.models.pe import get_model_preset
    from peflow.train.loop import TrainPlan
    from peflow.train.recipe import get_recipe, parse_resolutions

    p = get_model_preset(cfg.model).with_arch(rope=cfg.rope, pool=cfg.pool)
    recipe = get_recipe(cfg.recipe)
    changes: dict[str, Any] = {k: getattr(cfg, k) for k in ("mask_reg_fraction", "mask_reg_weight")
                               if getattr(cfg, k) is not None}
    if cfg.crop_scale_min is not None:
        changes["crop_scale"] = (cfg.crop_scale_min, 1.0)
    lr = cfg.lr if cfg.lr is not None else recipe.lr
    if cfg.plain_lr is not None:
        changes.update(lr=lr, plain_lr=cfg.plain_lr)
    recipe = dataclasses.replace(recipe, **changes)
    recipe.validate()
    resolutions = parse_resolutions(cfg.resolutions) if cfg.resolutions.strip() else [(p.image_size, 1.0)]
    for r, _ in resolutions:
        if r % p.patch_size:
            raise ValueError(f"resolution {r} is not a multiple of model {p.name}'s patch size {p.patch_size}")
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else round(recipe.warmup_fraction * cfg.steps)
    from peflow.train.checkpoint import ckpt_dir

    return TrainPlan(data=Path(cfg.data), train_shards=cfg.train_shards, ckpt_dir=ckpt_dir(cfg.out or "out"),
                     preset=cfg.model, arch=p.arch(), recipe=recipe,
                     steps=cfg.steps, global_batch=cfg.global_batch, micro_batch=cfg.micro_batch, lr=lr,
                     warmup_steps=warmup, seed=cfg.seed, resolutions=resolutions,
                     checkpoint_every=cfg.checkpoint_every, keep_checkpoints=cfg.keep_checkpoints,
                     init_from=cfg.init_from, compile=cfg.compile,
                     parallelism=cfg.parallelism, activation_checkpointing=cfg.recompute)


def run(cfg: Config, out: Path | None) -> Result | None:
    """Train (or resume) and write the final model into `out` (rank 0; other ranks get None)."""
    import torch

    from peflow.train.loop import init_distributed, plan_dict, train

    plan = plan_from_config(cfg)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    dist = init_distributed()
    try:
        if dist.rank != 0:
            train(plan, dist, progress=False)
            return None
        import mlflow

        from peflow.train.report import StepLogger

        mlflow.log_params({f"plan.{k}": str(v) for k, v in plan_dict(plan).items() if k not in ("data", "ckpt_dir")})
        logger = StepLogger(mlflow.active_run())
        model, history = train(plan, dist, on_step=logger, progress=cfg.progress)
        logger.flush()
        return _finish(cfg, plan, model, history, out)
    finally:
        if dist.world_size > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _finish(cfg: Config, plan: Any, model: Any, history: list[dict[str, Any]], out: Path) -> Result:
    """Zero-shot check, the model and the loss plot into `out`; the last checkpoint to MLflow."""
    import mlflow

    from peflow.models.pe import get_tokenizer, save_model
    from peflow.train import checkpoint as ckpt
    from peflow.train.loop import HISTORY
    from peflow.train.report import final_metrics, loss_plot
    from peflow.train.zeroshot import zeroshot_check

    model = model.float().cpu().eval()
    metrics = final_metrics(history)
    splits = [s.strip() for s in cfg.eval_splits.split(",") if s.strip()]
    if splits:
        metrics.update(zeroshot_check(model, get_tokenizer(plan.preset), plan.data, splits,
                                      resolution=plan.resolutions[-1][0]))
    final = plan.resolutions[-1][0]
    model.visual.image_size = (final, final)  # evaluated, by default, at the size it was trained at last
    save_model(model, out, extra={"stage": "pretrain", "recipe": cfg.recipe, "steps": plan.steps})
    shutil.copyfile(plan.ckpt_dir / HISTORY, out / HISTORY)
    loss_plot(history, out / "loss.png")
    last = ckpt.latest(plan.ckpt_dir)
    if last is not None:
        mlflow.log_artifacts(str(last), artifact_path="checkpoint")
    return Result(metrics=metrics, counts={"steps": plan.steps, "samples_seen": plan.steps * plan.global_batch},
                  model=model if cfg.log_model else None, artifacts=("loss.png", "metrics.json"),
                  tags={"peflow.recipe": cfg.recipe, "peflow.preset": cfg.model})
