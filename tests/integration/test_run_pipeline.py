"""`peflow run`: the whole pipeline through the same task functions the DAG
uses (pretrain and finetune-video launched through TorchX, 2 processes; the
video data engine in between), then one stage re-run
on the upstream outputs already there, the same in a fresh output folder
(upstream outputs from the store), and one changed pretrain field rerunning
pretrain and what reads it."""

import json

import mlflow
import pytest

from peflow import io, orchestration

pytestmark = pytest.mark.slow

VIDEO_CHAIN = ("validate", "pretrain", "train-captioner", "caption", "validate-captions", "finetune-video",
               "align-lang", "align-spatial", "evaluate")


def test_run_all_then_rerun_one_stage(tmp_path, tiny_corpus, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    cfg = orchestration.RunConfig(out=str(tmp_path / "run"), preset="test", data_source=str(tiny_corpus))
    summaries = orchestration.run_pipeline(cfg)
    assert [(s["stage"], s["ran"], s["reused"]) for s in summaries] == [
        ("synth", False, "data source"), *((n, True, None) for n in VIDEO_CHAIN)]
    assert (tmp_path / "run" / "pretrain" / "model.safetensors").is_file()
    assert (tmp_path / "run" / "finetune-video" / "model.safetensors").is_file()
    metrics = summaries[-1]["metrics"]
    assert "zeroshot/test/top1" in metrics and "retrieval/i2t/R1" in metrics
    assert "video/core/zeroshot/top1" in metrics and "video/finetuned/retrieval/t2v/R1" in metrics
    assert "lang/chosen/qa/image/mean" in metrics and "dense/spatial_last/track_j" in metrics
    assert "refined/bleu4" in summaries[3]["metrics"] and "engine/cider" in summaries[4]["metrics"]
    model_digest = io.read_json(tmp_path / "run" / "pretrain" / io.MANIFEST)["output_digest"]

    again = orchestration.run_pipeline(orchestration.RunConfig(
        out=str(tmp_path / "run"), preset="test", data_source=str(tiny_corpus), stage="evaluate"))
    assert [(s["stage"], s["ran"], s["reused"]) for s in again[1:]] == [
        *((n, False, "up-to-date") for n in VIDEO_CHAIN[:-1]), ("evaluate", True, None)]
    assert io.read_json(tmp_path / "run" / "pretrain" / io.MANIFEST)["output_digest"] == model_digest
    assert again[-1]["metrics"] == metrics  # same inputs, same numbers

    # A fresh output folder: the upstream outputs come from the store of the earlier runs.
    fresh = orchestration.run_pipeline(orchestration.RunConfig(
        out=str(tmp_path / "fresh"), preset="test", data_source=str(tiny_corpus), stage="evaluate"))
    assert [(s["stage"], s["ran"], s["reused"]) for s in fresh[1:]] == [
        *((n, False, "store") for n in VIDEO_CHAIN[:-1]), ("evaluate", True, None)]
    assert io.read_json(tmp_path / "fresh" / "pretrain" / io.MANIFEST)["output_digest"] == model_digest
    assert fresh[-1]["metrics"] == metrics

    # The registry: the trained model is a peflow-core version, candidate and (first evaluation) champion.
    client = mlflow.MlflowClient()
    aliases = client.get_registered_model("peflow-core").aliases
    assert aliases["candidate"] == aliases["champion"] == 1, aliases  # reused runs register nothing new
    champion = client.get_model_version("peflow-core", "1")
    assert champion.tags["peflow.checkpoint_digest"] == io.dataset_digest(tmp_path / "run" / "pretrain")
    assert float(champion.tags["metric.zeroshot/test/top1"]) == pytest.approx(metrics["zeroshot/test/top1"])
    for name in ("peflow-captioner", "peflow-video", "peflow-lang", "peflow-spatial"):
        assert client.get_registered_model(name).aliases["candidate"] == 1, name

    # The training steps changed (pretrain's and finetune-video's): everything after validate reruns.
    changed = orchestration.run_pipeline(orchestration.RunConfig(
        out=str(tmp_path / "changed"), preset="test", data_source=str(tiny_corpus), steps=21))
    assert [(s["stage"], s["ran"]) for s in changed[1:]] == [("validate", False),
                                                            *((n, True) for n in VIDEO_CHAIN[1:])]
    assert io.read_json(tmp_path / "changed" / "pretrain" / "metrics.json")["train/steps"] == 21

    runs = client.search_runs([client.get_experiment_by_name("peflow").experiment_id])
    parents = [r for r in runs if r.data.tags.get("peflow.orchestrator") == "peflow run"]
    assert len(parents) == 4 and all(r.info.status == "FINISHED" for r in parents)
    for parent in parents:
        children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        assert children, "stage runs are children of the pipeline run"  # every run ran evaluate at least
    first = min(parents, key=lambda r: r.info.start_time)
    stages = {r.data.tags["peflow.stage"] for r in runs if r.data.tags.get("mlflow.parentRunId") == first.info.run_id}
    assert stages == set(VIDEO_CHAIN)
    pre = next(r for r in runs if r.data.tags.get("peflow.stage") == "pretrain")
    assert pre.data.tags["peflow.output_key"]
    assert pre.data.tags["dvc.data.md5"].endswith(".dir")
    assert json.loads((tmp_path / "run" / "evaluate" / io.METRICS).read_text()) == metrics

    # The run report, written and logged to each pipeline run.
    assert "evaluate/zeroshot/test/top1" in (tmp_path / "run" / "report.html").read_text()
    assert "report.html" in {a.path for a in client.list_artifacts(first.info.run_id)}
