"""Losses of PE-core pretraining: the CLIP contrastive loss with features
gathered across ranks, and the mask-regularization loss.

Shape legend: B local batch, M masked copies, L tokens, D width, E embedding dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def contrastive_loss(rank: int = 0, world_size: int = 1) -> torch.nn.Module:
    """Softmax CLIP loss (InfoNCE both ways) over the global batch.

    Each rank computes the loss of its own rows against every rank's features
    (local loss), gathered with gradient: the mean of the ranks' losses is the
    full-batch loss, and the gradient averaged over ranks is the full-batch
    gradient, at O(B x global B) memory per rank.
    """
    from open_clip.loss import ClipLoss

    return ClipLoss(local_loss=True, gather_with_grad=True, cache_labels=True, rank=rank, world_size=world_size)


def clamp_logit_scale(model: torch.nn.Module, max_logit_scale: float = 100.0) -> None:
    """Keep the learnable temperature at logit scale <= max (CLIP, PE Tab. 18), in place."""
    with torch.no_grad():
        model.logit_scale.clamp_(0, math.log(max_logit_scale))


def patch_mask(batch: int, grid_h: int, grid_w: int, ratio: float, generator: torch.Generator) -> torch.Tensor:
    """[batch, grid_h * grid_w] bool, exactly round(ratio * patches) True per row, uniformly placed."""
    n = grid_h * grid_w
    k = max(1, round(ratio * n))
    order = torch.rand(batch, n, generator=generator).argsort(dim=1)
    mask = torch.zeros(batch, n, dtype=torch.bool)
    mask.scatter_(1, order[:, :k], True)
    return mask


def mask_images(images_MCHW: torch.Tensor, mask_MN: torch.Tensor, patch: int) -> torch.Tensor:
    """Masked copies: every masked patch set to 0 in normalised pixel space.

    With PE's normalisation (mean = std = 0.5) that is a flat mid-grey patch;
    masking at the pixel level works with any vision tower (no mask token to
    add) and keeps the patch embedding of a masked patch a constant.
    """
    m, _, h, w = images_MCHW.shape
    gh, gw = h // patch, w // patch
    pix = mask_MN.view(m, 1, gh, 1, gw, 1).expand(m, 1, gh, patch, gw, patch).reshape(m, 1, gh * patch, gw * patch)
    out = images_MCHW.clone()
    out[:, :, : gh * patch, : gw * patch] = out[:, :, : gh * patch, : gw * patch].masked_fill(pix, 0.0)
    return out


def mask_regularization_loss(masked_tokens_MLD: torch.Tensor, clean_tokens_MLD: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of 1 - cos(masked-copy token, clean token); the clean side is a stop-gradient target."""
    cos = F.cosine_similarity(masked_tokens_MLD.float(), clean_tokens_MLD.detach().float(), dim=-1)
    return (1.0 - cos).mean()


@dataclass
class StepOutput:
    """Losses of one micro-batch (the total is what is back-propagated)."""

    total: torch.Tensor
    clip: torch.Tensor
    mask_reg: torch.Tensor | None
    logit_scale: float


def clip_forward(
    model: torch.nn.Module,
    images_BCHW: torch.Tensor,
    texts_BT: torch.Tensor,
    loss_fn: torch.nn.Module,
    *,
    mask_idx: torch.Tensor | None = None,
    mask_MN: torch.Tensor | None = None,
    mask_reg_weight: float = 1.0,
) -> StepOutput:
    """One forward of the PE-core objective.

    The clean images and the masked copies of `images[mask_idx]` run through
    the vision trunk as one batch. Only the clean images are pooled into the
    CLIP embedding, so CLIP gradients never reach the copies; the copies'
    output tokens (after the final norm, before attention pooling) are pulled
    to the clean tokens, which are detached, so mask-regularization gradients
    flow only through the copies.
    """
    trunk = model.visual.trunk
    b = images_BCHW.shape[0]
    x = images_BCHW
    if mask_idx is not None and len(mask_idx) > 0:
        assert mask_MN is not None
        patch = trunk.patch_embed.patch_size[0]
        x = torch.cat([images_BCHW, mask_images(images_BCHW[mask_idx], mask_MN, patch)], dim=0)
    tokens = trunk.forward_features(x)
    clean_BLD = tokens[:b]
    image_BE = F.normalize(model.visual.head(trunk.forward_head(clean_BLD)), dim=-1)
    text_BE = model.encode_text(texts_BT, normalize=True)
    scale = model.logit_scale.exp()
    clip = loss_fn(image_BE, text_BE, scale)
    total, mreg = clip, None
    if tokens.shape[0] > b:
        mreg = mask_regularization_loss(tokens[b:], clean_BLD[mask_idx])
        total = clip + mask_reg_weight * mreg
    return StepOutput(total=total, clip=clip, mask_reg=mreg, logit_scale=float(scale.detach()))
