"""PE spatial's objective (paper section 5.2): self-distillation from a frozen PE-core layer
plus mask-logit correspondence.

The student is PE-core's vision trunk with LayerScale and DropPath added; its input is
masked MaskFeat-style (`mask_ratio` of the token grid, in `mask_unit` x `mask_unit` units,
replaced by a learned mask token after the patch embedding). Two losses on the student's
last-layer patch tokens (before the final norm; the class token not used), weights
`core_weight` and `loc_weight` (paper 1 and 1):

- core: the negative cosine similarity to the frozen teacher's tokens after block
  `teacher_layer` of the unmasked image (the same augmented image);
- loc: the MSE between the student tokens' pairwise cosine-similarity matrix and that of the
  mask-logit features (`peflow.models.masks`, precomputed once per image, never the corpus's
  ground-truth masks), the latter transformed by exp(20 (x - 1)).

The one augmentation is a horizontal flip (no random resized crop), applied to the image and
its mask features alike and seeded by (seed, step, row), as are the masks, so a resume
continues exactly. LAMB (timm, betas 0.9/0.95, weight decay 0.05).

Shape legend: B images, S side, h x w token grid, N = h*w tokens, D width, P prompt points.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from peflow.train.data import EpochOrder
from peflow.train.objectives.base import Batch, Objective

if TYPE_CHECKING:
    from peflow.train.trainer import Dist, TrainSettings


def unit_mask(rng: np.random.Generator, grid: tuple[int, int], *, ratio: float, unit: int) -> torch.Tensor:
    """A bool [h, w] mask: round(ratio * units) of the (h/unit) x (w/unit) units, chosen at random, set."""
    gh, gw = -(-grid[0] // unit), -(-grid[1] // unit)
    n = gh * gw
    units = np.zeros(n, dtype=bool)
    units[rng.permutation(n)[:int(round(ratio * n))]] = True
    full = np.kron(units.reshape(gh, gw), np.ones((unit, unit), dtype=bool))
    return torch.from_numpy(full[:grid[0], :grid[1]])


class SpatialStudent(nn.Module):
    """A PE trunk whose patch embeddings can be replaced by a learned mask token; `forward` gives the
    last block's patch tokens [B, N, D] (no final norm, class token stripped)."""

    def __init__(self, trunk: nn.Module) -> None:
        super().__init__()
        self.trunk = trunk
        self.mask_token = nn.Parameter(torch.zeros(trunk.embed_dim))
        self._mask: torch.Tensor | None = None
        trunk.patch_embed.register_forward_hook(self._apply_mask)
        # only the path to the last block's tokens learns
        for part in ("norm", "fc_norm", "attn_pool", "head"):
            module = getattr(trunk, part, None)
            if isinstance(module, nn.Module):
                module.requires_grad_(False)

    def _apply_mask(self, module: nn.Module, args: Any, out: torch.Tensor) -> torch.Tensor:
        if self._mask is None:
            return out
        m = self._mask.to(out.device)
        m = m.reshape(m.shape[0], *out.shape[1:-1], 1) if out.ndim == 4 else m.reshape(m.shape[0], -1, 1)
        return torch.where(m, self.mask_token.to(out.dtype), out)

    def forward(self, images_BCSS: torch.Tensor, mask_Bhw: torch.Tensor | None = None) -> torch.Tensor:
        self._mask = mask_Bhw
        try:
            (tokens,) = self.trunk.forward_intermediates(
                images_BCSS, indices=[len(self.trunk.blocks) - 1], norm=False, output_fmt="NLC",
                intermediates_only=True, stop_early=True)
        finally:
            self._mask = None
        return tokens


def pairwise_cosine(tokens_BND: torch.Tensor) -> torch.Tensor:
    """[B, N, N] cosine similarity of every pair of tokens."""
    t = F.normalize(tokens_BND.float(), dim=-1)
    return t @ t.transpose(1, 2)


class SpatialObjective(Objective):
    """PE spatial alignment of a PE-core trunk (`peflow align-spatial`)."""

    loss_columns = ("loss", "loss_core", "loss_loc")

    def __init__(self, *, init_from: str, images: np.ndarray, mask_feats: torch.Tensor, teacher_layer: int,
                 mask_ratio: float = 0.75, mask_unit: int = 2, layer_scale: float = 0.1, drop_path: float = 0.1,
                 core_weight: float = 1.0, loc_weight: float = 1.0, temperature: float = 20.0,
                 hflip: float = 0.5, weight_decay: float = 0.05, name: str = "align-spatial") -> None:
        """`images`: uint8 [M, H, W, 3]; `mask_feats`: [M, h, w, P] mask logits on the token grid."""
        if len(images) != len(mask_feats):
            raise ValueError(f"{len(images)} images but {len(mask_feats)} mask feature maps")
        self.init_from, self.images, self.mask_feats = init_from, images, mask_feats
        self.teacher_layer, self.mask_ratio, self.mask_unit = teacher_layer, mask_ratio, mask_unit
        self.layer_scale, self.drop_path = layer_scale, drop_path
        self.core_weight, self.loc_weight, self.temperature = core_weight, loc_weight, temperature
        self.hflip, self.weight_decay, self.name = hflip, weight_decay, name

    def build_model(self, dist: Dist) -> nn.Module:
        import copy

        from peflow.models.pe import add_layer_scale, load_model

        core = load_model(self.init_from)
        self.teacher = copy.deepcopy(core.visual.trunk).eval().requires_grad_(False)
        trunk = core.visual.trunk
        add_layer_scale(trunk, init=self.layer_scale, drop_path=self.drop_path)
        return SpatialStudent(trunk)

    def setup(self, model: nn.Module, settings: TrainSettings, dist: Dist) -> None:
        self.teacher.to(dist.device)
        self.order = EpochOrder(len(self.images), global_batch=settings.global_batch, rank=dist.rank,
                                world_size=dist.world_size, seed=settings.seed)
        self.seed = settings.seed
        trunk = model.trunk
        self.size = int(trunk.patch_embed.img_size[0])
        self.grid = tuple(trunk.patch_embed.grid_size)

    def build_optimizer(self, model: nn.Module, lr: float) -> torch.optim.Optimizer:
        from peflow.train.optim import lamb, param_groups

        return lamb(param_groups(model, self.weight_decay), lr=lr, betas=(0.9, 0.95), weight_decay=self.weight_decay)

    def batch(self, step: int) -> Batch:
        """(images [B, 3, S, S], student masks [B, h, w], similarity targets [B, N, N]) of this rank's rows."""
        from peflow.models.masks import similarity_target
        from peflow.models.vlm import frames_tensor

        rows = self.order.rows(step)
        idx = [i for i, _ in rows]
        images = frames_tensor(self.images[idx], self.size)
        feats = self.mask_feats[idx].float()
        masks = []
        for n, (_, row) in enumerate(rows):
            rng = np.random.default_rng([self.seed, step, row, 29])
            if rng.random() < self.hflip:
                images[n] = images[n].flip(-1)
                feats[n] = feats[n].flip(1)
            masks.append(unit_mask(rng, self.grid, ratio=self.mask_ratio, unit=self.mask_unit))
        return images, torch.stack(masks), similarity_target(feats, self.temperature)

    def loss(self, model: nn.Module, micro: Batch, *, step: int, row0: int) -> Mapping[str, torch.Tensor | float]:
        images, masks, target_BNN = micro
        with torch.no_grad():
            (teacher,) = self.teacher.forward_intermediates(
                images, indices=[self.teacher_layer - 1], norm=False, output_fmt="NLC", intermediates_only=True,
                stop_early=True)
        student = model(images, masks)
        core = -F.cosine_similarity(student.float(), teacher.float(), dim=-1).mean()
        loc = F.mse_loss(pairwise_cosine(student), target_BNN)
        total = self.core_weight * core + self.loc_weight * loc
        return {"loss": total, "loss_core": float(core.detach()), "loss_loc": float(loc.detach())}

    def data_position(self, step: int) -> dict[str, int]:
        return self.order.position(step)

    def progress_text(self, row: Mapping[str, Any]) -> str:
        return (f"loss {row['loss']:.3f} (core {row['loss_core']:.3f}, loc {row['loss_loc']:.4f}) "
                f"{row['samples_per_s']:.0f} images/s")
