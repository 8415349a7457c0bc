"""PE-core robust contrastive image pretraining (paper section 2.1).

`peflow pretrain --data CORPUS --out OUT [--recipe vanilla|pe]` trains a
PE-core CLIP model in this process; under torchrun (`python -m torch.distributed.run
--nproc_per_node 2 -m peflow.stages.pretrain ...`) every process runs the same
function and rank 0 writes the outputs.

Outputs:
  OUT/model.safetensors, OUT/model.json   the final model (peflow.models.pe.load_model)
  OUT/history.jsonl                       per-step loss, lr, logit scale, resolution, samples/s
  OUT/loss.png, OUT/metrics.json, OUT/manifest.json
  OUT.ckpt/step-*/                        resumable checkpoints (outlive a kill; rerun to resume)

MLflow (rank 0): the config as params, per-step metrics, the final metrics,
the checkpoint, loss plot and the model as an MLflow model, the training
data's content hash as `input.data.digest`.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peflow.config import opt, req


@dataclass(kw_only=True)
class Config:
    """Options of `peflow pretrain` (unset numbers come from the recipe and the model preset's budget)."""

    data: str = req("Corpus folder holding image/train/*.tar (a `peflow synth` output or LAION-style shards).")
    out: str = req("Output folder for the final model; checkpoints go to OUT.ckpt beside it.")
    preset: str = opt("nano", "Model preset: nano, micro, small-cpu or an official size (T/S/B/L/G).")
    recipe: str = opt("pe", "Training recipe: `pe` (robust PE-core) or `vanilla` (CLIP baseline).")
    steps: int | None = opt(None, "Optimizer steps (default: the preset's budget).")
    global_batch: int | None = opt(None, "Image-text pairs per step over all processes (default: budget).")
    micro_batch: int = opt(0, "Rows per forward on each process; smaller than the local batch accumulates "
                              "gradients (0 = no accumulation).")
    lr: float | None = opt(None, "Peak learning rate (default: the recipe's, scaled by the budget).")
    warmup_steps: int | None = opt(None, "Linear warm-up steps (default: the recipe's fraction of steps).")
    seed: int = opt(0, "Seed of initialisation, data order, augmentation and masks.")
    resolutions: str | None = opt(None, "Progressive resolution as RES:FRACTION,... e.g. 32:0.4,48:0.35,64:0.25 "
                                        "(default: the budget's; empty: the preset's image size).")
    mask_reg_fraction: float | None = opt(None, "Share of each batch duplicated and 40%-masked for mask "
                                                "regularization (default: recipe's, 1/16; 0 = off).")
    mask_reg_weight: float | None = opt(None, "Weight of the mask-regularization loss (default: recipe's).")
    checkpoint_every: int = opt(100, "Write a resumable checkpoint every N steps (and at the end).")
    keep_checkpoints: int = opt(2, "How many checkpoints to keep in OUT.ckpt.")
    init_from: str = opt("", "Start from an official PE-Core .pt (in --preset's size) or a peflow model folder.")
    eval_splits: str = opt("val", "Comma-separated corpus splits for a quick zero-shot top-1 at the end "
                                  "(empty: none).")
    experiment: str = opt("peflow", "MLflow experiment name.")
    tracking_uri: str = opt("", "MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else SQLite beside OUT).")
    log_model: bool = opt(True, "Log the final model as an MLflow model.")
    threads: int = opt(0, "torch threads per process (0: torch's default; torchrun sets 1 per process).")
    compile: bool = opt(False, "Run the forward and loss through torch.compile: about 1.1x faster steps on 2 CPU "
                               "cores (bench/README.md) after a compile of one to two minutes per resolution.")
    progress: bool = opt(True, "Show a progress bar (rank 0).")


def plan_from_config(cfg: Config) -> Any:
    """The resolved TrainPlan: config values over the recipe and the model preset's budget."""
    from peflow.models.pe import get_model_preset
    from peflow.train.loop import TrainPlan
    from peflow.train.recipe import default_budget, get_recipe, parse_resolutions

    p = get_model_preset(cfg.preset)
    recipe = get_recipe(cfg.recipe)
    changes = {k: getattr(cfg, k) for k in ("mask_reg_fraction", "mask_reg_weight") if getattr(cfg, k) is not None}
    recipe = dataclasses.replace(recipe, **changes)
    recipe.validate()
    budget = default_budget(cfg.preset)
    if budget.crop_scale is not None:
        recipe = dataclasses.replace(recipe, crop_scale=budget.crop_scale)
    steps = cfg.steps if cfg.steps is not None else budget.steps
    batch = cfg.global_batch if cfg.global_batch is not None else budget.global_batch
    res_spec = cfg.resolutions if cfg.resolutions is not None else budget.resolutions
    resolutions = parse_resolutions(res_spec) if res_spec.strip() else [(p.image_size, 1.0)]
    for r, _ in resolutions:
        if r % p.patch_size:
            raise ValueError(f"resolution {r} is not a multiple of preset {p.name}'s patch size {p.patch_size}")
    lr = cfg.lr if cfg.lr is not None else dict(budget.lr_by_recipe).get(recipe.name, recipe.lr * budget.lr_scale)
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else round(recipe.warmup_fraction * steps)
    for name, v, lo in (("steps", steps, 1), ("global_batch", batch, 1), ("micro_batch", cfg.micro_batch, 0),
                        ("warmup_steps", warmup, 0), ("checkpoint_every", cfg.checkpoint_every, 1)):
        if v < lo:
            raise ValueError(f"{name} must be >= {lo}, got {v}")
    if not Path(cfg.data).is_dir():
        raise ValueError(f"data folder {cfg.data!r} does not exist")
    return TrainPlan(data=Path(cfg.data), ckpt_dir=ckpt_dir(cfg.out), preset=cfg.preset, recipe=recipe, steps=steps,
                     global_batch=batch, micro_batch=cfg.micro_batch, lr=lr, warmup_steps=warmup, seed=cfg.seed,
                     resolutions=resolutions, checkpoint_every=cfg.checkpoint_every,
                     keep_checkpoints=cfg.keep_checkpoints, init_from=cfg.init_from, compile=cfg.compile)


def ckpt_dir(out: str | Path) -> Path:
    """Where resumable checkpoints live: a sibling `OUT.ckpt`, which survives a killed run."""
    out = Path(out)
    return out.with_name(out.name + ".ckpt")


def run(cfg: Config) -> Path:
    """Train (or resume) and write the final model into `cfg.out`; returns that path."""
    import torch

    from peflow.io import dataset_digest, up_to_date
    from peflow.train.loop import init_distributed, plan_dict, train

    plan = plan_from_config(cfg)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    config = dataclasses.asdict(cfg)
    inputs = {"data": dataset_digest(cfg.data)}
    if up_to_date(cfg.out, config=config, inputs=inputs):
        return Path(cfg.out)
    dist = init_distributed()
    try:
        if dist.rank != 0:
            train(plan, dist, progress=False)
            return Path(cfg.out)
        from peflow.train.report import StepLogger, finish, tracked_run

        with tracked_run(cfg, config=config, plan=plan_dict(plan), inputs=inputs) as run_info:
            logger = StepLogger(run_info)
            model, history = train(plan, dist, on_step=logger, progress=cfg.progress)
            logger.flush()
            finish(cfg, plan, model, history, config=config, inputs=inputs, run_info=run_info)
        return Path(cfg.out)
    finally:
        if dist.world_size > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    """`python -m peflow.stages.pretrain [options]`: the entry point torchrun and TorchX run."""
    from peflow.cli import main as cli_main

    cli_main(["pretrain", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    main()
