"""Loading models from disk: round trip, eval mode, and one-line errors for bad files.

Every bad checkpoint (unreadable, cut short, not JSON, foreign keys or shapes,
missing) must raise a ValueError whose message names the file and says what
is wrong on one line, with no chained library exception (no nested traceback).
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from peflow.models import build_model, load_model, load_official_checkpoint, save_model
from peflow.models.pe import MODEL_CARD, MODEL_FILE


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model("test")
    folder = tmp_path_factory.mktemp("ckpt") / "run"
    save_model(model, folder)
    return model, folder


def _copy_ckpt(saved, tmp_path, name="ckpt"):
    folder = tmp_path / name
    folder.mkdir()
    for f in (MODEL_FILE, MODEL_CARD):
        (folder / f).write_bytes((saved[1] / f).read_bytes())
    return folder


def _one_line_error(path, *, names, preset=None, match=None) -> str:
    with pytest.raises(ValueError) as info:
        load_model(path, preset=preset)
    msg = str(info.value)
    assert names in msg, msg
    assert "\n" not in msg and "Traceback" not in msg, msg
    assert info.value.__cause__ is None, msg
    assert info.value.__context__ is None or info.value.__suppress_context__, msg
    if match is not None:
        assert match in msg, msg
    return msg


def test_round_trip_is_exact_and_in_eval_mode(saved, tmp_path):
    model, folder = saved
    x = torch.randn(2, 3, 32, 32)
    for path in (folder, folder / MODEL_FILE):
        got = load_model(path)
        assert not got.training and not any(m.training for m in got.modules())
        assert got.peflow_preset == "test"
        with torch.no_grad():
            assert torch.equal(got.encode_image(x), model.eval().encode_image(x))


@pytest.mark.parametrize("seed", range(8))
def test_random_bytes_pt(tmp_path, seed):
    path = tmp_path / "X.pt"
    path.write_bytes(torch.randint(0, 256, (5000,), generator=torch.Generator().manual_seed(seed),
                                   dtype=torch.uint8).numpy().tobytes())
    msg = _one_line_error(path, preset="test", names="X.pt")
    assert "not a PyTorch checkpoint" in msg
    assert "weights_only" not in msg.lower()  # torch's unpickling advice does not leak


@pytest.mark.parametrize(("keep", "says"), [(0, "empty file"), (100, "cut short"), (0.5, "cut short"),
                                            (-30, "cut short")])
def test_pt_cut_short(tmp_path, saved, keep, says):
    full = tmp_path / "full.pt"
    torch.save(saved[0].state_dict(), full)
    data = full.read_bytes()
    n = int(len(data) * keep) if isinstance(keep, float) else (len(data) + keep if keep < 0 else keep)
    path = tmp_path / "cut.pt"
    path.write_bytes(data[:n])
    _one_line_error(path, preset="test", names="cut.pt", match=says)


class Opaque:
    """Not on torch's weights_only allow list."""


def test_pt_with_python_objects(tmp_path):
    path = tmp_path / "objects.pt"
    torch.save({"model": Opaque()}, path)
    _one_line_error(path, preset="test", names="objects.pt", match="Python objects other than tensors")


def test_pt_not_a_state_dict(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], path)
    _one_line_error(path, preset="test", names="list.pt", match="not a state dict")


def test_pt_foreign_shapes(tmp_path):
    path = tmp_path / "PE-Core-foreign.pt"
    torch.save({"visual.conv1.weight": torch.zeros(2, 2), "logit_scale": torch.tensor(1.0)}, path)
    _one_line_error(path, preset="test", names="PE-Core-foreign.pt")


def test_missing_files(tmp_path):
    _one_line_error(tmp_path / "nowhere.pt", preset="test", names="nowhere.pt", match="no such file")
    _one_line_error(tmp_path / "nowhere", names="nowhere", match="no such file")
    (tmp_path / "empty").mkdir()
    _one_line_error(tmp_path / "empty", names="empty", match=MODEL_FILE)
    (tmp_path / "folder.pt").mkdir()
    _one_line_error(tmp_path / "folder.pt", preset="test", names="folder.pt", match="not a file")


def test_load_official_checkpoint_names_the_file(tmp_path):
    path = tmp_path / "garbage.pth"
    path.write_bytes(os.urandom(5000))
    with pytest.raises(ValueError, match="garbage.pth") as info:
        load_official_checkpoint(build_model("test"), path)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("keep", [0, 7, 0.5, -1])
def test_safetensors_cut_short(saved, tmp_path, keep):
    folder = _copy_ckpt(saved, tmp_path)
    f = folder / MODEL_FILE
    data = f.read_bytes()
    n = int(len(data) * keep) if isinstance(keep, float) else (len(data) + keep if keep < 0 else keep)
    f.write_bytes(data[:n])
    msg = _one_line_error(folder, names=MODEL_FILE, match="truncated or corrupt")
    assert str(folder) in msg


def test_safetensors_random_bytes(saved, tmp_path):
    folder = _copy_ckpt(saved, tmp_path)
    (folder / MODEL_FILE).write_bytes(os.urandom(5000))
    _one_line_error(folder / MODEL_FILE, names=str(folder / MODEL_FILE))


def test_model_card_not_json(saved, tmp_path):
    folder = _copy_ckpt(saved, tmp_path)
    (folder / MODEL_CARD).write_text('{"preset": "test",\n')
    _one_line_error(folder, names=MODEL_CARD, match="not valid JSON")
    (folder / MODEL_CARD).write_bytes(os.urandom(300) + b"\xff\xfe")
    _one_line_error(folder, names=MODEL_CARD)
    (folder / MODEL_CARD).write_text(json.dumps(["test"]))
    _one_line_error(folder, names=MODEL_CARD, match="not a JSON object")
    (folder / MODEL_CARD).write_text(json.dumps({"preset": "no-such-preset"}))
    _one_line_error(folder, names=MODEL_CARD, match="no-such-preset")


def test_safetensors_foreign_keys(saved, tmp_path):
    from safetensors.torch import save_file

    folder = _copy_ckpt(saved, tmp_path)
    save_file({"encoder.layer.0.weight": torch.zeros(2, 2)}, str(folder / MODEL_FILE))
    msg = _one_line_error(folder, names=MODEL_FILE, match="does not fit preset test")
    assert "encoder.layer.0.weight" in msg and "missing keys" in msg


def test_safetensors_foreign_shapes(tmp_path):
    # micro has test's keys, but a 64 px grid: the position embedding is 65 tokens, not 17.
    folder = tmp_path / "micro-as-test"
    save_model(build_model("micro"), folder)
    (folder / MODEL_CARD).write_text(json.dumps({"preset": "test"}))
    msg = _one_line_error(folder, names=MODEL_FILE, match="shapes do not fit preset test")
    assert "pos_embed" in msg
    _one_line_error(folder, preset="nano", names=MODEL_FILE, match="does not fit preset nano")


def test_architecture_switches_travel_in_the_model_card(tmp_path):
    """RoPE off and CLS pooling (the ablation ladder's early steps) and the last training size are
    recorded in model.json, so every loader rebuilds the same tower and evaluates at that size."""
    from peflow.models.presets import get_model_preset

    torch.manual_seed(0)
    model = build_model(get_model_preset("test").with_arch(rope=False, pool="cls")).eval()
    trunk = model.visual.trunk
    assert trunk.rope is None and trunk.attn_pool is None and trunk.global_pool == "token"
    model.visual.image_size = (24, 24)
    save_model(model, tmp_path / "m")
    card = json.loads((tmp_path / "m" / MODEL_CARD).read_text())
    assert card["arch"] == {"rope": False, "pool": "cls"} and card["image_size"] == 24
    loaded = load_model(tmp_path / "m")
    assert loaded.visual.trunk.rope is None and loaded.visual.image_size == (24, 24)
    x = torch.randn(2, 3, 24, 24)
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(x), model.encode_image(x))
    # the default tower records nothing extra, and a bad switch is a one-line error naming the card
    save_model(build_model("test"), tmp_path / "d")
    assert "arch" not in json.loads((tmp_path / "d" / MODEL_CARD).read_text())
    card["arch"] = {"rope": False, "pool": "mean"}
    (tmp_path / "m" / MODEL_CARD).write_text(json.dumps(card))
    with pytest.raises(ValueError, match=r"model\.json: bad arch \(pool must be one of"):
        load_model(tmp_path / "m")
