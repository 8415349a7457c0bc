"""PE-core pretraining's objective: the CLIP contrastive loss plus mask regularization.

The contrastive negatives of one micro-batch are the micro-batch gathered over ranks
(`losses.contrastive_loss`). Data order and augmentation come from `TrainLoader`, the
mask-regularization rows and patches from (seed, step, first global row), so a resumed or
re-sharded run sees the same batches and masks. Resolution follows the recipe's progressive
schedule (the last resolution only when the recipe turns progressive resolution off).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from peflow.train.data import ShardIndex, TrainLoader
from peflow.train.losses import clamp_logit_scale, clip_forward, contrastive_loss, patch_mask
from peflow.train.objectives.base import Batch, Objective
from peflow.train.optim import build_optimizer
from peflow.train.recipe import Recipe, resolution_at, resolution_schedule

if TYPE_CHECKING:
    from peflow.train.trainer import Dist, TrainSettings


def flops_per_sample(model: torch.nn.Module, resolution: int, context_length: int) -> float:
    """Training FLOPs per image-text pair at `resolution`: 3x the counted forward (fwd + 2x bwd)."""
    from torch.utils.flop_counter import FlopCounterMode

    dev = next(model.parameters()).device
    images = torch.zeros(2, 3, resolution, resolution, device=dev)
    tokens = torch.zeros(2, context_length, dtype=torch.long, device=dev)
    with FlopCounterMode(display=False) as counter:
        model.encode_image(images)
        model.encode_text(tokens)
    return 3.0 * counter.get_total_flops() / 2


class ClipObjective(Objective):
    """CLIP image-text pretraining of a PE-core model (`peflow pretrain`)."""

    loss_columns = ("loss", "clip_loss", "mask_reg_loss")

    def __init__(self, *, data: str | Path, preset: str, recipe: Recipe, resolutions: list[tuple[int, float]],
                 init_from: str = "", compile: bool = False, name: str = "pretrain",
                 arch: Mapping[str, Any] | None = None) -> None:
        recipe.validate()
        # an s3:// URI stays a string (Path would fold its '//')
        self.data = data if str(data).startswith("s3://") else Path(data)
        self.preset, self.recipe, self.resolutions = preset, recipe, resolutions
        self.init_from, self.compile, self.name = init_from, compile, name
        self.arch = dict(arch or {})
        self._flops: dict[int, float] = {}

    def build_model(self, dist: Dist) -> torch.nn.Module:
        """A fresh model of the preset (with `arch`'s switches), or `init_from` (an official .pt or a peflow
        model folder: its own architecture)."""
        from peflow.models.pe import build_model, get_model_preset, load_model

        if self.init_from:
            return load_model(self.init_from, preset=self.preset)
        return build_model(get_model_preset(self.preset).with_arch(**self.arch))

    def setup(self, model: torch.nn.Module, settings: TrainSettings, dist: Dist) -> None:
        """The rank's loader, the gathered contrastive loss, the resolution schedule, the (compiled) forward."""
        from peflow.models.pe import get_model_preset, get_tokenizer

        p = get_model_preset(self.preset)
        self.context_length, self.seed = p.context_length, settings.seed
        self.loader = TrainLoader(ShardIndex.from_corpus(self.data, "train"), global_batch=settings.global_batch,
                                  rank=dist.rank, world_size=dist.world_size, seed=settings.seed,
                                  recipe=self.recipe, tokenizer=get_tokenizer(p))
        self.loss_fn = contrastive_loss(dist.rank, dist.world_size)
        spec = self.resolutions if self.recipe.progressive_resolution else [(self.resolutions[-1][0], 1.0)]
        self.schedule = resolution_schedule(spec, settings.steps)
        # Compiling the function, not the module, keeps the model's state_dict keys (checkpoints) unchanged.
        self.forward = torch.compile(clip_forward) if self.compile else clip_forward

    def build_optimizer(self, model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
        """The recipe's optimizer: LAMB (pe) or AdamW (vanilla)."""
        return build_optimizer(model, self.recipe, lr)

    def resolution(self, step: int) -> int:
        """The image side at `step`."""
        return resolution_at(self.schedule, step)

    def batch(self, step: int) -> Batch:
        """(images [B, 3, R, R], tokens [B, T]) of this rank at the step's resolution."""
        return self.loader.batch(step, self.resolution(step))

    def loss(self, model: torch.nn.Module, micro: Batch, *, step: int, row0: int
             ) -> Mapping[str, torch.Tensor | float]:
        """Total, CLIP and mask-regularization loss (0 when off) of one micro-batch."""
        images, tokens = micro
        idx, mask = self._mask_plan(step, row0, images, model)
        out = self.forward(model, images, tokens, self.loss_fn, mask_idx=idx, mask_MN=mask,
                           mask_reg_weight=self.recipe.mask_reg_weight)
        return {"loss": out.total, "clip_loss": out.clip,
                "mask_reg_loss": out.mask_reg if out.mask_reg is not None else 0.0}

    def after_step(self, model: torch.nn.Module) -> None:
        """Clamp the logit scale at the recipe's maximum."""
        clamp_logit_scale(model, self.recipe.max_logit_scale)

    def data_position(self, step: int) -> dict[str, int]:
        """Epoch and batch within the epoch of step `step`."""
        return self.loader.position(step)

    def step_metrics(self, model: torch.nn.Module, step: int) -> dict[str, Any]:
        """The logit scale after the step and the step's resolution."""
        return {"logit_scale": float(model.logit_scale.detach().exp()), "resolution": self.resolution(step)}

    def flops_per_sample(self, model: torch.nn.Module, step: int) -> float:
        """Counted once per resolution."""
        res = self.resolution(step)
        if res not in self._flops:
            self._flops[res] = flops_per_sample(model, res, self.context_length)
        return self._flops[res]

    def progress_text(self, row: Mapping[str, Any]) -> str:
        """Loss, resolution and throughput."""
        return f"loss {row['loss']:.3f} res {row['resolution']} {row['samples_per_s']:.0f} samples/s"

    def _mask_plan(self, step: int, row0: int, images: torch.Tensor, model: torch.nn.Module
                   ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Which rows get a masked copy and which patches; seeded by (seed, step, first global row)."""
        r = self.recipe
        if r.mask_reg_fraction <= 0:
            return None, None
        n = min(images.shape[0], max(r.mask_reg_min, round(r.mask_reg_fraction * images.shape[0])))
        seed = int(np.random.SeedSequence([self.seed, step, row0, 11]).generate_state(1)[0])
        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(images.shape[0], generator=g)[:n].sort().values
        patch = model.visual.trunk.patch_embed.patch_size[0]
        gh, gw = images.shape[2] // patch, images.shape[3] // patch
        return idx.to(images.device), patch_mask(n, gh, gw, r.mask_ratio, g).to(images.device)
