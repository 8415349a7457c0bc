"""Official PE-Core checkpoint import, checked against an independent reference.

The test writes a state dict in the official `facebookresearch/perception_models`
key layout for PE-Core-T16-384 (research/perception-encoder.md section 1.6),
with seeded random values (every bias and LayerNorm parameter perturbed, so a
wrong mapping cannot hide), loads it through `peflow.models.load_model`, and
compares the encodings with a small pure-torch forward of the official towers
written here from the research notes (sections 1.2-1.4), not from timm or
open_clip. At other input sizes the reference does what the official code
does: RoPE on the integer positions of the actual patch grid, and the grid
part of the absolute position embedding resampled bilinearly
(align_corners=False, no antialias) with the class-token entry kept.

Shape legend: B batch, N tokens, W width, H heads, K head dim.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from peflow.models import get_tokenizer, load_model
from peflow.models.pe import encode_layers

# PE-Core-T16-384 (research section 1.1 and 1.4).
IMG, PATCH, W, DEPTH, HEADS, POOL_HEADS, OUT = 384, 16, 192, 12, 3, 8, 512
TW, TDEPTH, THEADS, CTX, VOCAB = 512, 12, 8, 32, 49408
GRID = IMG // PATCH


# --- the official layout, seeded -------------------------------------------------------------

def _official_shapes() -> dict[str, tuple[int, ...]]:
    s: dict[str, tuple[int, ...]] = {
        "visual.conv1.weight": (W, 3, PATCH, PATCH),
        "visual.class_embedding": (W,),
        "visual.positional_embedding": (1 + GRID * GRID, W),
        "visual.ln_pre.weight": (W,), "visual.ln_pre.bias": (W,),
    }

    def block(prefix: str, w: int) -> None:
        s.update({
            f"{prefix}.ln_1.weight": (w,), f"{prefix}.ln_1.bias": (w,),
            f"{prefix}.attn.in_proj_weight": (3 * w, w), f"{prefix}.attn.in_proj_bias": (3 * w,),
            f"{prefix}.attn.out_proj.weight": (w, w), f"{prefix}.attn.out_proj.bias": (w,),
            f"{prefix}.ln_2.weight": (w,), f"{prefix}.ln_2.bias": (w,),
            f"{prefix}.mlp.c_fc.weight": (4 * w, w), f"{prefix}.mlp.c_fc.bias": (4 * w,),
            f"{prefix}.mlp.c_proj.weight": (w, 4 * w), f"{prefix}.mlp.c_proj.bias": (w,),
        })

    for i in range(DEPTH):
        block(f"visual.transformer.resblocks.{i}", W)
    s.update({
        "visual.ln_post.weight": (W,), "visual.ln_post.bias": (W,),
        "visual.attn_pool.probe": (1, 1, W),
        "visual.attn_pool.attn.in_proj_weight": (3 * W, W), "visual.attn_pool.attn.in_proj_bias": (3 * W,),
        "visual.attn_pool.attn.out_proj.weight": (W, W), "visual.attn_pool.attn.out_proj.bias": (W,),
        "visual.attn_pool.layernorm.weight": (W,), "visual.attn_pool.layernorm.bias": (W,),
        "visual.attn_pool.mlp.c_fc.weight": (4 * W, W), "visual.attn_pool.mlp.c_fc.bias": (4 * W,),
        "visual.attn_pool.mlp.c_proj.weight": (W, 4 * W), "visual.attn_pool.mlp.c_proj.bias": (W,),
        "visual.proj": (W, OUT),
        "token_embedding.weight": (VOCAB, TW),
        "positional_embedding": (CTX, TW),
    })
    for i in range(TDEPTH):
        block(f"transformer.resblocks.{i}", TW)
    s.update({"ln_final.weight": (TW,), "ln_final.bias": (TW,), "text_projection": (TW, OUT), "logit_scale": ()})
    return s


def official_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded random weights in the official PE-Core-T16-384 layout."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in _official_shapes().items():
        r = torch.randn(shape, generator=g)
        if k == "logit_scale":
            v = torch.tensor(math.log(1 / 0.07)) + 0.1 * r
        elif k.endswith(".weight") and ("ln_" in k or "layernorm" in k):
            v = 1.0 + 0.1 * r  # LayerNorm gain
        elif k.endswith("bias"):
            v = 0.05 * r
        elif len(shape) >= 2 and k.endswith("weight") and "embedding" not in k:
            v = r / math.sqrt(math.prod(shape[1:]))  # fan-in scaled linear / conv
        elif k in ("visual.proj", "text_projection"):
            v = r / math.sqrt(shape[0])
        else:  # embeddings, probe, class token
            v = 0.1 * r
        sd[k] = v.contiguous()
    return sd


# --- reference forward, from the research notes ----------------------------------------------

def _ln(x: torch.Tensor, sd: dict, p: str) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), sd[f"{p}.weight"], sd[f"{p}.bias"], eps=1e-5)


def _mlp(x: torch.Tensor, sd: dict, p: str) -> torch.Tensor:
    x = F.linear(x, sd[f"{p}.c_fc.weight"], sd[f"{p}.c_fc.bias"])
    return F.linear(F.gelu(x), sd[f"{p}.c_proj.weight"], sd[f"{p}.c_proj.bias"])  # exact GELU


def rope_2d_angles(grid_h: int, grid_w: int, head_dim: int, *, cls: bool) -> torch.Tensor:
    """[N, head_dim] rotation angles: x (column) half then y (row) half, each
    frequency repeated twice (interleaved pairs), positions 1..grid with CLS,
    and an all-zero row for CLS prepended."""
    d = head_dim // 2  # per axis
    freqs = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))  # d/2 frequencies
    off = 1 if cls else 0
    rows, cols = torch.meshgrid(torch.arange(grid_h), torch.arange(grid_w), indexing="ij")
    px, py = (cols.flatten() + off).float(), (rows.flatten() + off).float()  # row-major tokens
    ax = (px[:, None] * freqs[None]).repeat_interleave(2, dim=-1)
    ay = (py[:, None] * freqs[None]).repeat_interleave(2, dim=-1)
    ang = torch.cat([ax, ay], dim=-1)
    if cls:
        ang = torch.cat([torch.zeros(1, head_dim), ang], dim=0)
    return ang


def apply_rope(x_BHNK: torch.Tensor, ang_NK: torch.Tensor) -> torch.Tensor:
    x1, x2 = x_BHNK[..., 0::2], x_BHNK[..., 1::2]
    rot = torch.stack([-x2, x1], dim=-1).flatten(-2)  # pairs (2k, 2k+1) -> (-x_{2k+1}, x_{2k})
    return x_BHNK * ang_NK.cos() + rot * ang_NK.sin()


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, *,
               ang: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
    B, Nq, Wd = q.shape
    Nk = k.shape[1]
    K = Wd // heads
    q = q.view(B, Nq, heads, K).transpose(1, 2)
    k = k.view(B, Nk, heads, K).transpose(1, 2)
    v = v.view(B, Nk, heads, K).transpose(1, 2)
    if ang is not None:
        q, k = apply_rope(q, ang), apply_rope(k, ang)
    s = (q @ k.transpose(-1, -2)) / math.sqrt(K)
    if causal:
        s = s.masked_fill(torch.ones(Nq, Nk, dtype=torch.bool).triu(1), float("-inf"))
    return (s.softmax(-1) @ v).transpose(1, 2).reshape(B, Nq, Wd)


def _block(x: torch.Tensor, sd: dict, p: str, heads: int, *, ang=None, causal=False) -> torch.Tensor:
    h = _ln(x, sd, f"{p}.ln_1")
    q, k, v = F.linear(h, sd[f"{p}.attn.in_proj_weight"], sd[f"{p}.attn.in_proj_bias"]).chunk(3, dim=-1)
    a = _attention(q, k, v, heads, ang=ang, causal=causal)
    x = x + F.linear(a, sd[f"{p}.attn.out_proj.weight"], sd[f"{p}.attn.out_proj.bias"])
    return x + _mlp(_ln(x, sd, f"{p}.ln_2"), sd, f"{p}.mlp")


def sample_pos_embed(pos_NW: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
    """[1 + gh*gw, W] position embedding at a (grid_h, grid_w) patch grid, as the official
    code: the class-token row kept, the square grid part resampled bilinearly
    (align_corners=False, no antialias); unchanged at the native grid."""
    cls, grid = pos_NW[:1], pos_NW[1:]
    g = math.isqrt(grid.shape[0])
    if (grid_h, grid_w) != (g, g):
        grid = grid.reshape(1, g, g, -1).permute(0, 3, 1, 2)  # [1, W, g, g]
        grid = F.interpolate(grid, size=(grid_h, grid_w), mode="bilinear", align_corners=False, antialias=False)
        grid = grid.permute(0, 2, 3, 1).reshape(grid_h * grid_w, -1)
    return torch.cat([cls, grid], dim=0)


def reference_vision(sd: dict, img_BCHW: torch.Tensor, taps: tuple[int, ...] = ()) -> tuple[torch.Tensor, dict]:
    """The official PE-Core vision forward: (embedding [B, OUT], {layer: tokens [B, N, W]})."""
    x = F.conv2d(img_BCHW, sd["visual.conv1.weight"], stride=PATCH)  # no bias
    B, _, gh, gw = x.shape
    x = x.flatten(2).transpose(1, 2)  # row-major (h, w)
    x = torch.cat([sd["visual.class_embedding"].expand(B, 1, W), x], dim=1)
    x = x + sample_pos_embed(sd["visual.positional_embedding"], gh, gw)
    x = _ln(x, sd, "visual.ln_pre")
    ang = rope_2d_angles(gh, gw, W // HEADS, cls=True)
    tapped = {}
    for i in range(DEPTH):
        x = _block(x, sd, f"visual.transformer.resblocks.{i}", HEADS, ang=ang)
        if i + 1 in taps:
            tapped[i + 1] = x
    x = _ln(x, sd, "visual.ln_post")
    # Attention pooling: one probe query, 8 heads, no residual from the probe.
    wq, wk, wv = sd["visual.attn_pool.attn.in_proj_weight"].chunk(3)
    bq, bk, bv = sd["visual.attn_pool.attn.in_proj_bias"].chunk(3)
    probe = sd["visual.attn_pool.probe"].expand(B, 1, W)
    a = _attention(F.linear(probe, wq, bq), F.linear(x, wk, bk), F.linear(x, wv, bv), POOL_HEADS)
    x = F.linear(a, sd["visual.attn_pool.attn.out_proj.weight"], sd["visual.attn_pool.attn.out_proj.bias"])
    x = x + _mlp(_ln(x, sd, "visual.attn_pool.layernorm"), sd, "visual.attn_pool.mlp")
    return x[:, 0] @ sd["visual.proj"], tapped


def reference_text(sd: dict, tokens_BL: torch.Tensor) -> torch.Tensor:
    """The official PE-Core text forward: causal pre-LN transformer, ln_final, EOT (argmax) pooling."""
    x = sd["token_embedding.weight"][tokens_BL] + sd["positional_embedding"][: tokens_BL.shape[1]]
    for i in range(TDEPTH):
        x = _block(x, sd, f"transformer.resblocks.{i}", THEADS, causal=True)
    x = _ln(x, sd, "ln_final")
    pooled = x[torch.arange(x.shape[0]), tokens_BL.argmax(dim=-1)]
    return pooled @ sd["text_projection"]


# --- tests -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def official(tmp_path_factory):
    sd = official_state_dict(seed=0)
    path = tmp_path_factory.mktemp("official") / "PE-Core-T16-384.pt"
    torch.save(sd, path)
    return sd, path


@pytest.fixture(scope="module")
def loaded(official):
    torch.manual_seed(0)
    return load_model(official[1], preset="pe-core-t16")  # eval mode already (asserted below)


def test_load_model_returns_eval_mode(loaded):
    assert not loaded.training
    assert not any(m.training for m in loaded.modules())


def test_rope_reference_is_the_documented_layout():
    ang = rope_2d_angles(2, 3, 64, cls=True)
    assert ang.shape == (1 + 6, 64)
    assert torch.all(ang[0] == 0)  # CLS: identity rotation, prepended
    # token 5 is row 1, column 2 -> x position 3, y position 2 (CLS offset 1)
    assert ang[1 + 5, 0] == ang[1 + 5, 1] == 3.0  # first frequency is 1, repeated (interleaved)
    assert ang[1 + 5, 32] == ang[1 + 5, 33] == 2.0
    assert torch.isclose(ang[1 + 5, 2], torch.tensor(3.0 / 10000 ** (2 / 32)))


def test_official_checkpoint_matches_reference(official, loaded):
    sd, _ = official
    torch.manual_seed(1)
    img = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        ref_emb, ref_taps = reference_vision(sd, img, taps=(6, DEPTH))
        got_taps = encode_layers(loaded, img, [6, -1])
        got_emb = loaded.encode_image(img)
    for layer in (6, DEPTH):
        diff = (got_taps[layer] - ref_taps[layer]).abs().max().item()
        scale = ref_taps[layer].abs().max().item()
        assert diff <= 1e-5 * max(1.0, scale), f"layer {layer} tokens differ by {diff} (scale {scale})"
    assert got_emb.shape == ref_emb.shape == (2, OUT)
    torch.testing.assert_close(got_emb, ref_emb, rtol=1e-5, atol=1e-5)
    assert (got_emb - ref_emb).abs().max().item() < 1e-5
    torch.testing.assert_close(F.normalize(got_emb, dim=-1), F.normalize(ref_emb, dim=-1), rtol=0, atol=2e-6)

    tok = get_tokenizer("pe-core-t16")(["a photo of a red cube.", "two blue spheres on a striped floor"])
    assert tok.shape == (2, CTX) and int(tok.max()) == VOCAB - 1  # EOT is the largest id
    with torch.no_grad():
        got_txt = loaded.encode_text(tok)
        ref_txt = reference_text(sd, tok)
    torch.testing.assert_close(got_txt, ref_txt, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(F.normalize(got_txt, dim=-1), F.normalize(ref_txt, dim=-1), rtol=0, atol=2e-6)
    assert torch.isclose(loaded.logit_scale.detach(), sd["logit_scale"])


def test_sample_pos_embed_keeps_cls_and_native_grid():
    pos = torch.randn(1 + 4 * 4, 8)
    assert torch.equal(sample_pos_embed(pos, 4, 4), pos)
    up = sample_pos_embed(pos, 6, 3)
    assert up.shape == (1 + 18, 8) and torch.equal(up[0], pos[0])
    # Bilinear, align_corners=False: a 2x2 ramp 0..1 across columns becomes [0, .25, .75, 1] per row.
    ramp = torch.tensor([[9.0], [0.0], [1.0], [0.0], [1.0]])  # class row, then the 2x2 grid (row-major)
    out = sample_pos_embed(ramp, 4, 4)
    assert out[0, 0] == 9.0
    assert torch.equal(out[1:, 0].view(4, 4), torch.tensor([[0.0, 0.25, 0.75, 1.0]] * 4))


@pytest.mark.parametrize("size", [224, 448, 320])
def test_other_resolutions_match_official_resampling(official, loaded, size):
    """Off the native 384 px, RoPE uses the actual grid's integer positions and the
    position embedding is resampled bilinearly, as in the official code. (With timm's
    defaults, RoPE rescaled to the 24x24 grid and a bicubic antialiased resample, the
    embeddings were 0.14 apart at 224 px and 0.018 at 448 px, max abs.)"""
    sd, _ = official
    torch.manual_seed(2)
    img = torch.randn(2, 3, size, size)
    with torch.no_grad():
        ref_emb, ref_taps = reference_vision(sd, img, taps=(3,))
        got_tap = encode_layers(loaded, img, [3])[3]
        got_emb = loaded.encode_image(img)
    assert got_tap.shape == ref_taps[3].shape == (2, 1 + (size // PATCH) ** 2, W)
    assert (got_tap - ref_taps[3]).abs().max().item() < 1e-5
    assert got_emb.shape == ref_emb.shape == (2, OUT)
    assert (got_emb - ref_emb).abs().max().item() < 1e-5
    torch.testing.assert_close(F.normalize(got_emb, dim=-1), F.normalize(ref_emb, dim=-1), rtol=0, atol=2e-6)


def test_missing_keys_are_named(official, tmp_path):
    sd = dict(official[0])
    for k in [k for k in sd if k.startswith("visual.transformer.resblocks.11.")]:
        del sd[k]  # a truncated tower (like PE-Lang) is not a PE-Core-T checkpoint
    path = tmp_path / "truncated.pt"
    torch.save(sd, path)
    with pytest.raises(ValueError, match=r"missing keys \[.*blocks\.11\."):
        load_model(path, preset="pe-core-t16")


def test_wrong_preset_names_unexpected_keys(official):
    # nano has 6 vision blocks and a 4-layer text tower: T's extra blocks are unexpected.
    with pytest.raises(ValueError, match=r"unexpected keys \[.*blocks\.") as e:
        load_model(official[1], preset="nano")
    assert "nano" in str(e.value)


def test_foreign_state_dict_fails_clearly(tmp_path):
    path = tmp_path / "foreign.pt"
    torch.save({"encoder.layer.0.weight": torch.zeros(2, 2), "logit_scale": torch.tensor(1.0)}, path)
    with pytest.raises(ValueError, match="PE-Core|missing|unexpected"):
        load_model(path, preset="pe-core-t16")
    with pytest.raises(ValueError, match="--preset"):
        load_model(path)


def test_same_layout_other_width_fails(official):
    with pytest.raises(ValueError, match="pe-core-s16"):
        load_model(official[1], preset="pe-core-s16")
