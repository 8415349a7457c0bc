"""The video stages on the test corpus, in-process through the stage runner: the captioner
(both phases scored), the engine (model captions in PVD layout; bad videos quarantined
with a reason), validate-captions (loops, prompt echoes and empty captions quarantined),
and video finetuning (saved, registered, resumable exactly)."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from peflow import presets, runner
from peflow.data import formats

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def engine_outputs(tmp_path_factory, tiny_corpus) -> dict[str, Path]:
    """A test PE model, the captioner trained on the tiny corpus, and the engine's captions of it."""
    from peflow.models.pe import build_model, save_model

    root = tmp_path_factory.mktemp("engine")
    torch.manual_seed(0)
    save_model(build_model("test"), root / "pe")
    test = presets.test()
    runner.execute("train-captioner", runner_cfg(test, "train-captioner", checkpoint=root / "pe", data=tiny_corpus,
                                                 out=root / "captioner"))
    runner.execute("caption", runner_cfg(test, "caption", captioner=root / "captioner", data=tiny_corpus,
                                         out=root / "caption"))
    return {"pe": root / "pe", "captioner": root / "captioner", "caption": root / "caption", "root": root}


def runner_cfg(preset, stage: str, **fields):
    from peflow import config

    return config.replace(preset.config(stage), {k: str(v) for k, v in fields.items()}, where=stage)


def test_captioner_is_scored_before_and_after_the_human_phase(engine_outputs):
    out = engine_outputs["captioner"]
    metrics = json.loads((out / "metrics.json").read_text())
    for phase in ("base", "refined"):
        for k in ("bleu4", "cider", "recall_shape", "recall_colour", "recall_action", "final_loss"):
            assert f"{phase}/{k}" in metrics, (phase, k)
    examples = json.loads((out / "examples.json").read_text())
    assert examples and {"human", "base", "refined"} <= set(examples[0])
    assert (out / "lm" / "tokenizer.json").is_file() and (out / "vlm.safetensors").is_file()


def test_engine_fills_model_captions_in_pvd_layout(engine_outputs, tiny_corpus):
    out = engine_outputs["caption"]
    videos = list(formats.iter_video(formats.shard_paths(out, "train", kind="video"), num_frames=2))
    assert len(videos) == 20
    assert all(v["model_caption"] for v in videos)
    assert all(set(v["meta"]["engine"]) == {"clip_caption", "frame_captions", "summarizer"} for v in videos)
    assert all(len(v["meta"]["engine"]["frame_captions"]) == 3 for v in videos)
    raw_in = _members(formats.shard_paths(tiny_corpus, "train", kind="video")[0])
    raw_out = _members(formats.shard_paths(out, "train", kind="video")[0])
    assert raw_in["train-0000000.mp4"] == raw_out["train-0000000.mp4"]  # media bytes unchanged
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"engine/bleu4", "clip/cider", "metadata/recall_action", "speed/caption_videos_per_s"} <= set(metrics)
    assert formats.label_names(out, "video")[0] == "move left"  # the card travels with the captions


def _members(path: str) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}


def _write_shard(path: Path, samples: dict[str, dict[str, bytes]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for key, entries in samples.items():
            for ext, data in entries.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_engine_quarantines_videos_that_do_not_decode(engine_outputs, tiny_corpus, tmp_path):
    data = tmp_path / "bad"
    shutil.copytree(tiny_corpus / "video" / "val", data / "video" / "val")
    shutil.copy(tiny_corpus / "card.json", data / "card.json")
    good = _members(formats.shard_paths(tiny_corpus, "val", kind="video")[0])
    mp4 = good["val-0000000.mp4"]
    meta = json.loads(good["val-0000000.json"])
    bad = {"cut": mp4[: len(mp4) // 3], "empty": b"", "notvideo": b"\x89PNG\r\n\x1a\n" + bytes(200)}
    _write_shard(data / "video" / "val" / "shard-000009.tar",
                 {k: {"mp4": v, "json": json.dumps({**meta, "video_id": k}).encode()} for k, v in bad.items()})
    cfg = runner_cfg(presets.test(), "caption", captioner=engine_outputs["captioner"], data=data,
                     out=tmp_path / "out", splits="val", eval_split="val")
    runner.execute("caption", cfg)
    lines = [json.loads(x) for x in (tmp_path / "out" / "quarantine.jsonl").read_text().splitlines()]
    assert sorted(q["key"] for q in lines) == ["cut", "empty", "notvideo"]
    assert all(q["reason"].startswith("media_undecodable: ") for q in lines)
    kept = list(formats.iter_video(formats.shard_paths(tmp_path / "out", "val", kind="video"), num_frames=1))
    assert len(kept) == 8 and json.loads((tmp_path / "out" / "metrics.json").read_text())["quarantined"] == 3


def test_validate_captions_quarantines_loops_echoes_and_empty_captions(engine_outputs, tmp_path):
    data = tmp_path / "captions"
    shutil.copytree(engine_outputs["caption"], data)
    shard = Path(formats.shard_paths(data, "val", kind="video")[0])
    members = _members(str(shard))
    planted = {"val-0000000": "the red circle the red circle the red circle the red circle the red circle",
               "val-0000001": "Title: red circle. Video caption: a circle. Frame captions: a circle",
               "val-0000002": ""}
    samples: dict[str, dict[str, bytes]] = {}
    for name, data_bytes in members.items():
        key, _, ext = name.partition(".")
        if ext == "json" and key in planted:
            data_bytes = json.dumps({**json.loads(data_bytes), "model_caption": planted[key]}).encode()
        samples.setdefault(key, {})[ext] = data_bytes
    _write_shard(shard, samples)
    cfg = runner_cfg(presets.test(), "validate-captions", data=data, out=tmp_path / "out")
    cfg.max_caption_repeats, cfg.max_failure_rate = 3, 0.9
    runner.execute("validate-captions", cfg)
    reasons = {q["key"]: q["reasons"] for q in map(json.loads, (tmp_path / "out" / "quarantine.jsonl").read_text()
                                                   .splitlines())}
    assert "model_caption_repetition_loop" in reasons["val-0000000"]
    assert "model_caption_prompt_echo" in reasons["val-0000001"]
    assert "model_caption_missing" in reasons["val-0000002"]
    passed = {v["key"] for v in formats.iter_video(formats.shard_paths(tmp_path / "out", "val", kind="video"),
                                                   num_frames=1)}
    assert not passed & set(planted) and passed


def test_finetune_video_trains_registers_and_resumes_exactly(engine_outputs, tmp_path, monkeypatch):
    from peflow.engine.clips import read_clips
    from peflow.train.objectives.video_clip import VideoClipObjective
    from peflow.train.recipe import get_recipe
    from peflow.train.trainer import Dist, TrainSettings, fit

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    cfg = runner_cfg(presets.test(), "finetune-video", checkpoint=engine_outputs["pe"], data=engine_outputs["caption"],
                     out=tmp_path / "ft")
    runner.execute("finetune-video", cfg)
    metrics = json.loads((tmp_path / "ft" / "metrics.json").read_text())
    assert metrics["train/final_loss"] > 0 and (tmp_path / "ft" / "model.safetensors").is_file()
    import mlflow

    assert mlflow.MlflowClient().get_registered_model("peflow-video").aliases["candidate"] == 1

    clips = read_clips(engine_outputs["caption"], "train", frames=2)

    def train(ckpt: Path, on_step=None):
        objective = VideoClipObjective(init_from=str(engine_outputs["pe"]), frames=np.stack([c.frames for c in clips]),
                                       captions=[c.meta["model_caption"] for c in clips], recipe=get_recipe("pe"))
        settings = TrainSettings(ckpt_dir=ckpt, steps=4, global_batch=8, lr=1e-3, warmup_steps=1,
                                 checkpoint_every=2)
        return fit(objective, settings, Dist(), on_step=on_step, progress=False)

    def killed(row):
        if row["step"] == 1:  # after the step-2 checkpoint: the process dies here
            raise KeyboardInterrupt

    whole, _ = train(tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "split", killed)
    resumed, history = train(tmp_path / "split")
    assert [r["step"] for r in history] == [0, 1, 2, 3]
    for (k, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k


def test_engine_with_the_llm_summarizer_from_a_local_chat_model(engine_outputs, tiny_corpus, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from peflow.models.lm import train_tokenizer

    tok = train_tokenizer(["Create a concise caption of a video.", "a red circle moves to the left"] * 4, 300)
    tok.chat_template = ("{% for m in messages %}<s>{{ m['content'] }}</s>{% endfor %}"
                         "{% if add_generation_prompt %}<s>{% endif %}")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2)).save_pretrained(tmp_path / "chat")
    tok.save_pretrained(tmp_path / "chat")
    cfg = runner_cfg(presets.test(), "caption", captioner=engine_outputs["captioner"], data=tiny_corpus,
                     out=tmp_path / "out", splits="val", eval_split="val", summarizer="llm",
                     summarizer_model=tmp_path / "chat")
    runner.execute("caption", cfg)
    videos = list(formats.iter_video(formats.shard_paths(tmp_path / "out", "val", kind="video"), num_frames=1))
    assert len(videos) == 8 and {v["meta"]["engine"]["summarizer"] for v in videos} == {"llm"}
    assert all(isinstance(v["model_caption"], str) for v in videos)
