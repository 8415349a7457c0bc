"""Recipe presets, progressive resolution, optimizer groups, LR schedule."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from peflow.train import optim, recipe


def test_presets_differ_only_in_the_recipe_switches() -> None:
    pe, van = recipe.get_recipe("pe"), recipe.get_recipe("vanilla")
    assert (pe.optimizer, pe.betas, pe.weight_decay, pe.max_logit_scale) == ("lamb", (0.9, 0.95), 0.05, 100.0)
    assert (pe.crop_scale, pe.crop_ratio, pe.brightness, pe.saturation, pe.hflip) == (
        (0.08, 1.0), (0.75, 1.33), 0.32, 0.32, 0.5)
    assert pe.mask_reg_fraction == pytest.approx(1 / 16) and pe.mask_ratio == 0.4
    assert van.optimizer == "adamw" and not van.augment and not van.progressive_resolution
    assert van.mask_reg_fraction == 0
    with pytest.raises(ValueError, match="unknown recipe"):
        recipe.get_recipe("fancy")


def test_hflip_swaps_left_and_right() -> None:
    assert recipe.hflip_caption("a star on the left, to the right of a Left ring") == \
        "a star on the right, to the left of a Right ring"
    assert recipe.hflip_caption("bright lefty") == "bright lefty"


def test_progressive_resolution_schedule() -> None:
    spec = recipe.parse_resolutions("32:0.4,48:0.35,64:0.25")
    sched = recipe.resolution_schedule(spec, 100)
    assert sched == [(0, 32), (40, 48), (75, 64)]
    assert [recipe.resolution_at(sched, s) for s in (0, 39, 40, 74, 75, 99)] == [32, 32, 48, 48, 64, 64]
    assert recipe.parse_resolutions("64") == [(64, 1.0)]
    with pytest.raises(ValueError, match="RES:FRACTION"):
        recipe.parse_resolutions("a:b")


def test_no_weight_decay_on_biases_norms_embeddings_and_logit_scale() -> None:
    from peflow.models.pe import build_model

    model = build_model("micro")
    decay, no_decay = optim.param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    nd = {names[id(p)] for p in no_decay["params"]}
    assert {"logit_scale", "visual.trunk.cls_token", "visual.trunk.pos_embed", "text.token_embedding.weight",
            "text.positional_embedding", "visual.trunk.norm.weight", "visual.trunk.blocks.0.attn.qkv.bias"} <= nd
    d = {names[id(p)] for p in decay["params"]}
    assert "visual.trunk.blocks.0.attn.qkv.weight" in d and "visual.trunk.patch_embed.proj.weight" in d
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    from timm.optim import Lamb

    opt = optim.build_optimizer(model, recipe.pe(), 1e-3)
    assert isinstance(opt, Lamb) and opt.defaults["betas"] == (0.9, 0.95)


def test_warmup_then_cosine_to_zero() -> None:
    lr = [optim.warmup_cosine(s, warmup_steps=10, total_steps=110) for s in range(110)]
    assert lr[0] == pytest.approx(1 / 11) and lr[9] == pytest.approx(10 / 11)
    assert all(a < b for a, b in zip(lr[:10], lr[1:11]))
    assert lr[10] == 1.0 and lr[60] == pytest.approx(0.5)
    assert all(a >= b for a, b in zip(lr[10:], lr[11:]))
    assert optim.warmup_cosine(110, warmup_steps=10, total_steps=110) == pytest.approx(0.0)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = optim.build_scheduler(opt, warmup_steps=10, total_steps=110)
    for _ in range(60):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(1.0)


def _lamb_twins(seed: int = 0) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(seed)
    a = torch.nn.Sequential(torch.nn.Embedding(50, 8), torch.nn.Linear(8, 16), torch.nn.LayerNorm(16),
                            torch.nn.Linear(16, 4))
    b = torch.nn.Sequential(torch.nn.Embedding(50, 8), torch.nn.Linear(8, 16), torch.nn.LayerNorm(16),
                            torch.nn.Linear(16, 4))
    b.load_state_dict(a.state_dict())
    return a, b


def _set_grads(models: tuple[torch.nn.Module, ...], g: torch.Generator, scale: float) -> None:
    for ps in zip(*(m.parameters() for m in models)):
        grad = scale * torch.randn(ps[0].shape, generator=g)
        for p in ps:
            p.grad = grad.clone()


@pytest.mark.parametrize("scale", [1e-3, 10.0], ids=["unclipped", "clipped"])
def test_fused_lamb_matches_timm_lamb_and_shares_its_state(scale: float) -> None:
    """FusedLamb (fused AdamW kernel + trust ratios) takes timm's LAMB steps, decayed and non-decayed groups,
    with and without the global-norm clip; its state dict resumes timm's optimizer and back."""
    from timm.optim import Lamb

    ref, fused = _lamb_twins()
    kw = dict(lr=1e-2, betas=(0.9, 0.95), weight_decay=0.05)
    o_ref = Lamb(optim.param_groups(ref, 0.05), foreach=True, **kw)
    o_fused = optim.lamb(optim.param_groups(fused, 0.05), **kw)
    assert type(o_fused).__name__ == "FusedLamb" and o_fused._fusable()
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        _set_grads((ref, fused), g, scale)
        o_ref.step()
        o_fused.step()
    for p, q in zip(ref.parameters(), fused.parameters()):
        torch.testing.assert_close(q, p, atol=1e-6, rtol=1e-5)
    moved = sum((p - q).abs().sum().item() for p, q in zip(ref.parameters(), _lamb_twins()[0].parameters()))
    assert moved > 0.1  # the steps did something

    # timm resumes from FusedLamb's state dict (and the reverse): same next step
    o_swap = Lamb(optim.param_groups(ref, 0.05), foreach=True, **kw)
    o_swap.load_state_dict(copy.deepcopy(o_fused.state_dict()))  # as from a checkpoint file: no shared moments
    _set_grads((ref, fused), g, scale)
    o_swap.step()
    o_fused.step()
    for p, q in zip(ref.parameters(), fused.parameters()):
        torch.testing.assert_close(q, p, atol=1e-6, rtol=1e-5)


def test_fused_lamb_falls_back_to_timm_for_what_the_kernel_does_not_cover() -> None:
    _, m = _lamb_twins()
    o = optim.FusedLamb(optim.param_groups(m, 0.05), lr=1e-2, caution=True)
    assert not o._fusable()
    _set_grads((m,), torch.Generator().manual_seed(0), 1.0)
    o.step()  # timm's own step
    assert all(len(s) == 2 for s in o.state.values())


def test_plain_lr_sets_the_lr_of_the_groups_lamb_does_not_adapt() -> None:
    import dataclasses

    from peflow.models.pe import build_model
    from peflow.stages import pretrain

    plan = pretrain.plan_from_config(pretrain.Config(data="d", out="o", model="micro", lr=1e-2, plain_lr=1e-3))
    opt = optim.build_optimizer(build_model("micro"), plan.recipe, plan.lr)
    assert [g["lr"] for g in opt.param_groups] == [1e-2, 1e-3]
    sched = optim.build_scheduler(opt, warmup_steps=0, total_steps=10)
    sched.step()
    assert opt.param_groups[0]["lr"] / opt.param_groups[1]["lr"] == pytest.approx(10.0)
    with pytest.raises(ValueError, match="plain_lr"):
        dataclasses.replace(recipe.vanilla(), plain_lr=1e-3).validate()


def test_recipe_names_add_pe_pieces_to_vanilla() -> None:
    """`vanilla+piece+...` is vanilla with those fields of the PE recipe; every piece gives `pe`."""
    from peflow.train.recipe import PIECES, get_recipe, pe, vanilla

    lamb = get_recipe("vanilla+lamb")
    assert (lamb.optimizer, lamb.betas, lamb.weight_decay) == ("lamb", (0.9, 0.95), 0.05)
    assert not lamb.augment and not lamb.progressive_resolution and lamb.mask_reg_fraction == 0
    assert dataclasses.replace(get_recipe("vanilla+" + "+".join(PIECES)), name="pe") == pe()
    assert dataclasses.replace(get_recipe("vanilla"), name="vanilla") == vanilla()
    with pytest.raises(ValueError, match="unknown piece"):
        get_recipe("vanilla+sgd")
    with pytest.raises(ValueError, match="unknown recipe"):
        get_recipe("clip+lamb")


def test_pe_adamw_is_pe_with_vanillas_optimizer() -> None:
    """The short-run recipe: every PE piece but LAMB; an ablation of it compares against vanilla CLIP."""
    from peflow.train.recipe import get_recipe, other_recipe

    short = get_recipe("pe-adamw")
    assert dataclasses.replace(short, name="x") == dataclasses.replace(
        get_recipe("vanilla+progressive+augment+mask_reg"), name="x")
    assert short.optimizer == "adamw" and short.augment and short.progressive_resolution
    assert [other_recipe(r) for r in ("pe", "pe-adamw", "vanilla")] == ["vanilla", "vanilla", "pe"]
