"""Contrastive loss across ranks, temperature clamp, mask regularization."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from peflow.train import losses
from tests.helpers import free_port

B, E, W = 8, 16, 2


def _features(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (F.normalize(torch.randn(B, E, generator=g), dim=-1),
            F.normalize(torch.randn(B, E, generator=g), dim=-1))


def _rank(rank: int, port: int, out: dict) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=W)
    img, txt = _features()
    rows = slice(rank * B // W, (rank + 1) * B // W)
    img, txt = img[rows].clone().requires_grad_(), txt[rows].clone().requires_grad_()
    loss = losses.contrastive_loss(rank, W)(img, txt, torch.tensor(10.0))
    loss.backward()
    out[rank] = (loss.item(), img.grad.clone(), txt.grad.clone())
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_gathered_local_loss_equals_full_batch_loss_and_gradient() -> None:
    img, txt = _features()
    img.requires_grad_(), txt.requires_grad_()
    full = losses.contrastive_loss()(img, txt, torch.tensor(10.0))
    full.backward()

    ctx = torch.multiprocessing.get_context("spawn")
    with ctx.Manager() as manager:
        out = manager.dict()
        torch.multiprocessing.start_processes(_rank, args=(free_port(), out), nprocs=W, start_method="spawn")
        res = dict(out)
    mean_loss = sum(res[r][0] for r in range(W)) / W
    assert mean_loss == pytest.approx(full.item(), rel=1e-6)
    # Each rank's feature gradient sums every rank's local loss (all_gather with grad); the ranks'
    # parameter gradients are then averaged, so grad / W is the full-batch gradient of its rows.
    img_grad = torch.cat([res[r][1] for r in range(W)]) / W
    txt_grad = torch.cat([res[r][2] for r in range(W)]) / W
    torch.testing.assert_close(img_grad, img.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(txt_grad, txt.grad, rtol=1e-5, atol=1e-7)


def test_logit_scale_clamped_at_100() -> None:
    m = torch.nn.Module()
    m.logit_scale = torch.nn.Parameter(torch.tensor(math.log(500.0)))
    losses.clamp_logit_scale(m, 100.0)
    assert m.logit_scale.exp().item() == pytest.approx(100.0)


def test_patch_mask_masks_exactly_the_ratio_and_zeroes_pixels() -> None:
    g = torch.Generator().manual_seed(0)
    mask = losses.patch_mask(3, 4, 4, 0.4, g)
    assert mask.shape == (3, 16) and mask.sum(1).tolist() == [6, 6, 6]
    images = torch.ones(3, 3, 32, 32)
    masked = losses.mask_images(images, mask, patch=8)
    per_patch = masked[:, 0].reshape(3, 4, 8, 4, 8).permute(0, 1, 3, 2, 4).reshape(3, 16, 64)
    assert torch.equal(per_patch.eq(0).all(-1), mask)
    assert torch.equal(per_patch.eq(1).all(-1), ~mask)
    assert torch.equal(images, torch.ones(3, 3, 32, 32))  # the clean images are untouched


def test_mask_regularization_and_clip_gradients_are_disjoint(monkeypatch: pytest.MonkeyPatch) -> None:
    from peflow.models.pe import build_model

    torch.manual_seed(0)
    model = build_model("micro")
    images = torch.randn(6, 3, 32, 32, requires_grad=True)
    texts = torch.randint(1, 1000, (6, 32))
    copies: list[torch.Tensor] = []
    real = losses.mask_images

    def keep(*a, **k):
        out = real(*a, **k).detach().requires_grad_()
        copies.append(out)
        return out

    monkeypatch.setattr(losses, "mask_images", keep)
    idx = torch.tensor([1, 4])
    mask = losses.patch_mask(2, 4, 4, 0.4, torch.Generator().manual_seed(1))
    out = losses.clip_forward(model, images, texts, losses.contrastive_loss(), mask_idx=idx, mask_MN=mask)
    assert out.mask_reg is not None and 0 < out.mask_reg.item() < 2
    # CLIP loss: no gradient reaches the masked copies.
    g_clip_copy = torch.autograd.grad(out.clip, copies[0], retain_graph=True, allow_unused=True)[0]
    assert g_clip_copy is None or g_clip_copy.abs().max() == 0
    # Mask regularization: the clean images are a stop-gradient target.
    g_mreg_clean = torch.autograd.grad(out.mask_reg, images, retain_graph=True, allow_unused=True)[0]
    assert g_mreg_clean is None or g_mreg_clean.abs().max() == 0
    g_mreg_copy = torch.autograd.grad(out.mask_reg, copies[0], retain_graph=True)[0]
    assert g_mreg_copy.abs().max() > 0
    torch.testing.assert_close(out.total, out.clip + out.mask_reg)
