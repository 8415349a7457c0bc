"""PE spatial (paper section 5): align PE-core's last layer to its own best dense layer and to
the structure of mask logits, so the last layer becomes the spatial one.

Student: PE-core's vision trunk (from pretrain) with LayerScale (`layer_scale`, paper 0.1) and
DropPath; input masked 75% in 2x2-token units; LAMB; horizontal flips, no random resized crop.
Losses (`peflow.train.objectives.spatial`): negative cosine to a frozen PE-core's tokens after
block `teacher_layer`, plus the MSE between pairwise token similarities and those of mask-logit
features transformed by exp(20 (x - 1)), weights 1 and 1.

Teacher layer: a number (negative from the end) or `auto`: frozen per-patch segmentation and
depth probes (`peflow.evaluate.probes`) on a few hundred train images rank the layers and the
best (highest mIoU + R^2) is taken; recorded in OUT/teacher.json.

Mask logits (`masks`, `peflow.models.masks`): `superpixels` (the CPU default: SLIC superpixels
around a grid of points as soft per-point masks, no labels) or `sam2` (SAM 2 through
transformers prompted with a point grid, raw logits; `sam2_model` is a hub id or local folder).
Never the corpus's ground-truth masks: those only score the evaluation. Distributed like
pretrain (`peflow launch align-spatial -j 2x1`); rank 0 writes the outputs.

Outputs:
  OUT/model.safetensors, OUT/model.json   the PE-core model with the aligned trunk (load_model;
                                          LayerScale folded): registered as peflow-spatial
  OUT/PE-Spatial.pt                       the trunk in the official PE-Spatial layout (vision only,
                                          no ln_post, attention pool or projection; ls_{1,2}.gamma)
  OUT/teacher.json, OUT/history.jsonl, OUT/loss.png, OUT/metrics.json, OUT/manifest.json
  OUT.ckpt/step-*/                        resumable checkpoints
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peflow.config import check_block_or_auto, opt
from peflow.stages.base import Result

ENCODER_FILE = "PE-Spatial.pt"
MASK_BACKENDS = ("superpixels", "sam2")


@dataclass(kw_only=True)
class Config:
    """Options of `peflow align-spatial`."""

    checkpoint: str = opt("", "PE-core model to align (the pretrain stage's output).")
    data: str = opt("", "Corpus with image shards (the validate stage's output).")
    out: str = opt("", "Output folder for PE spatial; checkpoints go to OUT.ckpt beside it.")
    teacher_layer: str = opt("auto", "Frozen teacher's block the student's last layer matches (negative from the "
                                     "end), or auto: the best layer of quick frozen dense probes.")
    probe_images: int = opt(300, "Train images of the auto teacher-layer probes (70% fit, 30% score).", min=10)
    masks: str = opt("superpixels", "Mask-logit backend: superpixels (CPU, no labels) or sam2 (SAM 2 through "
                                    "transformers).", choices=MASK_BACKENDS)
    sam2_model: str = opt("", "SAM 2 model for masks=sam2: a Hugging Face id or local folder.")
    points: int = opt(8, "Prompt points per side of the grid (points^2 mask logits per image; paper 32).", min=1)
    images: int = opt(2000, "Train images aligned on.", min=1)
    steps: int = opt(300, "Optimizer steps.", min=1)
    global_batch: int = opt(32, "Images per step over all processes.", min=1)
    lr: float = opt(2e-3, "Peak learning rate (LAMB; paper 5e-4 at batch 12,288; warm-up then cosine).", min=0.0)
    warmup_steps: int = opt(20, "Linear warm-up steps (paper: none).", min=0)
    mask_ratio: float = opt(0.75, "Fraction of the student's input tokens masked.", min=0.0)
    mask_unit: int = opt(2, "Side of a mask unit, in tokens.", min=1)
    layer_scale: float = opt(0.1, "LayerScale init of the new gammas (0 = none).", min=0.0)
    drop_path: float = opt(0.1, "DropPath rate on the student's blocks (paper 0.4 at G).", min=0.0)
    core_weight: float = opt(1.0, "Weight of the self-distillation loss.", min=0.0)
    loc_weight: float = opt(1.0, "Weight of the mask-logit correspondence loss.", min=0.0)
    seed: int = opt(0, "Seed of data order, masks and flips.")
    checkpoint_every: int = opt(100, "Write a resumable checkpoint every N steps (and at the end).", min=1, key=False)
    threads: int = opt(0, "torch threads per process (0: torch's default).", min=0, key=False)
    log_model: bool = opt(True, "Log the model as an MLflow model and register it (peflow-spatial).", key=False)
    progress: bool = opt(True, "Show a progress bar (rank 0).", key=False)

    def validate(self) -> None:
        check_block_or_auto(self.teacher_layer, "teacher_layer")
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {self.mask_ratio}")
        if self.masks == "sam2" and not self.sam2_model:
            raise ValueError("masks=sam2 needs sam2_model (a Hugging Face id or a local folder)")


def choose_teacher_layer(cfg: Config, pe_model: Any) -> tuple[int, dict[str, Any]]:
    """The teacher's block (1-based) and the record of why."""
    from peflow.evaluate.probes import pe_layer_taps, probe_layers
    from peflow.models.pe import block_index, num_layers

    depth = num_layers(pe_model)
    if cfg.teacher_layer != "auto":
        layer = block_index(int(cfg.teacher_layer), depth)
        return layer, {"layer": layer, "depth": depth, "rule": "given by config"}
    from peflow.data.formats import label_names

    n_train = max(1, int(cfg.probe_images * 0.7))
    result = probe_layers(pe_layer_taps(pe_model), cfg.data, text_encoder=None, classnames=label_names(cfg.data),
                          train_split="train", test_split="val", probe_train=n_train,
                          probe_test=max(1, cfg.probe_images - n_train), tasks=("seg", "depth"), seed=cfg.seed)
    if set(result.per_layer) != {"seg", "depth"}:
        raise ValueError(f"data {cfg.data}: the auto teacher layer needs dense targets ({'; '.join(result.notes)}); "
                         f"set teacher_layer")
    scores = {k: result.per_layer["seg"][i] + result.per_layer["depth"][i] for i, k in enumerate(result.layers)}
    layer = max(scores, key=lambda k: (scores[k], -k))
    return layer, {"layer": layer, "depth": depth, "scores": scores, "seg": dict(zip(result.layers,
                   result.per_layer["seg"])), "depth_r2": dict(zip(result.layers, result.per_layer["depth"])),
                   "rule": "auto: highest seg mIoU + depth R^2 of frozen per-patch linear probes (train -> val)"}


def mask_features(cfg: Config, images: Any, grid: tuple[int, int], dist: Any) -> Any:
    """[M, h, w, P] mask logits of every image on the token grid (fp16), from the configured backend;
    each process computes every world_size-th image and the parts are gathered."""
    import torch

    from peflow.models.masks import get_mask_backend

    backend = get_mask_backend(cfg.masks, model=cfg.sam2_model, points=cfg.points)
    mine = images[dist.rank::dist.world_size]
    part = torch.cat([backend.features(mine[i:i + 256], grid).half() for i in range(0, len(mine), 256)])
    if dist.world_size == 1:
        return part
    parts: list[Any] = [None] * dist.world_size
    torch.distributed.all_gather_object(parts, part)
    out = torch.empty(len(images), *part.shape[1:], dtype=part.dtype)
    for rank, p in enumerate(parts):
        out[rank::dist.world_size] = p
    return out


def run(cfg: Config, out: Path | None) -> Result | None:
    """Choose the teacher layer, align (resuming from OUT.ckpt) and write PE spatial into `out` (rank 0)."""
    import time

    import numpy as np
    import torch

    from peflow.config import InputError
    from peflow.engine.clips import read_images
    from peflow.models.pe import load_model, resolve_checkpoint
    from peflow.train.checkpoint import ckpt_dir
    from peflow.train.objectives.spatial import SpatialObjective
    from peflow.train.trainer import TrainSettings, fit, init_distributed

    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    try:
        clips = read_images(cfg.data, "train", limit=cfg.images)
    except FileNotFoundError as e:
        raise InputError(f"data {cfg.data}: {e}") from None
    if len(clips) < cfg.global_batch:
        raise InputError(f"data {cfg.data}: {len(clips)} train images, fewer than one batch ({cfg.global_batch})")
    init = str(resolve_checkpoint(cfg.checkpoint))
    pe_model = load_model(init)
    layer, why = choose_teacher_layer(cfg, pe_model)
    trunk = pe_model.visual.trunk
    images = np.stack([c.frames[0] for c in clips])
    size = int(trunk.patch_embed.img_size[0])
    if images.shape[1] != size:  # the mask logits are taken on the image the student sees
        from peflow.models.vlm import frames_tensor

        images = ((frames_tensor(images, size) * 0.5 + 0.5).clamp(0, 1) * 255).round().byte()
        images = images.permute(0, 2, 3, 1).numpy()
    dist = init_distributed()
    try:
        t0 = time.perf_counter()
        feats = mask_features(cfg, images, tuple(trunk.patch_embed.grid_size), dist)
        mask_s = time.perf_counter() - t0
        objective = SpatialObjective(init_from=init, images=images, mask_feats=feats, teacher_layer=layer,
                                     mask_ratio=cfg.mask_ratio, mask_unit=cfg.mask_unit, layer_scale=cfg.layer_scale,
                                     drop_path=cfg.drop_path, core_weight=cfg.core_weight, loc_weight=cfg.loc_weight)
        settings = TrainSettings(ckpt_dir=ckpt_dir(cfg.out or "out"), steps=cfg.steps, global_batch=cfg.global_batch,
                                 lr=cfg.lr, warmup_steps=min(cfg.warmup_steps, cfg.steps), seed=cfg.seed,
                                 checkpoint_every=cfg.checkpoint_every)
        if dist.rank != 0:
            fit(objective, settings, dist, progress=False)
            return None
        import mlflow

        from peflow.train.report import StepLogger

        logger = StepLogger(mlflow.active_run())
        student, history = fit(objective, settings, dist, on_step=logger, progress=cfg.progress)
        logger.flush()
        return _finish(cfg, out, pe_model, student, history, why,
                       counts={"images": len(images), "mask_points": int(feats.shape[-1])},
                       mask_s=mask_s, mask_per_s=len(images) / max(mask_s, 1e-9))
    finally:
        if dist.world_size > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _finish(cfg: Config, out: Path, pe_model: Any, student: Any, history: list[dict[str, Any]],
            why: dict[str, Any], *, counts: dict[str, Any], mask_s: float, mask_per_s: float) -> Result:
    import statistics

    from peflow.models.pe import fold_layer_scale, save_model, save_official_vision
    from peflow.train.report import loss_plot

    trunk = student.trunk.float().cpu().eval()
    save_official_vision(trunk, out / ENCODER_FILE)
    fold_layer_scale(trunk)
    pe_model.visual.trunk = trunk
    save_model(pe_model, out, extra={"stage": "align-spatial", "teacher_layer": why["layer"], "masks": cfg.masks,
                                     "steps": cfg.steps})
    (out / "teacher.json").write_text(json.dumps(why, indent=2, sort_keys=True) + "\n")
    (out / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))
    loss_plot(history, out / "loss.png")
    tail = history[-10:]
    metrics = {"teacher_layer": float(why["layer"]),
               "train/final_loss": statistics.fmean(r["loss"] for r in tail),
               "train/first_loss": float(history[0]["loss"]),
               "train/final_loss_core": statistics.fmean(r["loss_core"] for r in tail),
               "train/final_loss_loc": statistics.fmean(r["loss_loc"] for r in tail),
               "train/images_per_s": statistics.median(r["samples_per_s"] for r in (history[1:] or history)),
               "masks/seconds": mask_s, "masks/images_per_s": mask_per_s}
    print(f"align-spatial: teacher layer {why['layer']} of {why['depth']} ({why['rule'].split(':')[0]}), "
          f"{cfg.masks} masks ({mask_per_s:.0f} images/s); loss {metrics['train/first_loss']:.3f} -> "
          f"{metrics['train/final_loss']:.3f} (core {metrics['train/final_loss_core']:.3f}, loc "
          f"{metrics['train/final_loss_loc']:.4f}) in {cfg.steps} steps")
    return Result(metrics=metrics, counts={**counts, "steps": cfg.steps}, resolved={"teacher_layer": why["layer"]},
                  model=pe_model if cfg.log_model else None, artifacts=("teacher.json", "loss.png", "metrics.json"),
                  tags={"peflow.masks": cfg.masks, "peflow.teacher_layer": str(why["layer"])})
