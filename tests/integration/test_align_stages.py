"""The alignment stages on the test corpus, in-process through the stage runner: align-lang (a given
intermediate layer and the last one, both saved as VLMs and as PE-Lang encoders; the auto layer
probe), align-spatial (superpixel mask logits, and a tiny SAM 2 end to end; a sam2 run without a
model is a config error), and evaluate reading both (QA against the majority answer, the dense
rows with tracking)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from peflow import presets, runner
from peflow.config import ConfigError

pytestmark = pytest.mark.slow


def runner_cfg(preset, stage: str, **fields):
    from peflow import config

    return config.replace(preset.config(stage), {k: str(v) for k, v in fields.items()}, where=stage)


@pytest.fixture(scope="module")
def aligned(tmp_path_factory, tiny_corpus) -> dict[str, Path]:
    """A test PE model, PE lang on its block 2 (and the last block), and PE spatial (superpixels)."""
    from peflow.models.pe import build_model, save_model

    root = tmp_path_factory.mktemp("align")
    torch.manual_seed(0)
    save_model(build_model("test"), root / "pe")
    test = presets.test()
    # log_model off: registration has tests of its own
    lang = runner.execute("align-lang", runner_cfg(test, "align-lang", checkpoint=root / "pe", data=tiny_corpus,
                                                   out=root / "lang", layer="2", log_model=False))
    spatial = runner.execute("align-spatial", runner_cfg(test, "align-spatial", checkpoint=root / "pe",
                                                         data=tiny_corpus, out=root / "spatial"))
    assert lang.ran and spatial.ran
    return {"root": root, "pe": root / "pe", "lang": root / "lang", "spatial": root / "spatial",
            "lang_metrics": lang.metrics, "spatial_metrics": spatial.metrics}


def _metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


def test_align_lang_saves_both_layers_as_vlms_and_pe_lang_encoders(aligned):
    from peflow.models.vlm import load_vlm

    out = aligned["lang"]
    for rel in ("vlm.json", "vlm.safetensors", "lm", "PE-Lang.pt", "last/vlm.json", "last/PE-Lang.pt", "layer.json",
                "history.jsonl", "loss.png", "metrics.json", "manifest.json"):
        assert (out / rel).exists(), rel
    chosen, last = load_vlm(out), load_vlm(out / "last")
    assert chosen.layer == 2 and len(chosen.tower.blocks) == 2
    assert last.layer == 4 and len(last.tower.blocks) == 4
    assert all(b.gamma_1 is None for b in chosen.tower.blocks)  # LayerScale folded in the VLM folder

    enc = torch.load(out / "PE-Lang.pt", map_location="cpu", weights_only=True)
    assert "ln_post.weight" not in enc and not any(k.startswith(("attn_pool", "visual.")) for k in enc)
    assert "transformer.resblocks.1.ls_1.gamma" in enc and "transformer.resblocks.1.ls_2.gamma" in enc
    assert not any(k.startswith("transformer.resblocks.2.") for k in enc)  # 2 blocks only
    enc_last = torch.load(out / "last" / "PE-Lang.pt", map_location="cpu", weights_only=True)
    assert "transformer.resblocks.3.ls_1.gamma" in enc_last and "ln_post.weight" not in enc_last

    metrics = _metrics(out)
    assert metrics["layer"] == 2.0 and metrics["depth"] == 4.0
    for k in ("chosen/final_loss", "last/final_loss", "chosen/first_loss", "last/first_loss"):
        assert metrics[k] > 0, k
    assert json.loads((out / "layer.json").read_text())["rule"] == "given by config"
    rows = [json.loads(r) for r in (out / "history.jsonl").read_text().splitlines()]
    test = presets.test().config("align-lang")
    for layer in (2, 4):
        mine = [r for r in rows if r["layer"] == layer]
        assert [r["phase"] for r in mine] == ["warmup"] * test.warmup_steps + ["align"] * test.steps
        assert [r["step"] for r in mine] == list(range(test.warmup_steps + test.steps))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["layers"] == [2, 4]


def _register_lang(aligned, tiny_corpus, tmp_path, monkeypatch, **fields):
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    cfg = runner_cfg(presets.test(), "align-lang", checkpoint=aligned["pe"], data=tiny_corpus, out=tmp_path / "lang",
                     layer="2", **fields)
    runner.execute("align-lang", cfg)
    return mlflow.MlflowClient().get_registered_model("peflow-lang")


def test_align_lang_registers_pe_lang(aligned, tiny_corpus, tmp_path, monkeypatch):
    model = _register_lang(aligned, tiny_corpus, tmp_path, monkeypatch, compare_last=False)
    assert model.aliases["candidate"] == 1


def test_align_lang_registers_pe_lang_with_the_last_layer_comparison(aligned, tiny_corpus, tmp_path, monkeypatch):
    model = _register_lang(aligned, tiny_corpus, tmp_path, monkeypatch, compare_last=True)
    assert model.aliases["candidate"] == 1


def test_align_lang_auto_layer_is_the_probe_argmax(tiny_corpus, aligned):
    from peflow.engine.clips import read_images
    from peflow.models.pe import load_model
    from peflow.stages.align_lang import Config, choose_layer

    images = read_images(tiny_corpus, "train", limit=40)
    assert any(c.meta.get("qa") for c in images)
    layer, why = choose_layer(Config(layer="auto", probe_images=40), load_model(aligned["pe"]), images)
    scores = why["scores"]
    assert sorted(scores) == [1, 2, 3, 4]
    assert all(0.0 <= s <= 1.0 for s in scores.values())
    assert layer == why["layer"] and scores[layer] == max(scores.values())
    assert layer == max(scores, key=lambda k: (scores[k], k))  # ties: the later layer
    assert why["depth"] == 4 and why["images"] == 40 and why["rule"].startswith("auto")
    json.dumps(why)  # what layer.json holds


def test_align_spatial_with_superpixels(aligned):
    from peflow.models.pe import load_model

    out = aligned["spatial"]
    model = load_model(out)
    assert all(b.gamma_1 is None for b in model.visual.trunk.blocks)
    enc = torch.load(out / "PE-Spatial.pt", map_location="cpu", weights_only=True)
    assert "ln_post.weight" not in enc and not any(k.startswith("attn_pool") for k in enc)
    assert "transformer.resblocks.3.ls_2.gamma" in enc and "conv1.weight" in enc
    teacher = json.loads((out / "teacher.json").read_text())
    assert teacher["rule"] and 1 <= teacher["layer"] <= 4
    metrics = _metrics(out)
    for k in ("train/final_loss_core", "train/final_loss_loc", "masks/images_per_s", "teacher_layer"):
        assert k in metrics, k
    assert metrics["teacher_layer"] == teacher["layer"] and metrics["masks/images_per_s"] > 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["masks"] == "superpixels" and manifest["counts"]["mask_points"] == 16


def test_align_spatial_with_a_tiny_sam2_end_to_end(aligned, tiny_corpus, tmp_path, monkeypatch):
    import mlflow

    from tests.sam2_fixture import tiny_sam2

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    sam2 = tiny_sam2(tmp_path / "sam2")
    out = tmp_path / "spatial-sam2"
    cfg = runner_cfg(presets.test(), "align-spatial", checkpoint=aligned["pe"], data=tiny_corpus, out=out,
                     masks="sam2", sam2_model=sam2, points=4, teacher_layer="2")
    outcome = runner.execute("align-spatial", cfg)
    assert outcome.ran
    metrics = _metrics(out)
    for k in ("train/final_loss", "train/final_loss_core", "train/final_loss_loc", "masks/images_per_s"):
        assert k in metrics and metrics[k] == metrics[k], k  # present, not NaN
    assert metrics["teacher_layer"] == 2.0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["masks"] == "sam2" and manifest["counts"]["mask_points"] == 16
    assert (out / "model.safetensors").is_file() and (out / "PE-Spatial.pt").is_file()
    run = mlflow.search_runs(experiment_names=["peflow"], output_format="list",
                             filter_string="tags.`peflow.masks` = 'sam2'")
    assert len(run) == 1 and run[0].data.tags["peflow.teacher_layer"] == "2"


def test_align_spatial_sam2_without_a_model_is_a_config_error(aligned, tiny_corpus, tmp_path):
    cfg = runner_cfg(presets.test(), "align-spatial", checkpoint=aligned["pe"], data=tiny_corpus,
                     out=tmp_path / "out", masks="sam2")
    with pytest.raises(ConfigError, match="sam2_model"):
        runner.execute("align-spatial", cfg)
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def evaluated(aligned, tiny_corpus) -> Path:
    """evaluate of the test PE model with PE lang and PE spatial."""
    out = aligned["root"] / "eval"
    runner.execute("evaluate", runner_cfg(presets.test(), "evaluate", checkpoint=aligned["pe"], data=tiny_corpus,
                                          out=out, lang=aligned["lang"], spatial=aligned["spatial"], batch_size=64))
    return out


def test_evaluate_reads_pe_lang_and_pe_spatial(evaluated):
    metrics = _metrics(evaluated)
    for k in ("lang/chosen/qa/image/mean", "lang/chosen/qa/image/mean_majority", "lang/last/qa/video/mean",
              "lang/last/qa/video/mean_majority", "dense/core_last/seg_miou", "dense/core_best/seg_layer",
              "dense/spatial_last/seg_miou", "dense/spatial_last/track_j", "dense/core_last/depth_rmse",
              "dense/core_last/track_j", "dense/core_best/track_j"):
        assert k in metrics, k
    for k in ("lang/chosen/qa/image/mean", "lang/chosen/qa/image/mean_majority", "dense/spatial_last/track_j"):
        assert 0.0 <= metrics[k] <= 1.0, k
    assert metrics["lang/chosen/layer"] == 2.0 and metrics["lang/last/layer"] == 4.0
    assert 1.0 <= metrics["dense/core_best/seg_layer"] <= 3.0  # an intermediate layer
    examples = json.loads((evaluated / "qa_examples.json").read_text())
    assert examples and {"model", "layer", "modality", "type", "question", "answer"} <= set(examples[0])
    assert {e["layer"] for e in examples} == {2, 4} and {e["modality"] for e in examples} == {"image", "video"}


def test_qa_examples_name_the_model_that_answered(evaluated):
    examples = json.loads((evaluated / "qa_examples.json").read_text())
    assert {e["model"] for e in examples} == {"chosen", "last"}
