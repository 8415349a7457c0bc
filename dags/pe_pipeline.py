"""pe_pipeline: the Perception Encoder training pipeline, one task per stage.

Wiring only: tasks come from peflow's stage registry; each task is one call
into `peflow.orchestration` (distributed stages launch their TorchX component
through the TorchX runner API). XCom carries run ids, paths and small metrics.
"""

from __future__ import annotations

import sys
from datetime import datetime, timedelta
from pathlib import Path

from airflow.sdk import Param, dag, get_current_context, task
from airflow.sdk.exceptions import AirflowSkipException

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: `components`

from peflow import orchestration, stages  # noqa: E402  (light: no torch at parse time)

DEFAULT_ARGS = {
    "retries": 2,
    "retry_delay": timedelta(seconds=10),
    "execution_timeout": timedelta(hours=6),
}


def _torchx_launch(log_name: str):
    def launch_torchx(name: str, argv: list[str], cfg: orchestration.RunConfig) -> None:
        from components import launch

        launch.run(name, argv, scheduler=cfg.scheduler, j=cfg.nodes,
                   log_dir=str(Path(cfg.out) / "_torchx_logs" / log_name))

    return launch_torchx


def _config() -> orchestration.RunConfig:
    ctx = get_current_context()
    return orchestration.dag_run_config(dict(ctx["params"]), ctx["dag_run"].run_id)


@task(task_id="start_run", execution_timeout=timedelta(minutes=10))
def start_run() -> str:
    ctx = get_current_context()
    tags = {"airflow.dag_id": ctx["dag"].dag_id, "airflow.run_id": ctx["dag_run"].run_id}
    return orchestration.start_pipeline_run(_config(), tags=tags)


def stage_task(t: orchestration.Task):
    stage = stages.get(t.stage)

    @task(task_id=t.id, doc_md=stage.summary + (" (ablation: the other recipe)" if t.variant else ""))
    def run(parent_run_id: str) -> dict:
        cfg = _config()
        if t.variant and not cfg.ablation:
            raise AirflowSkipException("no ablation in this run (Param `ablation`)")
        launch = _torchx_launch(t.id) if stage.distributed else orchestration.launch_subprocess
        return orchestration.run_stage(t.stage, cfg, parent_run_id=parent_run_id, launch=launch, variant=t.variant)

    return run


@task(task_id="end_run", trigger_rule="all_done", retries=0, execution_timeout=timedelta(minutes=10))
def end_run(parent_run_id: str, names: list[str]) -> dict:
    ctx = get_current_context()
    cfg = _config()
    summaries = {n: ctx["ti"].xcom_pull(task_ids=n) for n in names}
    wanted = [t.id for t in orchestration.tasks() if cfg.ablation or not t.variant]
    failed = [n for n in wanted if not summaries[n]]
    orchestration.end_pipeline_run(cfg, parent_run_id, [s for s in summaries.values() if s], failed=bool(failed))
    if failed:
        raise RuntimeError(f"stages did not finish: {failed}")
    return {n: s["metrics"] for n, s in summaries.items() if s}


@dag(
    dag_id="pe_pipeline",
    description="Perception Encoder pipeline: corpus, validation, pretraining, evaluation",
    schedule=None,
    start_date=datetime(2025, 1, 1),
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    tags=["peflow", "perception-encoder"],
    params={name: Param(**spec) for name, spec in orchestration.params_spec().items()},
    doc_md=__doc__,
)
def pe_pipeline():
    parent = start_run()
    tasks = {t.id: stage_task(t)(parent) for t in orchestration.tasks()}
    # Main stages in a chain; each ablation task after its main twin (one training at a time on a
    # small machine) and after its own upstream variant.
    prev = parent
    for s in stages.STAGES:
        prev >> tasks[s.name]
        prev = tasks[s.name]
    for t in orchestration.tasks():
        if t.variant:
            tasks[t.stage] >> tasks[t.id]
            for up in stages.get(t.stage).needs:
                tasks.get(orchestration.Task(up, t.variant).id, tasks[up]) >> tasks[t.id]
    end_run(parent, list(tasks)) << list(tasks.values())


pe_pipeline()
