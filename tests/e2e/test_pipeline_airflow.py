"""End to end through the real stack: `airflow standalone` (API server,
scheduler, DAG processor, triggerer) and a real `mlflow server`. Trigger
pe_pipeline over REST with the tiny `test` preset and the recipe ablation on,
poll it to success, read the run tree and the run report back from the MLflow
server, and look at it in headless Chromium."""

import contextlib
import os
import subprocess
import urllib.parse
from pathlib import Path

import pytest

from peflow.airflow_api import AirflowAPI
from tests.helpers import BIN, ROOT, free_port, offline_env

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
ARTIFACTS = Path(os.environ.get("PEFLOW_TEST_ARTIFACTS", ROOT / "test-artifacts"))
CHROMIUM = "/usr/bin/chromium"
ENV_KEYS = ("PEFLOW_HOME", "PEFLOW_AIRFLOW_PORT", "PEFLOW_MLFLOW_PORT")


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    home = tmp_path_factory.mktemp("peflow_home")
    env = offline_env(PEFLOW_HOME=str(home), PEFLOW_AIRFLOW_PORT=str(free_port()),
                      PEFLOW_MLFLOW_PORT=str(free_port()), PEFLOW_STORE=str(home / "store"))  # its own store
    py = str(BIN / "python")
    up = subprocess.run([py, "-m", "peflow.services", "up"], env=env, cwd=ROOT, capture_output=True, text=True,
                        timeout=600)
    saved = {k: os.environ.get(k) for k in ENV_KEYS}
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        os.environ.update({k: env[k] for k in ENV_KEYS})
        from peflow import services

        yield services
    finally:
        subprocess.run([py, "-m", "peflow.services", "down"], env=env, cwd=ROOT, timeout=120)
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


@pytest.fixture(scope="module")
def pipeline_run(stack, tiny_corpus):
    api = AirflowAPI(stack.airflow_url(), "admin", stack.airflow_password())
    api.wait_for_dag("pe_pipeline")
    run_id = api.trigger("pe_pipeline", {"preset": "test", "data_source": str(tiny_corpus), "nodes": "2x1",
                                         "ablation": True, "engine_ablation": True})
    state = api.wait_run("pe_pipeline", run_id)["state"]
    tis = {_label(t): t["state"] for t in api.task_instances("pe_pipeline", run_id)}
    return run_id, state, tis


def _label(ti: dict) -> str:
    """`pretrain`, or `pretrain_ablation[0]` for an instance of a mapped task (a variant's)."""
    index = ti.get("map_index", -1)
    return ti["task_id"] if index is None or index < 0 else f"{ti['task_id']}[{index}]"


#: the ladder's mapped tasks: skipped (no member) when the Param `ladder` is off
LADDER_OFF = {"pretrain_ladder": "skipped", "evaluate_ladder": "skipped"}


def _seconds(run: dict) -> float:
    from datetime import datetime

    start, end = (datetime.fromisoformat(run[k].replace("Z", "+00:00")) for k in ("start_date", "end_date"))
    return (end - start).total_seconds()


def test_a_new_run_with_stage_evaluate_reruns_only_evaluate(stack, pipeline_run, tiny_corpus):
    """A second DAG run from the form, `stage: evaluate`: a fresh run folder, the upstream outputs
    reused from the first run's (through the output store), evaluate (and its ablation twin) rerun."""
    run_id, state, _ = pipeline_run
    assert state == "success"
    api = AirflowAPI(stack.airflow_url(), "admin", stack.airflow_password())
    second = api.trigger("pe_pipeline", {"preset": "test", "data_source": str(tiny_corpus), "stage": "evaluate",
                                         "ablation": True, "engine_ablation": True})
    run = api.wait_run("pe_pipeline", second)
    tis = {_label(t): t for t in api.task_instances("pe_pipeline", second)}
    assert run["state"] == "success", {k: t["state"] for k, t in tis.items()}
    durations = {k: round(t["duration"] or 0, 1) for k, t in tis.items()}
    print(f"stage-evaluate run: {_seconds(run):.0f}s, task durations {durations}")
    summaries = {k: api.xcom("pe_pipeline", second, t["task_id"], map_index=t.get("map_index", -1))
                 for k, t in tis.items() if t["state"] == "success"
                 and not k.endswith("_members") and k not in ("start_run", "end_run")}
    ran = {t: (s["ran"], s["reused"]) for t, s in summaries.items()}
    evaluates = {"evaluate", "evaluate_ablation[0]", "evaluate_metadata[0]"}
    assert ran == {t: (True, None) if t in evaluates else (False, "data source" if t == "synth" else "store")
                   for t in summaries}, ran
    first = api.xcom("pe_pipeline", run_id, "evaluate")
    assert summaries["evaluate"]["out"] != first["out"] and summaries["evaluate"]["metrics"] == first["metrics"]
    assert all(t["try_number"] == 1 for k, t in tis.items() if k not in LADDER_OFF)  # skipped ones never ran


def test_a_bad_field_fails_at_once_without_retries(stack, pipeline_run, tiny_corpus):
    api = AirflowAPI(stack.airflow_url(), "admin", stack.airflow_password())
    bad = api.trigger("pe_pipeline", {"preset": "test", "data_source": str(tiny_corpus),
                                      "overrides": "pretrain.stepz=3"})
    run = api.wait_run("pe_pipeline", bad, timeout=300, poll=1)
    tis = {t["task_id"]: t for t in api.task_instances("pe_pipeline", bad)}
    assert run["state"] == "failed"
    start = tis["start_run"]
    assert start["state"] == "failed" and start["try_number"] == 1, start  # not retried
    assert start["duration"] < 10, start["duration"]
    assert {tis[t]["state"] for t in ("validate", "pretrain", "evaluate")} == {"upstream_failed"}
    print(f"bad-field run: failed in {_seconds(run):.0f}s, start_run {start['duration']:.1f}s")
    log = _logs(stack, bad)
    assert "pretrain" in log and "stepz" in log, log[-2000:]
    # A preset outside the form's enum is refused at trigger time, naming the parameter.
    with pytest.raises(RuntimeError, match="preset"):
        api.trigger("pe_pipeline", {"preset": "huge"})


def test_trigger_over_rest_and_read_runs_from_mlflow(stack, pipeline_run):
    run_id, state, tis = pipeline_run
    assert state == "success", f"{state}: {tis}\n" + _logs(stack, run_id)
    assert {k: v for k, v in tis.items() if k not in LADDER_OFF} == {k: "success" for k in tis if k not in LADDER_OFF}
    assert {k: tis[k] for k in LADDER_OFF} == LADDER_OFF
    assert "pretrain_ablation[0]" in tis and "evaluate_metadata[0]" in tis  # variants: mapped stage tasks

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=stack.mlflow_uri())
    exp = client.get_experiment_by_name("peflow")
    runs = client.search_runs([exp.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("airflow.run_id") == run_id]
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["airflow.dag_id"] == "pe_pipeline"
    assert len(parent.data.tags["peflow.git_commit"]) >= 7
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    by_stage = {r.data.tags["peflow.stage"]: r for r in children}
    assert {"validate", "pretrain", "train-captioner", "caption", "validate-captions", "finetune-video",
            "align-lang", "align-spatial", "evaluate"} <= set(by_stage)
    recipes = sorted(r.data.params["recipe"] for r in children if r.data.tags["peflow.stage"] == "pretrain")
    assert recipes == ["pe-adamw", "vanilla"]  # the ablation trained the other recipe too
    assert "ablation/evaluate/zeroshot/test/top1" in parent.data.metrics
    report = Path(mlflow.artifacts.download_artifacts(run_id=parent.info.run_id, artifact_path="report.html",
                                                      tracking_uri=stack.mlflow_uri())).read_text()
    assert "main (pe-adamw)" in report and "ablation (vanilla)" in report and "evaluate/zeroshot/test/top1" in report
    assert "metadata/evaluate/video/finetuned/zeroshot/top1" in parent.data.metrics  # the engine ablation
    assert "finetuned on title + description (a)" in report and "finetuned on the engine" in report
    assert "PE lang: question answering" in report and "PE spatial, last layer" in report
    for name in ("validate", "pretrain", "evaluate"):
        tags = by_stage[name].data.tags
        assert any(k.startswith("dvc.") and k.endswith(".md5") for k in tags), (name, tags)
    assert any(k.startswith("evaluate/zeroshot/") for k in parent.data.metrics), parent.data.metrics


def _browser(p):
    return p.chromium.launch(executable_path=CHROMIUM, args=[
        "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"])


def _login(page, stack):
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    page.goto(stack.airflow_url() + "/", wait_until="networkidle")
    page.fill("input[name=username]", "admin")
    page.fill("input[name=password]", stack.airflow_password())
    page.click("button:has-text('Sign in')")
    # The redirect after sign-in can come after the network is first idle: wait for the URL itself.
    with contextlib.suppress(PlaywrightTimeout):
        page.wait_for_url(lambda url: "/auth/login" not in url, timeout=30_000)
    page.wait_for_load_state("networkidle")
    assert "/auth/login" not in page.url


@pytest.mark.skipif(not Path(CHROMIUM).exists() and not os.environ.get("CI"), reason="needs Debian chromium")
def test_browser_trigger_form_and_grid(stack, pipeline_run):
    from playwright.sync_api import sync_playwright

    run_id, state, _ = pipeline_run
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = _browser(p)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        _login(page, stack)

        page.goto(stack.airflow_url() + "/dags/pe_pipeline", wait_until="networkidle")
        page.get_by_role("button", name="Trigger").first.click()
        form = page.get_by_role("dialog")
        form.get_by_text("Run Parameters").wait_for()
        text = form.inner_text()
        page.screenshot(path=str(ARTIFACTS / "airflow-trigger-form.png"))
        for title in ("Preset", "Data source", "Scheduler", "Nodes", "Stage", "Recipe", "Seed", "Experiment",
                      "Max failure rate", "Ablation", "Engine ablation", "Ladder", "Steps", "Overrides"):
            assert title in text, f"Params form lacks {title!r}"
        page.keyboard.press("Escape")

        page.goto(f"{stack.airflow_url()}/dags/pe_pipeline/runs/{urllib.parse.quote(run_id, safe='')}",
                  wait_until="networkidle")
        page.get_by_text("Task Instances").first.wait_for()
        page.wait_for_timeout(1500)
        page.screenshot(path=str(ARTIFACTS / "airflow-run-grid.png"), full_page=True)
        for task_id in ("start_run", "synth", "validate", "pretrain", "evaluate", "pretrain_ablation", "end_run"):
            link = f"a[href$='/tasks/{task_id}'], a[href*='/tasks/{task_id}/mapped']"  # a mapped task's instance too
            row = page.locator("tr", has=page.locator(link)).first
            assert "Success" in row.inner_text(), f"{task_id}: {row.inner_text()!r}"
        browser.close()


def _logs(stack, run_id: str) -> str:
    out = []
    for p in sorted((stack.airflow_home() / "logs").rglob("*.log")):
        if run_id in str(p):
            out.append(f"--- {p}\n{p.read_text()[-3000:]}")
    return "\n".join(out[-6:])
