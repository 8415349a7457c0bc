"""pe_pipeline: the Perception Encoder training pipeline, one task per stage.

Wiring only: tasks, their dependencies and Params come from peflow's stage
registry and presets; each task is one call into `peflow.orchestration`
(distributed stages launch the TorchX component through the TorchX runner
API). A variant's tasks (the recipe ablation, the engine ablation, the
ablation ladder's nine steps) are the same stage tasks mapped over the
variant's members (dynamic task mapping): `<variant>_members` lists them
for this run's Params, none when the variant is off (its mapped tasks are
then skipped). `start_run` checks every stage's config before any stage
runs. A configuration or input error fails its task at once (no retries);
infrastructure errors keep their retries. Each stage task updates the Asset
`x-peflow://stages/<task>` with its output path and key, so the Assets view
shows the lineage. XCom carries run ids, paths and small metrics.
"""

from __future__ import annotations

import functools
import sys
from datetime import datetime, timedelta
from pathlib import Path

from airflow.sdk import Asset, Param, dag, get_current_context, task
from airflow.sdk.exceptions import AirflowFailException

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: `components`

from peflow import orchestration, stages  # noqa: E402  (light: no torch at parse time)
from peflow.config import ConfigError, InputError  # noqa: E402

DEFAULT_ARGS = {
    "retries": 2,
    "retry_delay": timedelta(seconds=10),
    "execution_timeout": timedelta(hours=6),
}
#: instances of one mapped non-training task that run at once in a DAG run (the ladder has nine evaluations)
MAPPED_AT_ONCE = 2


def fail_fast(fn):
    """Configuration and input errors fail the task without retries (AirflowFailException)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ConfigError, InputError) as e:
            raise AirflowFailException(f"{type(e).__name__}: {e}") from e

    return wrapper


def asset(t: orchestration.Task) -> Asset:
    return Asset(name=f"peflow.{t.id}", uri=f"x-peflow://stages/{t.id}", group="peflow")


def _torchx_launch(log_name: str):
    def launch_torchx(name: str, argv: list[str], cfg: orchestration.RunConfig) -> None:
        from components import launch

        try:
            launch.run(name, argv, scheduler=cfg.scheduler, j=cfg.launch_nodes(),
                       log_dir=str(orchestration.local_root(cfg) / "_torchx_logs" / log_name))
        except ValueError as e:
            raise ConfigError(str(e)) from e

    return launch_torchx


def _config() -> orchestration.RunConfig:
    ctx = get_current_context()
    return orchestration.dag_run_config(dict(ctx["params"]), ctx["dag_run"].run_id)


@task(task_id="start_run", execution_timeout=timedelta(minutes=10))
@fail_fast
def start_run() -> str:
    ctx = get_current_context()
    tags = {"airflow.dag_id": ctx["dag"].dag_id, "airflow.run_id": ctx["dag_run"].run_id}
    return orchestration.start_pipeline_run(_config(), tags=tags)


def variant_members(variant: str):
    @task(task_id=f"{variant}_members", execution_timeout=timedelta(minutes=5))
    @fail_fast
    def members(parent_run_id: str) -> list[str]:
        """The variant's members in this run (what its tasks are mapped over): none when its Param is off."""
        return _config().members(variant)

    return members


def stage_task(t: orchestration.Task):
    stage = stages.get(t.stage)
    out = asset(t)

    doc = stage.summary + (f" (variant {t.variant}: {stages.get_variant(t.variant).summary})" if t.variant else "")
    mapped: dict = {}
    if t.variant:
        # the mapped instance's name in the UI; a variant that is off (its training skipped) does not stop the
        # next variant's training, which waits for it only to keep one training at a time
        mapped = {"map_index_template": "{{ peflow_member }}", "trigger_rule": "none_failed"}
        # a variant's members train one after another (a training takes every core); the other stages of a
        # many-member variant (the ladder's nine evaluations) run two at a time, not all at once
        mapped["max_active_tis_per_dagrun"] = 1 if stage.distributed else MAPPED_AT_ONCE

    @task(task_id=t.id, doc_md=doc, outlets=[out], **mapped)
    @fail_fast
    def run(parent_run_id: str, member: str | None = None) -> dict:
        ctx = get_current_context()
        ctx["peflow_member"] = member  # the mapped task instance's name in the UI (map_index_template)
        cfg = _config()
        one = orchestration.Task(t.stage, t.variant, member)
        launch = _torchx_launch(one.label) if stage.distributed else orchestration.launch_subprocess
        summary = orchestration.run_stage(t.stage, cfg, parent_run_id=parent_run_id, launch=launch,
                                          variant=t.variant, member=member)
        ctx["outlet_events"][out].extra = {k: summary[k] for k in ("out", "key", "ran", "reused", "variant")}
        return summary

    return run


@task(task_id="end_run", trigger_rule="all_done", retries=0, execution_timeout=timedelta(minutes=10))
def end_run(parent_run_id: str | None, names: list[str]) -> dict:
    if parent_run_id is None:
        raise RuntimeError("start_run failed (its log says why): no pipeline run to close")
    ctx = get_current_context()
    cfg = _config()
    # a list per task: its summary, or one per member of a mapped task
    summaries = [s for n in names for s in ctx["ti"].xcom_pull(task_ids=[n]) if s]
    done = {orchestration.summary_label(s): s for s in summaries}
    failed = [t.label for t in orchestration.instances(cfg) if t.label not in done]
    orchestration.end_pipeline_run(cfg, parent_run_id, summaries, failed=bool(failed))
    if failed:
        raise RuntimeError(f"stages did not finish: {failed}")
    return {label: s["metrics"] for label, s in done.items()}


@dag(
    dag_id="pe_pipeline",
    description="Perception Encoder pipeline: corpus, validation, pretraining, video data engine, video "
                "finetuning, evaluation",
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
    members = {v.name: variant_members(v.name)(parent) for v in stages.variants()}
    all_tasks = orchestration.tasks()
    ops = {t.id: (stage_task(t).partial(parent_run_id=parent).expand(member=members[t.variant]) if t.variant
                  else stage_task(t)(parent)) for t in all_tasks}
    # The stages' dependency graph: each task after the tasks whose outputs it reads.
    trained: dict[str, str] = {}
    for t in all_tasks:
        for up in t.upstream:
            ops[up.id] >> ops[t.id]
        if stages.get(t.stage).distributed and t.stage in trained:
            ops[trained[t.stage]] >> ops[t.id]  # one training at a time: each variant's after the one before
        trained[t.stage] = t.id
    end_run(parent, list(ops)) << list(ops.values())


pe_pipeline()
