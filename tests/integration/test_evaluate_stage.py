"""`peflow evaluate` end to end: tiny corpus + a saved (untrained) model ->
metrics.json, metrics.png, manifest.json and an MLflow run with the same numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from peflow import cli
from peflow.io import dataset_digest, read_json

def peflow(*argv: str) -> int:
    """`peflow ARGV` in-process; returns the exit code."""
    with pytest.raises(SystemExit) as e:
        cli.main(list(argv))
    return e.value.code


ZS_SPLITS = ("test", "shift_sketch", "shift_rendition", "shift_clutter", "shift_pose")


@pytest.fixture(scope="module")
def micro_checkpoint(tmp_path_factory) -> Path:
    import torch

    from peflow.models import build_model, save_model

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("ckpt") / "pretrain"
    save_model(build_model("micro"), out)
    return out


def test_evaluate_stage_end_to_end(tiny_corpus, micro_checkpoint, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("PEFLOW_PARENT_RUN_ID", raising=False)
    out = tmp_path / "evaluate"
    assert peflow("evaluate", "--checkpoint", str(micro_checkpoint), "--data", str(tiny_corpus), "--out", str(out),
                  "--batch-size", "16", "--dsl-reweight", "--experiment", "test-eval") == 0

    metrics = read_json(out / "metrics.json")
    assert all(isinstance(v, float) for v in metrics.values())
    for s in ZS_SPLITS:
        for k in ("top1", "top5"):
            assert 0.0 <= metrics[f"zeroshot/{s}/{k}"] <= 1.0
        assert metrics[f"zeroshot/{s}/top1"] <= metrics[f"zeroshot/{s}/top5"]
    avg = sum(metrics[f"zeroshot/{s}/top1"] for s in ZS_SPLITS) / len(ZS_SPLITS)
    assert metrics["zeroshot/robustness_avg"] == pytest.approx(avg)
    assert metrics["zeroshot/chance_top1"] == pytest.approx(1 / 12)
    # attribute label sets and the colour-typicality split: on the clean split only
    assert metrics["zeroshot_colour/chance_top1"] == pytest.approx(1 / 10)
    assert metrics["zeroshot_position/chance_top1"] == pytest.approx(1 / 5)
    for k in ("zeroshot_colour/test/top1", "zeroshot_colour/test/majority_top1", "zeroshot_position/test/top1",
              "zeroshot/test/top1_typical_colour", "zeroshot/test/top1_atypical_colour"):
        assert 0.0 <= metrics[k] <= 1.0, k
    assert not any(k.startswith("zeroshot_") and "/shift_" in k for k in metrics)
    assert "zeroshot/shift_sketch/top1_atypical_colour" not in metrics
    for prefix in ("retrieval", "retrieval_dsl"):
        for d in ("i2t", "t2i"):
            rs = [metrics[f"{prefix}/{d}/R{k}"] for k in (1, 5, 10)]
            assert rs == sorted(rs) and 0.0 <= rs[0] and rs[-1] <= 1.0
    assert (out / "metrics.png").stat().st_size > 1000

    manifest = read_json(out / "manifest.json")
    assert manifest["stage"] == "evaluate"
    assert manifest["inputs"]["data"] == dataset_digest(tiny_corpus)
    assert manifest["inputs"]["checkpoint"] == dataset_digest(micro_checkpoint)
    assert manifest["counts"]["images/test"] == 24 and manifest["counts"]["classes"] == 12
    assert set(manifest["outputs"]) >= {"metrics.json", "metrics.png"}

    # MLflow: a local SQLite store beside the output, one run with the same numbers
    import mlflow

    db = tmp_path / "mlruns" / "mlflow.db"
    assert db.is_file()
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{db}")
    exp = client.get_experiment_by_name("test-eval")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.data.tags["peflow.stage"] == "evaluate"
    assert run.data.tags["input.data.digest"] == manifest["inputs"]["data"]
    assert run.data.metrics == pytest.approx(metrics)
    assert run.data.params["checkpoint"] == str(micro_checkpoint)
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"metrics.png", "metrics.json"} <= names

    # another batch size: the same metrics (batching does not change the protocol)
    out2 = tmp_path / "evaluate2"
    assert peflow("evaluate", "--checkpoint", str(micro_checkpoint), "--data", str(tiny_corpus), "--out", str(out2),
                  "--batch-size", "7", "--dsl-reweight", "--experiment", "test-eval", "--force") == 0
    assert read_json(out2 / "metrics.json") == pytest.approx(metrics, abs=1e-9)


def test_evaluate_bad_input_is_a_clear_error(tiny_corpus, micro_checkpoint, tmp_path, capsys):
    common = ("--data", str(tiny_corpus), "--out", str(tmp_path / "o"))
    assert peflow("evaluate", "--checkpoint", str(tmp_path / "nope"), *common) == 2
    assert "does not exist" in capsys.readouterr().err
    assert peflow("evaluate", "--checkpoint", str(micro_checkpoint), *common, "--splits", "test,shift_nope") == 2
    assert "shift_nope" in capsys.readouterr().err
    assert peflow("evaluate", "--checkpoint", str(micro_checkpoint), *common, "--templates", "klingon") == 2
    assert "template" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_bad_checkpoints_are_one_line_errors_naming_the_file(tiny_corpus, micro_checkpoint, tmp_path, capsys):
    import os
    import shutil

    random_pt = tmp_path / "X.pt"
    random_pt.write_bytes(os.urandom(5000))
    cut = tmp_path / "cut"
    shutil.copytree(micro_checkpoint, cut)
    data = (cut / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(data[: len(data) // 3])
    for ckpt, name in ((random_pt, "X.pt"), (cut, "model.safetensors")):
        assert peflow("evaluate", "--checkpoint", str(ckpt), "--model", "test", "--data", str(tiny_corpus),
                      "--out", str(tmp_path / "o")) == 2
        err = capsys.readouterr().err
        assert name in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert not (tmp_path / "o").exists()


def test_evaluate_metric_names_documented():
    doc = (Path(__file__).resolve().parents[2] / "docs" / "metrics.md").read_text()
    for name in ("zeroshot/<split>/top1", "zeroshot/robustness_avg", "retrieval/i2t/R1", "retrieval_dsl/",
                 "zeroshot_colour/<split>/top1", "top1_atypical_colour", "zeroshot_<set>/chance_top1"):
        assert name in doc, name
    json.dumps(doc)  # plain text
