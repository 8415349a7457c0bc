"""`peflow run`: the whole pipeline through the same task functions the DAG
uses (pretrain launched through TorchX, 2 processes), then one stage re-run
on the upstream outputs already there."""

import json

import mlflow
import pytest

from peflow import io, orchestration

pytestmark = pytest.mark.slow


def test_run_all_then_rerun_one_stage(tmp_path, tiny_corpus, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    cfg = orchestration.RunConfig(out=str(tmp_path / "run"), preset="test", data_source=str(tiny_corpus))
    summaries = orchestration.run_pipeline(cfg)
    assert [s["stage"] for s in summaries] == ["validate", "pretrain", "evaluate"]
    assert all(s["ran"] for s in summaries)
    assert (tmp_path / "run" / "pretrain" / "model.safetensors").is_file()
    metrics = summaries[-1]["metrics"]
    assert "zeroshot/test/top1" in metrics and "retrieval/i2t/R1" in metrics
    model_digest = io.read_json(tmp_path / "run" / "pretrain" / io.MANIFEST)["output_digest"]

    again = orchestration.run_pipeline(orchestration.RunConfig(
        out=str(tmp_path / "run"), preset="test", data_source=str(tiny_corpus), stage="evaluate"))
    assert [(s["stage"], s["ran"]) for s in again] == [("validate", False), ("pretrain", False), ("evaluate", True)]
    assert io.read_json(tmp_path / "run" / "pretrain" / io.MANIFEST)["output_digest"] == model_digest
    assert again[-1]["metrics"] == metrics  # same inputs, same numbers

    client = mlflow.MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("peflow").experiment_id])
    parents = [r for r in runs if r.data.tags.get("peflow.orchestrator") == "peflow run"]
    assert len(parents) == 2 and all(r.info.status == "FINISHED" for r in parents)
    for parent in parents:
        children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        assert children, "stage runs are children of the pipeline run"
    first = min(parents, key=lambda r: r.info.start_time)
    stages = {r.data.tags["peflow.stage"] for r in runs if r.data.tags.get("mlflow.parentRunId") == first.info.run_id}
    assert stages == {"validate", "pretrain", "evaluate"}
    pre = next(r for r in runs if r.data.tags.get("peflow.stage") == "pretrain")
    assert pre.data.tags["dvc.data.md5"].endswith(".dir")
    assert json.loads((tmp_path / "run" / "evaluate" / io.METRICS).read_text()) == metrics

    # The registry: the trained model is a peflow-core version, candidate and (first evaluation) champion.
    aliases = client.get_registered_model("peflow-core").aliases
    assert aliases["candidate"] == aliases["champion"], aliases
    champion = client.get_model_version("peflow-core", str(aliases["champion"]))
    assert champion.tags["peflow.checkpoint_digest"] == io.dataset_digest(tmp_path / "run" / "pretrain")
    assert float(champion.tags["metric.zeroshot/test/top1"]) == pytest.approx(metrics["zeroshot/test/top1"])
    # The run report, written and logged to each pipeline run.
    assert "evaluate/zeroshot/test/top1" in (tmp_path / "run" / "report.html").read_text()
    assert "report.html" in {a.path for a in client.list_artifacts(first.info.run_id)}
