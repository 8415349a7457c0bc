"""The captioner's model: offline tokenizer, tiny and Hugging Face LMs by folder, the
PE layer -> projector -> LM module (save, load, generate), and that it learns to name a
motion's direction from frames in order (held-out accuracy well above chance)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from peflow.models.lm import TinyLM, build_tiny_lm, load_lm, new_lm, train_tokenizer
from peflow.models.pe import build_model
from peflow.models.vlm import build_vlm, frames_tensor, load_vlm

TEXTS = ["a red circle moves to the left", "a blue square moves to the right", "the green star grows",
         "a small yellow heart shrinks on a plain background"] * 5
DIMS = TinyLM(hidden=32, layers=1, heads=2, intermediate=64, vocab_size=300, max_positions=128)


def _tiny_vlm(layer: int = 2, seed: int = 0):
    torch.manual_seed(seed)
    lm, tok = new_lm("tiny", TEXTS, DIMS)
    return build_vlm(build_model("test"), lm, tok, layer=layer, max_frames=4)


def test_tokenizer_round_trips_through_a_folder_with_its_chat_template(tmp_path):
    from transformers import AutoTokenizer

    tok = train_tokenizer(TEXTS, 300)
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    ids = tok.encode("a red circle moves to the left!", add_special_tokens=False)
    assert tok.decode(ids) == "a red circle moves to the left!"
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again.encode("a red circle moves to the left!", add_special_tokens=False) == ids
    assert again.chat_template == tok.chat_template
    assert (again.pad_token_id, again.bos_token_id, again.eos_token_id) == (0, 1, 2)


def test_vlm_forward_generate_save_and_load(tmp_path):
    m = _tiny_vlm().eval()
    frames = frames_tensor(np.random.default_rng(0).integers(0, 255, (2, 3, 32, 32, 3), dtype=np.uint8), 32)
    assert m.vision_tokens(frames).shape == (2, 3, 16, 64)  # 4x4 patches of width 64, no class token
    assert m.visual(frames=frames).shape == (2, 3 * 4, 32)  # 2x2 pooling -> 4 tokens per frame
    ids = torch.tensor([[1, 5, 6, 2], [1, 7, 2, 0]])
    mask = (ids != 0).long()
    out = m(ids, mask, torch.where(mask.bool(), ids, -100), frames=frames)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    said = m.generate(frames=frames, max_new_tokens=6)
    assert len(said) == 2 and all(isinstance(s, str) for s in said)
    assert not any(k.startswith("lm.") for k in m.own_state())
    m.save(tmp_path / "cap")
    loaded = load_vlm(tmp_path / "cap")
    assert loaded.layer == 2 and len(loaded.tower.blocks) == 2
    assert loaded.generate(frames=frames, max_new_tokens=6) == said
    with pytest.raises(ValueError, match="vlm.json"):
        load_vlm(tmp_path)


def test_a_hugging_face_lm_loads_from_a_local_folder(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = train_tokenizer(TEXTS, 300)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2, n_positions=128)).save_pretrained(
        tmp_path / "gpt2")
    tok.save_pretrained(tmp_path / "gpt2")
    lm, tok2 = new_lm(str(tmp_path / "gpt2"))
    assert type(lm).__name__ == "GPT2LMHeadModel" and len(tok2) == len(tok)
    m = build_vlm(build_model("test"), lm, tok2, layer=-1).eval()
    assert m.layer == 4  # -1 = the last block of the test preset's 4
    frames = frames_tensor(np.zeros((1, 2, 32, 32, 3), np.uint8), 32)
    assert len(m.generate(frames=frames, max_new_tokens=3)) == 1
    with pytest.raises(ValueError, match="no-such-model"):
        load_lm(tmp_path / "no-such-model")


def _motion_clips(n: int, rng: np.random.Generator) -> tuple[np.ndarray, list[str]]:
    """4-frame 32 px clips of a white square moving left, right, up or down over noise."""
    words = ["left", "right", "up", "down"]
    clips, caps = np.zeros((n, 4, 32, 32, 3), np.uint8), []
    for i in range(n):
        d = i % 4
        clips[i] = rng.integers(0, 40, (4, 32, 32, 3))
        c = rng.integers(14, 19, 2)
        for t in range(4):
            step = (t - 1.5) * 7
            y, x = c + np.array([[0, -step], [0, step], [-step, 0], [step, 0]][d]).astype(int)
            clips[i, t, y - 4:y + 4, x - 4:x + 4] = 255
        caps.append(f"the square moves {words[d]}")
    return clips, caps


def test_captioner_learns_a_direction_only_frame_order_tells(tmp_path):
    from peflow.engine.clips import Clip, vision_bank
    from peflow.train.objectives.captioner import CaptionObjective
    from peflow.train.trainer import Dist, TrainSettings, fit

    rng = np.random.default_rng(0)
    clips, caps = _motion_clips(192, rng)
    torch.manual_seed(0)
    tok = train_tokenizer(caps * 3, 300)
    lm = build_tiny_lm(tok, TinyLM(hidden=32, layers=2, heads=2, intermediate=64, vocab_size=300))
    m = build_vlm(build_model("test"), lm, tok, layer=1, max_frames=4)
    m.tower.requires_grad_(False)
    bank, (ids,) = vision_bank(m, [[Clip(str(i), c) for i, c in enumerate(clips[:160])]])
    objective = CaptionObjective(m, bank, ids, caps[:160], max_len=12)
    settings = TrainSettings(ckpt_dir=tmp_path / "ckpt", steps=800, global_batch=32, lr=3e-3, warmup_steps=10,
                             checkpoint_every=1000)
    model, history = fit(objective, settings, Dist(), progress=False)
    assert history[-1]["loss"] < 0.5 * history[0]["loss"]
    model.eval()
    said = model.generate(frames=frames_tensor(clips[160:], 32), max_new_tokens=6)
    # held-out clips: the same frames reversed move the other way, so only the order tells
    accuracy = np.mean([s.split()[-1:] == c.split()[-1:] for s, c in zip(said, caps[160:])])
    assert accuracy >= 0.75, list(zip(said, caps[160:]))[:8]  # chance: 0.25
