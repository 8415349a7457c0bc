"""The pieces of the alignment stages (PE lang, PE spatial): LayerScale added and folded, the official
vision-only layout (PE-Lang / PE-Spatial .pt) loaded back by timm, QA scoring against the majority
answer, the 2x2-unit input mask, and two small learning tests: PE spatial's mask-logit loss teaches
a tower region structure it does not have at init, and PE lang's QA objective teaches a tiny VLM to
answer a colour question from the image."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from peflow.models.pe import (add_layer_scale, build_model, fold_layer_scale, load_model, official_vision_state,
                              save_model, save_official_vision)
from peflow.models.vlm import cut_tower, frames_tensor


def _random_gammas(trunk: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in trunk.blocks:
            for gamma in (block.gamma_1, block.gamma_2):
                gamma.copy_(torch.rand(gamma.shape, generator=g) + 0.5)


def _images(n: int = 3, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return frames_tensor(rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), 32)


def _last_tokens(trunk: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    (tokens,) = trunk.forward_intermediates(x, indices=[len(trunk.blocks) - 1], norm=False, output_fmt="NLC",
                                            intermediates_only=True, return_prefix_tokens=False)
    return tokens


# -- the official vision-only layout -------------------------------------------------------------------

def test_official_vision_layout_round_trips_through_timm(tmp_path):
    from timm.models.eva import checkpoint_filter_fn

    torch.manual_seed(0)
    tower = cut_tower(build_model("test"), 3)
    add_layer_scale(tower, init=0.1)
    _random_gammas(tower)
    tower.eval()
    sd = official_vision_state(tower)

    assert not any(k.startswith("visual.") for k in sd)
    assert not any(k.startswith(("ln_post", "attn_pool", "proj")) or k == "proj" for k in sd), sorted(sd)
    for key in ("conv1.weight", "class_embedding", "positional_embedding", "ln_pre.weight",
                "transformer.resblocks.0.ls_1.gamma", "transformer.resblocks.2.ls_2.gamma",
                "transformer.resblocks.0.attn.in_proj_weight", "transformer.resblocks.0.mlp.c_fc.weight"):
        assert key in sd, key
    assert "transformer.resblocks.3.ln_1.weight" not in sd  # cut after block 3
    assert torch.equal(sd["transformer.resblocks.1.ls_1.gamma"], tower.blocks[1].gamma_1.detach())

    torch.manual_seed(1)  # other weights: everything must come from the file
    fresh = cut_tower(build_model("test"), 3)
    add_layer_scale(fresh, init=0.1)
    result = fresh.load_state_dict(checkpoint_filter_fn(sd, fresh), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    fresh.eval()
    x = _images()
    with torch.no_grad():
        assert torch.equal(_last_tokens(fresh, x), _last_tokens(tower, x))
        assert torch.equal(fresh.forward_features(x), tower.forward_features(x))

    path = save_official_vision(tower, tmp_path / "enc" / "PE-Lang.pt")
    assert path.is_file() and not list(path.parent.glob(".*tmp"))
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    assert set(loaded) == set(sd)
    assert all(torch.equal(loaded[k], sd[k]) for k in sd)


def test_fold_layer_scale_keeps_the_function_and_saves_as_a_plain_model(tmp_path):
    torch.manual_seed(0)
    model = build_model("test")
    trunk = model.visual.trunk
    add_layer_scale(trunk, init=0.1, drop_path=0.2)
    _random_gammas(trunk, seed=3)
    assert all(b.gamma_1 is not None and b.gamma_2 is not None for b in trunk.blocks)
    model.eval()
    x = _images()
    with torch.no_grad():
        before_tokens, before_emb = _last_tokens(trunk, x), model.encode_image(x)
    fold_layer_scale(trunk)
    assert all(b.gamma_1 is None and b.gamma_2 is None for b in trunk.blocks)
    assert not any("gamma" in k for k in model.state_dict())
    assert all(isinstance(getattr(b, f"drop_path{i}"), torch.nn.Identity) for b in trunk.blocks for i in (1, 2))
    with torch.no_grad():
        assert (_last_tokens(trunk, x) - before_tokens).abs().max() < 1e-5
        assert (model.encode_image(x) - before_emb).abs().max() < 1e-5

    save_model(model, tmp_path / "m")
    again = load_model(tmp_path / "m")  # strict: the folded trunk is the plain architecture
    with torch.no_grad():
        assert (again.encode_image(x) - before_emb).abs().max() < 1e-5


# -- QA scoring --------------------------------------------------------------------------------------

def test_normalise():
    from peflow.evaluate.qa import normalise

    assert normalise("  Red! ") == "red"
    assert normalise("Two   Circles.") == "two circles"
    assert normalise("\"left\"\n") == "left"
    assert normalise("") == ""


def test_majority_answers_per_type_ties_to_the_first_seen():
    from peflow.evaluate.qa import majority_answers

    pairs = [{"type": "colour", "answer": "Red"}, {"type": "colour", "answer": "blue"},
             {"type": "colour", "answer": "red."}, {"type": "count", "answer": "3"},
             {"type": "count", "answer": "2"}]
    assert majority_answers(pairs) == {"colour": "red", "count": "3"}
    assert majority_answers([]) == {}


def test_qa_accuracy_exact_numbers():
    from peflow.evaluate.qa import qa_accuracy

    qa = [{"type": "colour", "answer": "red"}, {"type": "colour", "answer": "blue"},
          {"type": "colour", "answer": "green"}, {"type": "count", "answer": "3"}]
    examples = [(None, q) for q in qa]
    answers = ["Red.", "red", " GREEN", "three"]
    metrics = qa_accuracy(answers, examples, {"colour": "red", "count": "3"}, prefix="qa/image")
    assert metrics == pytest.approx({"qa/image/colour": 2 / 3, "qa/image/colour_majority": 1 / 3,
                                     "qa/image/count": 0.0, "qa/image/count_majority": 1.0,
                                     "qa/image/mean": 1 / 3, "qa/image/mean_majority": 2 / 3})
    assert qa_accuracy([], [], {}, prefix="qa/video") == {}


# -- PE spatial's input mask ------------------------------------------------------------------------

def test_unit_mask_ratio_blocks_and_determinism():
    from peflow.train.objectives.spatial import unit_mask

    mask = unit_mask(np.random.default_rng(0), (8, 8), ratio=0.75, unit=2)
    assert mask.shape == (8, 8) and mask.dtype == torch.bool
    assert mask.float().mean().item() == 0.75
    blocks = mask.reshape(4, 2, 4, 2).permute(0, 2, 1, 3).reshape(16, 4)
    assert bool((blocks.all(1) | ~blocks.any(1)).all())  # every 2x2 unit wholly masked or wholly kept
    assert int(blocks.all(1).sum()) == 12
    assert torch.equal(mask, unit_mask(np.random.default_rng(0), (8, 8), ratio=0.75, unit=2))
    others = [unit_mask(np.random.default_rng(s), (8, 8), ratio=0.75, unit=2) for s in range(1, 6)]
    assert any(not torch.equal(mask, o) for o in others)
    # a grid that the unit does not divide: cropped, ratio of the units
    odd = unit_mask(np.random.default_rng(0), (5, 3), ratio=0.5, unit=2)
    assert odd.shape == (5, 3)
    assert unit_mask(np.random.default_rng(0), (4, 4), ratio=0.0, unit=2).sum() == 0


# -- PE spatial learns region structure from mask logits ----------------------------------------------

def _saturation_scenes(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """32 px images of two flat regions split on a token boundary (4x4 tokens of 8 px), of one hue at two
    saturations: normalised colours a*u and b*u (a != b > 0). A random PE tower, with no patch-embedding bias
    and a LayerNorm before its blocks, maps both to (almost) the same tokens, so its similarity carries no
    region structure; the superpixel mask logits (CIELAB) tell the regions apart. Returns uint8 images and
    the [n, 4, 4] region of each token."""
    images = np.zeros((n, 32, 32, 3), np.uint8)
    regions = np.zeros((n, 4, 4), int)
    for i in range(n):
        lab = np.zeros((4, 4), int)
        cut = rng.integers(1, 4)
        if rng.random() < 0.5:
            lab[:, cut:] = 1
        else:
            lab[cut:, :] = 1
        u = rng.normal(size=3)
        u /= np.linalg.norm(u)
        a, b = rng.choice([0.25, 0.5, 0.9], 2, replace=False)
        colours = 127.5 * (1 + np.stack([a * u, b * u]))
        regions[i] = lab
        images[i] = np.clip(colours[np.kron(lab, np.ones((8, 8), int))], 0, 255).round()
    return images, regions


def _region_agreement(sim_BNN: torch.Tensor, regions: np.ndarray) -> tuple[float, float]:
    """(mean same-region minus mean cross-region similarity, mean per-image Pearson correlation of the
    pairwise similarity with the same-region indicator), off the diagonal."""
    same = torch.as_tensor(regions.reshape(len(regions), -1))
    same = same[:, :, None] == same[:, None, :]
    off = ~torch.eye(same.shape[1], dtype=torch.bool)
    contrast = (sim_BNN[same & off].mean() - sim_BNN[~same].mean()).item()
    corr = [torch.corrcoef(torch.stack([s[off], y[off].float()]))[0, 1].item() for s, y in zip(sim_BNN, same)]
    return contrast, float(np.nan_to_num(corr).mean())


def test_pe_spatial_learns_the_regions_its_mask_logits_show(tmp_path):
    from peflow.models.masks import SuperpixelMasks
    from peflow.train.objectives.spatial import SpatialObjective, pairwise_cosine
    from peflow.train.trainer import Dist, TrainSettings, fit

    torch.manual_seed(0)
    save_model(build_model("test"), tmp_path / "pe")
    images, _ = _saturation_scenes(64, np.random.default_rng(10))
    held_out, regions = _saturation_scenes(32, np.random.default_rng(100))
    feats = SuperpixelMasks(points=4).features(images, (4, 4))
    x = frames_tensor(held_out, 32)
    core = load_model(tmp_path / "pe")
    with torch.no_grad():
        before = _region_agreement(pairwise_cosine(_last_tokens(core.visual.trunk, x)), regions)

    # Masking off: on a 4x4 token grid, 75% of the 2x2 units is 3 of 4 quadrants, and the student then
    # learns the masked case only. 300 steps of 8 images take ~5 s on one core.
    objective = SpatialObjective(init_from=str(tmp_path / "pe"), images=images, mask_feats=feats, teacher_layer=2,
                                 mask_ratio=0.0, drop_path=0.0)
    settings = TrainSettings(ckpt_dir=tmp_path / "ckpt", steps=300, global_batch=8, lr=5e-3, warmup_steps=5,
                             checkpoint_every=1000)
    student, history = fit(objective, settings, Dist(), progress=False)
    loc = [r["loss_loc"] for r in history]
    assert np.mean(loc[-10:]) < 0.7 * np.mean(loc[:10]), (np.mean(loc[:10]), np.mean(loc[-10:]))
    student.eval()
    with torch.no_grad():
        after = _region_agreement(pairwise_cosine(student(x)), regions)
    assert abs(before[0]) < 0.05, before  # the untrained tower cannot tell the two saturations apart
    assert after[0] > before[0] + 0.1, (before, after)
    assert after[1] > before[1] + 0.25, (before, after)


# -- PE lang answers a question from the image --------------------------------------------------------

COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (40, 60, 220), "yellow": (230, 220, 40)}
QUESTION = "What colour is it?"


def _colour_clips(n: int, rng: np.random.Generator, start: int) -> list:
    """One-frame clips: a 12 px square of one of four colours at a random place on dark noise; its QA pair
    asks the colour."""
    from peflow.engine.clips import Clip

    names = list(COLOURS)
    out = []
    for i in range(n):
        name = names[(start + i) % len(names)]
        frame = rng.integers(0, 60, (1, 32, 32, 3)).astype(np.uint8)
        y, x = rng.integers(0, 21, 2)
        frame[0, y:y + 12, x:x + 12] = COLOURS[name]
        out.append(Clip(f"c{start + i}", frame, meta={"qa": [{"question": QUESTION, "answer": name,
                                                              "type": "colour"}]}))
    return out


def test_pe_lang_qa_learns_to_answer_from_the_image(tmp_path):
    from peflow.evaluate.qa import answer_questions, majority_answers, qa_accuracy, qa_examples
    from peflow.models.lm import TinyLM, build_tiny_lm, train_tokenizer
    from peflow.models.vlm import build_vlm
    from peflow.train.objectives.captioner import CaptionObjective
    from peflow.train.trainer import Dist, TrainSettings, fit

    rng = np.random.default_rng(0)
    train, held_out = _colour_clips(120, rng, 0), _colour_clips(40, rng, 1000)
    torch.manual_seed(0)
    tok = train_tokenizer([QUESTION] + list(COLOURS) * 4, 300)
    lm = build_tiny_lm(tok, TinyLM(hidden=32, layers=1, heads=2, intermediate=64, vocab_size=300, max_positions=128))
    model = build_vlm(build_model("test"), lm, tok, layer=2, max_frames=1)
    add_layer_scale(model.tower, init=0.1, drop_path=0.1)
    examples = qa_examples(train)
    bank = frames_tensor(np.concatenate([c.frames for c, _ in examples]), model.image_size)
    objective = CaptionObjective(model, bank, torch.arange(len(examples))[:, None],
                                 [qa["answer"] for _, qa in examples], prompts=[qa["question"] for _, qa in examples],
                                 frozen_tower=False, train_parts="tower,projector,lm", tower_lr_scale=0.1, max_len=16)
    tower_before = {k: v.clone() for k, v in model.tower.state_dict().items()}
    settings = TrainSettings(ckpt_dir=tmp_path / "ckpt", steps=300, global_batch=16, lr=3e-3, warmup_steps=5,
                             checkpoint_every=1000)
    model, history = fit(objective, settings, Dist(), progress=False)
    assert history[-1]["loss"] < 0.1 * history[0]["loss"]
    assert any(not torch.equal(v, tower_before[k]) for k, v in model.tower.state_dict().items())  # tower learns

    held = qa_examples(held_out)
    answers = answer_questions(model, held, batch_size=16)
    metrics = qa_accuracy(answers, held, majority_answers(qa for _, qa in examples), prefix="qa/image")
    assert metrics["qa/image/colour_majority"] <= 0.4
    assert metrics["qa/image/mean"] >= 0.9, list(zip(answers, [qa["answer"] for _, qa in held]))[:8]
