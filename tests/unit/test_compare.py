"""`peflow compare` on a real SQLite tracking store holding pipeline runs made the way
`peflow run` makes them (parent run, stage child runs, stage-prefixed metrics at the end)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from peflow import orchestration, tracking
from peflow.cli import build_app

TOP1 = "evaluate/zeroshot/test/top1"
LOSS = "pretrain/train/final_loss"
SPEED = "pretrain/train/samples_per_s"
EVAL = {"zeroshot/test/top1": 0.10, "zeroshot/robustness_avg": 0.08, "retrieval/i2t/R1": 0.20, "retrieval/t2i/R1": 0.25}


@dataclasses.dataclass
class Pipeline:
    """A pipeline run to make: its recipe, metrics per task (as the stages' metrics.json hold them),
    how it ended (None: still running, so only its stage runs have metrics)."""

    recipe: str
    tasks: dict[tuple[str, str | None], dict[str, float]]
    failed: bool | None = False


# Oldest first. r2 ran an ablation (the vanilla recipe beside pe); r3 failed after pretraining;
# r4 is still running (its pretrain and the ablation's pretrain are done).
RUNS = {
    "r1": Pipeline("vanilla", {("pretrain", None): {"train/final_loss": 2.5, "train/samples_per_s": 100.0},
                               ("evaluate", None): EVAL}),
    "r2": Pipeline("pe", {("pretrain", None): {"train/final_loss": 2.0, "train/samples_per_s": 90.0},
                          ("evaluate", None): {**EVAL, "zeroshot/test/top1": 0.30, "retrieval/i2t/R1": 0.15,
                                               "probe/depth/best": 0.7, "probe/depth/best_layer": 3.0},
                          ("evaluate", "ablation"): {**EVAL, "zeroshot/test/top1": 0.35}}),
    "r3": Pipeline("pe", {("pretrain", None): {"train/final_loss": 3.0, "train/samples_per_s": 150.0}}, failed=True),
    "r4": Pipeline("pe", {("pretrain", None): {"train/final_loss": 1.5, "train/samples_per_s": 80.0},
                          ("pretrain", "ablation"): {"train/final_loss": 2.2, "train/samples_per_s": 85.0}},
                   failed=None),
}


def _pipeline(root: Path, name: str, p: Pipeline, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """One pipeline run as `peflow run` makes it: the parent, a stage run per task (its metrics
    unprefixed), then the parent's prefixed metrics; returns run ids ('pipeline', 'evaluate', ...)."""
    import mlflow

    cfg = orchestration.RunConfig(out=str(root / name), preset="test", recipe=p.recipe, ablation=True)
    ids = {"pipeline": orchestration.start_pipeline_run(cfg, tags={"peflow.orchestrator": "test"})}
    monkeypatch.setenv(tracking.PARENT_ENV, ids["pipeline"])
    summaries = []
    for (stage, variant), metrics in p.tasks.items():
        out = orchestration.stage_dir(cfg, stage, variant)
        recipe = orchestration.task_recipe(cfg, variant)
        with tracking.stage_run(stage, out_dir=out, config={"out": str(out), "recipe": recipe}) as run:
            mlflow.log_metrics(metrics)
            ids[orchestration.Task(stage, variant).id] = run.info.run_id
        summaries.append({"stage": stage, "task": orchestration.Task(stage, variant).id, "variant": variant,
                          "recipe": recipe, "out": str(out), "ran": True, "seconds": 1.0, "metrics": metrics})
    if p.failed is not None:
        orchestration.end_pipeline_run(cfg, ids["pipeline"], summaries, failed=p.failed)
    return ids


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, dict[str, str]]]:
    """A tracking store with the pipeline runs RUNS and an empty experiment 'empty';
    returns the URI and the run ids."""
    import mlflow

    root = tmp_path_factory.mktemp("compare")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
        ids = {name: _pipeline(root, name, p, mp) for name, p in RUNS.items()}
        mlflow.MlflowClient(uri).create_experiment("empty")
    return uri, ids


def _invoke(*args: str, columns: int = 300) -> Any:
    return CliRunner().invoke(build_app(), ["compare", *args], env={"COLUMNS": str(columns), "MLFLOW_TRACKING_URI": ""})


def _json(result: Any) -> dict[str, Any]:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_default_columns_values_and_best(store: tuple[str, dict], tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    uri, ids = store
    monkeypatch.chdir(tmp_path)
    data = _json(_invoke("--tracking-uri", uri, "--json"))
    assert [r["name"] for r in data["rows"]] == [  # newest first, an ablation beside its run
        "pipeline-r4", "pipeline-r4 (ablation)", "pipeline-r3", "pipeline-r2", "pipeline-r2 (ablation)", "pipeline-r1"]
    assert data["columns"] == [TOP1, "evaluate/zeroshot/robustness_avg", "evaluate/retrieval/i2t/R1",
                               "evaluate/retrieval/t2i/R1", "evaluate/probe/depth/best",
                               "evaluate/probe/depth/best_layer", LOSS, SPEED]
    r4, r4a, r3, r2, r2a, r1 = data["rows"]
    assert (r1["recipe"], r1["preset"], r1["status"]) == ("vanilla", "test", "FINISHED")
    assert (r2["recipe"], r2a["recipe"], r2a["key"]) == ("pe", "vanilla", f"{ids['r2']['pipeline']}:ablation")
    assert r3["status"] == "FAILED" and TOP1 not in r3["metrics"]
    assert r4["status"] == "RUNNING" and r4["metrics"][LOSS] == pytest.approx(1.5)  # from its stage runs
    assert r4a["metrics"] == {LOSS: pytest.approx(2.2), SPEED: pytest.approx(85.0)}
    assert r2["metrics"][TOP1] == pytest.approx(0.30) and r2a["metrics"][TOP1] == pytest.approx(0.35)
    best = data["best"]
    assert best[TOP1] == [r2a["key"]]
    assert best[LOSS] == [r4["key"]]  # lower is better
    assert best[SPEED] == [r3["key"]]
    assert set(best["evaluate/retrieval/i2t/R1"]) == {r1["key"], r2a["key"]}  # ties: all of them
    assert "evaluate/probe/depth/best_layer" not in best  # an index, not a score
    assert "evaluate/probe/depth/best" not in best  # one run only: nothing to compare
    assert not (tmp_path / "compare.png").exists()  # --json writes no plot unless asked


def test_table_marks_best_and_writes_the_plot(store: tuple[str, dict], tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    uri, ids = store
    monkeypatch.chdir(tmp_path)
    result = _invoke("--tracking-uri", uri)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    row = {name: next(ln for ln in lines if f"pipeline-{name}" in ln and "(ablation)" not in ln) for name in RUNS}
    ablation = next(ln for ln in lines if "pipeline-r2 (ablation)" in ln)
    assert ids["r2"]["pipeline"][:8] in row["r2"] and "vanilla" in row["r1"] and "vanilla" in ablation
    assert "0.35 *" in ablation and "0.3 *" not in row["r2"] and "0.1 *" not in row["r1"]  # top-1
    assert "1.5 *" in row["r4"] and "RUNNING" in row["r4"] and "150 *" in row["r3"]  # loss (lower), samples/s
    assert "FAILED" in row["r3"] and "-" in row["r3"].split()  # r3 never evaluated
    assert "top1" in result.stdout and "robustness_avg" in result.stdout
    assert "plot: compare.png" in result.stdout
    assert (tmp_path / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    out = tmp_path / "plots" / "mine.png"
    assert _invoke("--tracking-uri", uri, "--plot", str(out), "--json").exit_code == 0
    assert out.stat().st_size > 1000


def test_narrow_terminal_gets_a_column_per_run(store: tuple[str, dict]) -> None:
    result = _invoke("--tracking-uri", store[0], "--plot", "", columns=110)
    assert result.exit_code == 0, result.output
    top1 = next(ln for ln in result.stdout.splitlines() if TOP1 in ln)
    assert "0.35 *" in top1 and top1.count("0.1 ") == 1 and "plot:" not in result.stdout
    assert max(len(ln) for ln in result.stdout.splitlines()) <= 110


def test_metrics_globs_last_and_stage_runs(store: tuple[str, dict]) -> None:
    uri, ids = store
    data = _json(_invoke("--tracking-uri", uri, "--json", "--metrics", "zeroshot/test/top1, pretrain/*loss"))
    assert data["columns"] == [TOP1, LOSS]
    assert all(set(r["metrics"]) <= {TOP1, LOSS} for r in data["rows"])  # the table, not every metric
    last = _json(_invoke("--tracking-uri", uri, "--json", "--last", "1"))
    assert [r["name"] for r in last["rows"]] == ["pipeline-r4", "pipeline-r4 (ablation)"]

    # Stage runs line up with pipeline runs (an ablation's under its variant); id prefixes work.
    runs = f"{ids['r1']['evaluate']},{ids['r4']['pretrain_ablation']}"
    data = _json(_invoke("--tracking-uri", uri, "--json", "--runs", runs, "--runs", ids["r2"]["pipeline"][:8]))
    stage, varied, r2, r2a = data["rows"]
    assert (stage["run_id"], stage["name"]) == (ids["r1"]["evaluate"], "evaluate")
    assert stage["metrics"][TOP1] == pytest.approx(0.10) and LOSS not in stage["metrics"]
    assert (varied["name"], varied["recipe"], varied["metrics"][LOSS]) == ("pretrain (ablation)", "vanilla",
                                                                          pytest.approx(2.2))
    assert r2["run_id"] == ids["r2"]["pipeline"] and data["best"][TOP1] == [r2a["key"]]


@pytest.mark.parametrize(("args", "message"), [
    (["--experiment", "nope"], "no experiment 'nope'"),
    (["--experiment", "empty"], "no pipeline runs in experiment 'empty'"),
    (["--runs", "0123456789abcdef"], "run id '0123456789abcdef' is not a run"),
    (["--metrics", "no/such/*"], "no run has a metric matching no/such/*"),
    (["--last", "0"], "--last must be >= 1"),
])
def test_errors_are_clear(store: tuple[str, dict], args: list[str], message: str) -> None:
    result = _invoke("--tracking-uri", store[0], *args)
    assert result.exit_code == 2 and message in result.stderr and "Traceback" not in result.output


def test_missing_store_is_an_error(tmp_path: Path) -> None:
    result = _invoke("--tracking-uri", f"sqlite:///{tmp_path / 'none.db'}")
    assert result.exit_code == 2 and "no MLflow database" in result.stderr
    assert not (tmp_path / "none.db").exists()
    result = _invoke()
    assert result.exit_code == 2 and "no tracking URI" in result.stderr


def test_ladder_steps_are_rows_and_one_table_beside_the_papers(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A pipeline run with two ladder steps: a row per step (its metrics found from the parent's
    `ladder/<step>/...` names and from the stage runs' folders), and the ladder table after the main one."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.chdir(tmp_path)  # the table also writes compare.png here
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    steps = {("pretrain", None): {"train/final_loss": 2.0}, ("evaluate", None): EVAL,
             ("evaluate", "ladder/baseline"): {**EVAL, "zeroshot/test/top1": 0.31, "probe/cls/best_layer": 3.0,
                                               "probe/cls/best": 0.4, "probe/cls/last": 0.3},
             ("evaluate", "ladder/rope"): {**EVAL, "zeroshot/test/top1": 0.27}}
    _pipeline(tmp_path, "lad", Pipeline("pe", steps, failed=None), monkeypatch)  # running: from the stage runs
    data = _json(_invoke("--tracking-uri", uri, "--json"))
    assert [r["name"] for r in data["rows"]] == ["pipeline-lad", "pipeline-lad (ladder/baseline)",
                                                "pipeline-lad (ladder/rope)"]
    assert data["rows"][1]["metrics"][TOP1] == pytest.approx(0.31)
    out = _invoke("--tracking-uri", uri).stdout
    assert "ablation ladder of run" in out and "1 baseline (vanilla CLIP)" in out and "6 + 2D RoPE" in out
    line = next(ln for ln in out.splitlines() if "1 baseline" in ln)
    assert "0.310" in line and "3 (0.400) / 0.300" in line and "75.3" in line  # ours, then the paper's
