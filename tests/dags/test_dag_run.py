"""`dag.test()` of the whole pe_pipeline with the tiny `test` preset: the real
DAG, real TorchX local launches, a temporary MLflow store; asserts success,
the MLflow run tree and the recorded DVC hashes."""

import json

import pytest

from peflow import orchestration
from tests.dags.airflow_home import run_py

pytestmark = pytest.mark.slow

CODE = r"""
import json, sys
from airflow.dag_processing.dagbag import DagBag
dag = DagBag().get_dag("pe_pipeline")
run = dag.test(run_conf={"preset": "test", "data_source": sys.argv[1], "nodes": "2x1"})
print("RESULT" + json.dumps({"state": str(run.state),
      "tis": {ti.task_id: str(ti.state) for ti in run.get_task_instances()}, "run_id": run.run_id}))
"""


def test_dag_test_runs_the_whole_pipeline(airflow_env, tiny_corpus, tmp_path):
    env = {**airflow_env, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    r = run_py(CODE.replace("sys.argv[1]", repr(str(tiny_corpus))), env, timeout=1200)
    lines = [x for x in r.stdout.splitlines() if x.startswith("RESULT")]
    assert lines, r.stdout[-3000:] + r.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT"):])
    assert result["state"].endswith("success"), result
    variant_tasks = {t.id for t in orchestration.tasks() if t.variant}  # mapped over no member: skipped
    ablation = {t: s for t, s in result["tis"].items() if t in variant_tasks}
    assert result["tis"]["synth"].endswith("success")  # the external data source stands in for it
    assert ablation and all(s.endswith("skipped") for s in ablation.values()), result  # variants off
    assert all(s.endswith("success") for t, s in result["tis"].items() if t not in ablation), result

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("peflow").experiment_id])
    (parent,) = [x for x in runs if x.data.tags.get("airflow.run_id") == result["run_id"]]
    children = {x.data.tags["peflow.stage"]: x for x in runs
                if x.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(children) == {"validate", "pretrain", "train-captioner", "caption", "validate-captions",
                             "finetune-video", "align-lang", "align-spatial", "evaluate"}
    assert children["validate"].data.tags["dvc.data.md5"].endswith(".dir")
    assert children["pretrain"].data.tags["dvc.data.md5"] == children["evaluate"].data.tags["dvc.data.md5"]
    assert children["evaluate"].data.tags["dvc.checkpoint.md5"].endswith(".dir")
    assert parent.info.status == "FINISHED"
    report = client.download_artifacts(parent.info.run_id, "report.html", str(tmp_path))
    assert "evaluate/zeroshot/test/top1" in open(report).read()
