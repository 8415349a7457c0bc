"""`make demo`: the whole pipeline on the built-in corpus, through Airflow.

1. `make up`: a local `mlflow server` and `airflow standalone` on 127.0.0.1
   (Airflow boots while step 2 runs).
2. `dvc repro synth` + `dvc push`: the nano corpus, versioned by DVC (data/synth).
3. Trigger `pe_pipeline` over Airflow's REST API with that corpus as data
   source, follow it live until it ends.
4. Print the Airflow and MLflow URLs, the login, time per stage, and the
   run's metrics.

`python -m peflow.demo [--preset nano]`. Ctrl-C stops following; stage
outputs are written atomically, so nothing is left half-written.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

from peflow import io, orchestration, remote, services, stages
from peflow.airflow_api import TERMINAL, AirflowAPI
from peflow.run_report import is_detail

console = Console()
DAG_ID = "pe_pipeline"
STYLE = {"success": "green", "failed": "red", "running": "yellow", "up_for_retry": "magenta",
         "upstream_failed": "red", "skipped": "dim"}


def _dvc(root: Path, *args: str) -> None:
    exe = shutil.which("dvc") or str(Path(sys.executable).with_name("dvc"))
    console.print(f"[bold]$ dvc {' '.join(args)}[/]")
    # the synth stage logs its run to the local MLflow server too
    env = {**os.environ, "MLFLOW_TRACKING_URI": services.mlflow_uri()}
    subprocess.run([exe, *args], cwd=root, check=True, env=env)


def _seconds(ti: dict[str, Any]) -> float | None:
    if ti.get("duration") is not None:
        return float(ti["duration"])
    if ti.get("start_date"):
        start = datetime.fromisoformat(ti["start_date"].replace("Z", "+00:00"))
        return (datetime.now(start.tzinfo) - start).total_seconds()
    return None


def task_table(run_id: str, tis: list[dict[str, Any]], elapsed: float, state: str) -> Table:
    table = Table(title=f"{DAG_ID} {run_id}: {state} ({elapsed:.0f}s)")
    for col in ("task", "state", "try", "seconds"):
        table.add_column(col)
    order = {t: i for i, t in enumerate(["start_run", *[t.id for t in orchestration.tasks()], "end_run"])}
    for ti in sorted(tis, key=lambda t: (order.get(t["task_id"], 99), t.get("map_index", -1))):
        st = ti.get("state") or "queued"
        sec = _seconds(ti)
        index = ti.get("map_index", -1)
        name = ti["task_id"] + (f"[{ti.get('rendered_map_index') or index}]" if index is not None and index >= 0 else "")
        table.add_row(name, f"[{STYLE.get(st, '')}]{st}[/]", str(ti.get("try_number", "")),
                      "" if sec is None else f"{sec:.1f}")
    return table


def follow(api: AirflowAPI, run_id: str, poll: float = 2.0) -> tuple[str, list[dict[str, Any]], float]:
    t0 = time.monotonic()
    state, tis = "queued", []
    with Live(console=console, refresh_per_second=2) as live:
        while True:
            run = api.dag_run(DAG_ID, run_id)
            state = run["state"]
            tis = api.task_instances(DAG_ID, run_id)
            live.update(task_table(run_id, tis, time.monotonic() - t0, state))
            if state in TERMINAL:
                return state, tis, time.monotonic() - t0
            time.sleep(poll)


def metrics_table(run_root: Path) -> Table:
    table = Table(title="metrics")
    table.add_column("stage")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for t in orchestration.tasks():
        members = stages.get_variant(t.variant).versions() if t.variant else [None]
        for one in (orchestration.Task(t.stage, t.variant, m) for m in members):
            path = run_root.joinpath(*(one.version or "").split("/"), t.stage, io.METRICS)
            if path.is_file():
                for k, v in json.loads(path.read_text()).items():
                    if not is_detail(k):
                        table.add_row(one.label, k, f"{v:.4g}" if isinstance(v, (int, float)) else str(v))
    return table


def report_link(run_id: str) -> str | None:
    """MLflow UI address of the pipeline run's report (the parent run tagged with this Airflow run)."""
    import mlflow

    mlflow.set_tracking_uri(services.mlflow_uri())
    runs = mlflow.search_runs(experiment_names=["peflow"], output_format="list",
                              filter_string=f"tags.`airflow.run_id` = '{run_id}'")
    if not runs:
        return None
    r = runs[0].info
    return f"{services.mlflow_uri()}/#/experiments/{r.experiment_id}/runs/{r.run_id}/artifacts/report.html"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m peflow.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="nano")
    p.add_argument("--recipe", choices=list(orchestration.RECIPES),
                   help="pretraining recipe (default: the preset's; nano: pe-adamw)")
    p.add_argument("--ablation", action="store_true",
                   help="also train and evaluate the other recipe at the same budget (about twice as long)")
    p.add_argument("--engine-ablation", action="store_true",
                   help="also finetune on video titles and descriptions instead of the engine's captions")
    p.add_argument("--ladder", action="store_true",
                   help="also run the paper's ablation ladder: nine pretrainings and evaluations (about 40 minutes "
                        "more on 2 cores)")
    a = p.parse_args(argv)
    root = services.REPO
    t0 = time.monotonic()
    try:
        services.mlflow_service().start(timeout=300)  # synth's run goes to it
        airflow = services.airflow_service()
        booting = airflow.launch()  # Airflow boots while DVC makes the corpus
        _dvc(root, "repro", "synth")
        _dvc(root, "push")
        airflow.wait(booting, timeout=300)
        api = AirflowAPI(services.airflow_url(), "admin", services.airflow_password())
        api.wait_for_dag(DAG_ID)
        conf = {"preset": a.preset, "recipe": a.recipe, "ablation": a.ablation, "engine_ablation": a.engine_ablation,
                "ladder": a.ladder, "data_source": str(root / "data" / "synth")}
        run_id = api.trigger(DAG_ID, conf)
        console.print(f"triggered {DAG_ID} run {run_id} with {conf}")
        state, tis, wall = follow(api, run_id)
    except subprocess.CalledProcessError as e:
        console.print(f"[red]demo failed: {' '.join(map(str, e.cmd))} exited {e.returncode}[/]")
        return 1
    except KeyboardInterrupt:
        console.print("[yellow]stopped following; outputs are written atomically, nothing half-written. "
                      "The run goes on in Airflow (`make down` stops it).[/]")
        return 130
    run_root = Path(remote.localize(orchestration.run_dir(run_id)))
    stage_secs = sum(_seconds(t) or 0 for t in tis if t["task_id"] in {t.id for t in orchestration.tasks()})
    console.print(metrics_table(run_root))
    console.print(f"pipeline {state} in {wall:.0f}s wall; stage tasks {stage_secs:.0f}s; "
                  f"orchestration (scheduling, start/end tasks) {wall - stage_secs:.0f}s; "
                  f"whole demo {time.monotonic() - t0:.0f}s")
    console.print(f"Airflow: {services.airflow_url()}/dags/{DAG_ID}  login admin / {services.airflow_password()}")
    console.print(f"MLflow:  {services.mlflow_uri()}  (experiment 'peflow')")
    console.print(f"outputs: {run_root}")
    if (run_root / "report.html").is_file():
        console.print(f"report:  {run_root / 'report.html'}")
        link = report_link(run_id)
        if link:
            console.print(f"         {link}")
    return 0 if state == "success" else 1


if __name__ == "__main__":
    raise SystemExit(main())
