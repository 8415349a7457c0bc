"""End to end: the real `airflow standalone` (API server, scheduler, DAG
processor, triggerer) and a real `mlflow server`; trigger pe_pipeline over
REST with the tiny `test` preset, poll it to success, read the run tree back
from the MLflow server."""

import json
import os
import subprocess

import pytest

from peflow.airflow_api import AirflowAPI
from tests.helpers import BIN, ROOT, free_port, offline_env

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    home = tmp_path_factory.mktemp("peflow_home")
    env = offline_env(PEFLOW_HOME=str(home), PEFLOW_AIRFLOW_PORT=str(free_port()),
                      PEFLOW_MLFLOW_PORT=str(free_port()))
    py = str(BIN / "python")
    up = subprocess.run([py, "-m", "peflow.services", "up"], env=env, cwd=ROOT, capture_output=True, text=True,
                        timeout=600)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        os.environ.update({k: env[k] for k in ("PEFLOW_HOME", "PEFLOW_AIRFLOW_PORT", "PEFLOW_MLFLOW_PORT")})
        from peflow import services

        yield services, env
    finally:
        subprocess.run([py, "-m", "peflow.services", "down"], env=env, cwd=ROOT, timeout=120)
        for k in ("PEFLOW_HOME", "PEFLOW_AIRFLOW_PORT", "PEFLOW_MLFLOW_PORT"):
            os.environ.pop(k, None)


def test_trigger_over_rest_and_read_runs_from_mlflow(stack, tiny_corpus):
    services, env = stack
    api = AirflowAPI(services.airflow_url(), "admin", services.airflow_password())
    api.wait_for_dag("pe_pipeline")
    run_id = api.trigger("pe_pipeline", {"preset": "test", "data_source": str(tiny_corpus), "nodes": "2x1"})
    import time

    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        state = api.dag_run("pe_pipeline", run_id)["state"]
        if state in ("success", "failed"):
            break
        time.sleep(3)
    tis = {t["task_id"]: t["state"] for t in api.task_instances("pe_pipeline", run_id)}
    assert state == "success", f"{state}: {tis}\n" + _logs(services, run_id)
    assert all(s == "success" for s in tis.values()), tis

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=services.mlflow_uri())
    exp = client.get_experiment_by_name("peflow")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("airflow.run_id") == run_id]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["airflow.dag_id"] == "pe_pipeline"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    stages = {r.data.tags["peflow.stage"] for r in children}
    assert {"validate", "pretrain", "evaluate"} <= stages
    for r in children:
        assert any(k.startswith("dvc.") and k.endswith(".md5") for k in r.data.tags), r.data.tags


def _logs(services, run_id: str) -> str:
    logs = services.airflow_home() / "logs"
    out = []
    for p in sorted(logs.rglob("*.log")):
        if run_id.replace(":", "") in str(p).replace(":", "") or "run_id=" + run_id in str(p):
            out.append(f"--- {p}\n{p.read_text()[-3000:]}")
    return "\n".join(out[-6:])
