"""Pipeline runs: the task functions the Airflow DAG calls and `peflow run` uses.

One code path for both: the run config below is the DAG's Params form and
`peflow run`'s options; `stage_argv` turns it into the same `peflow <stage>`
options a user types; distributed stages go through their TorchX component
(`launch` callback: the DAG passes the TorchX runner, `peflow run` a child
`peflow launch`). No Airflow or TorchX import here.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from peflow import io, stages, tracking
from peflow.config import opt, req
from peflow.train.recipe import RECIPES as recipe_presets  # stdlib only: no torch at DAG parse time

# Run-config fields handed to every stage whose Config has a field of that name.
SHARED = ("preset", "seed", "recipe", "experiment", "max_failure_rate")
BUILTIN = "builtin"
#: The variant of an ablation run: the other recipe at the same budget, under OUT/ablation/.
ABLATION = "ablation"
RECIPES = tuple(recipe_presets)  # ("pe", "vanilla"): the pretraining recipes an ablation compares


@dataclasses.dataclass(kw_only=True)
class RunConfig:
    """One pipeline run (the DAG's Params; `peflow run`'s options)."""

    out: str = req("pipeline root: each stage writes OUT/<stage>/")
    preset: str = opt("nano", "preset for every stage: corpus size and model size (test, nano, ...)")
    data_source: str = opt(BUILTIN, "'builtin' generates the corpus (synth); or a path/URI of a corpus "
                                    "in the same layout (WebDataset image-text shards, PVD video shards)")
    scheduler: str = opt("local_cwd", "TorchX scheduler for distributed stages: local_cwd or kubernetes")
    nodes: str = opt("2x1", "nodes x processes per node for distributed stages (TorchX -j)")
    stage: str = opt("all", "stages to run: 'all', or a comma-separated list (the others' outputs are reused)")
    recipe: str = opt("pe", "pretraining recipe: vanilla (CLIP) or pe (the PE-core recipe)")
    seed: int = opt(0, "seed for data generation and training")
    experiment: str = opt("peflow", "MLflow experiment name")
    max_failure_rate: float = opt(0.05, "validation fails the run above this fraction of bad samples")
    ablation: bool = opt(False, "also train and evaluate the other recipe (vanilla <-> pe) at the same budget, "
                                "under OUT/ablation/; the report puts the two side by side")

    def __post_init__(self) -> None:
        if self.scheduler not in ("local_cwd", "kubernetes"):
            raise ValueError(f"scheduler must be local_cwd or kubernetes, got {self.scheduler!r}")
        if self.recipe not in RECIPES:
            raise ValueError(f"recipe must be one of {RECIPES}, got {self.recipe!r}")
        for name in self.selected():
            stages.get(name)

    def selected(self) -> list[str]:
        """The stages this run executes (all when `stage` is empty)."""
        names = [s.strip() for s in self.stage.split(",") if s.strip() not in ("", "all")]
        if not names:
            names = [s.name for s in stages.STAGES]
        if self.data_source != BUILTIN:
            names = [n for n in names if n != "synth"]
        return names


def other_recipe(recipe: str) -> str:
    """The recipe an ablation compares against: vanilla for pe, pe for vanilla."""
    return "vanilla" if recipe == "pe" else "pe"


def ablation_stages() -> tuple[str, ...]:
    """Stages an ablation runs a second time: those taking a recipe, and every stage downstream of one."""
    names: list[str] = []
    for s in stages.STAGES:
        takes_recipe = any(f.name == "recipe" for f in dataclasses.fields(s.config_cls))
        if takes_recipe or any(up in names for up in s.needs):
            names.append(s.name)
    return tuple(names)


@dataclasses.dataclass(frozen=True)
class Task:
    """One task of a pipeline run: a stage, or its ablation variant."""

    stage: str
    variant: str | None = None

    @property
    def id(self) -> str:
        """Task id in the DAG, and the key of its metrics in the pipeline run: `pretrain`, `pretrain_ablation`."""
        return self.stage if self.variant is None else f"{self.stage}_{self.variant}"


def tasks() -> list[Task]:
    """Every task a pipeline run may execute, in a valid order: the stages, then their ablation variants."""
    return [Task(s.name) for s in stages.STAGES] + [Task(n, ABLATION) for n in ablation_stages()]


def stage_dir(cfg: RunConfig, name: str, variant: str | None = None) -> Path:
    """Where a stage's output lives; with an external data source, synth's is that source.
    An ablation variant lives under OUT/ablation/."""
    if name == "synth" and cfg.data_source != BUILTIN:
        return Path(cfg.data_source)
    if variant is not None:
        return Path(cfg.out) / variant / name
    return Path(cfg.out) / name


def stage_argv(name: str, cfg: RunConfig, variant: str | None = None) -> list[str]:
    """`peflow <name>` options for this run: inputs, output, shared settings.

    The ablation variant trains the other recipe and reads its upstream
    stages' ablation outputs where those exist (pretrain -> evaluate).
    """
    stage = stages.get(name)
    fields = {f.name for f in dataclasses.fields(stage.config_cls)}
    varied = ablation_stages() if variant is not None else ()
    argv = ["--out", str(stage_dir(cfg, name, variant))]
    for option, upstream in stage.inputs:
        up_variant = variant if upstream in varied else None
        argv += [f"--{option.replace('_', '-')}", str(stage_dir(cfg, upstream, up_variant))]
    for key in SHARED:
        if key in fields:
            value = getattr(cfg, key)
            if key == "recipe" and variant == ABLATION:
                value = other_recipe(value)
            argv += [f"--{key.replace('_', '-')}", str(value)]
    return argv


def run_in_process(name: str, argv: list[str]) -> None:
    """Run a stage in this process through the same CLI a user types."""
    from peflow import cli

    try:
        cli.main([name, *argv])
    except SystemExit as e:
        if e.code not in (0, None):
            raise RuntimeError(f"peflow {name} exited with {e.code}") from None


def launch_subprocess(name: str, argv: list[str], cfg: RunConfig) -> None:
    """Run a distributed stage through `peflow launch` (TorchX) as a child process."""
    cmd = [sys.executable, "-m", "peflow.cli", "launch", name, "-j", cfg.nodes, "--scheduler", cfg.scheduler,
           "--", *argv]
    rc = subprocess.call(cmd)
    if rc != 0:
        raise RuntimeError(f"peflow launch {name} exited with {rc}")


Launcher = Callable[[str, list[str], RunConfig], None]


def run_stage(name: str, cfg: RunConfig, *, parent_run_id: str | None = None,
              launch: Launcher = launch_subprocess, variant: str | None = None) -> dict[str, Any]:
    """Run one stage of a pipeline run (or its ablation variant), or reuse its output when not selected.

    Returns a small summary (fits in an Airflow XCom): task id, output path,
    whether it ran, seconds, and the stage's metrics.json.
    """
    stage = stages.get(name)
    task = Task(name, variant)
    out = stage_dir(cfg, name, variant)
    t0 = time.monotonic()
    if variant is not None and not cfg.ablation:
        raise ValueError(f"task {task.id}: this run has no ablation (set ablation)")
    ran = name in cfg.selected()
    if not ran and not (out / io.MANIFEST).is_file() and not (name == "synth" and cfg.data_source != BUILTIN):
        raise ValueError(f"stage {task.id} is not selected and has no output at {out} to reuse; run it first")
    if ran:
        env = {"MLFLOW_EXPERIMENT_NAME": cfg.experiment, tracking.PARENT_ENV: parent_run_id or ""}
        argv = stage_argv(name, cfg, variant)
        with io.environ(env):  # child processes (torchrun replicas) inherit these
            if stage.distributed:
                launch(name, argv, cfg)
            else:
                run_in_process(name, argv)
    metrics = io.read_json(out / io.METRICS) if (out / io.METRICS).is_file() else {}
    recipe = task_recipe(cfg, variant) if name in ablation_stages() else None  # synth, validate: no recipe
    return {"stage": name, "task": task.id, "variant": variant, "recipe": recipe, "out": str(out),
            "ran": ran, "seconds": round(time.monotonic() - t0, 2), "metrics": metrics}


def task_recipe(cfg: RunConfig, variant: str | None) -> str:
    """The pretraining recipe behind a task's output: the run's, or the other one for the ablation."""
    return other_recipe(cfg.recipe) if variant == ABLATION else cfg.recipe


def start_pipeline_run(cfg: RunConfig, *, tags: dict[str, str] | None = None) -> str:
    """Open the parent MLflow run of a pipeline run; returns its id."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow

    experiment = tracking.set_experiment(tracking.tracking_uri(Path(cfg.out) / "_"), cfg.experiment)
    all_tags = {"peflow.preset": cfg.preset, "peflow.git_commit": git_commit(), **(tags or {})}
    client = mlflow.MlflowClient()
    run = client.create_run(experiment.experiment_id, run_name=f"pipeline-{Path(cfg.out).name}", tags=all_tags)
    for k, v in dataclasses.asdict(cfg).items():
        client.log_param(run.info.run_id, k, v)
    return run.info.run_id


def end_pipeline_run(cfg: RunConfig, run_id: str, summaries: list[dict[str, Any]], *, failed: bool) -> None:
    """Close the parent run: stage timings and every stage's metrics, prefixed by stage."""
    import mlflow

    mlflow.set_tracking_uri(tracking.tracking_uri(Path(cfg.out) / "_"))
    client = mlflow.MlflowClient()
    for s in summaries:
        if not s:
            continue
        client.log_metric(run_id, f"time/{s.get('task', s['stage'])}_s", s["seconds"])
        for k, v in s.get("metrics", {}).items():
            if isinstance(v, (int, float)):
                client.log_metric(run_id, metric_key(s, k), float(v))
    try:
        from peflow.run_report import log_report

        log_report(cfg, run_id, summaries)
    except Exception as e:  # noqa: BLE001  (a broken report must not hide the run's own status)
        logging.getLogger(__name__).warning("pipeline report not written: %s: %s", type(e).__name__, e)
    client.set_terminated(run_id, "FAILED" if failed else "FINISHED")


def stage_key(stage: str, name: str) -> str:
    """A stage metric's name prefixed by its stage: `evaluate/zeroshot/test/top1`."""
    return name if name.startswith(f"{stage}/") else f"{stage}/{name}"


def metric_key(summary: dict[str, Any], name: str) -> str:
    """A stage metric's name in the pipeline run: `evaluate/zeroshot/test/top1`,
    `ablation/evaluate/zeroshot/test/top1` for the ablation variant."""
    key = stage_key(summary["stage"], name)
    return f"{summary['variant']}/{key}" if summary.get("variant") else key


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                              cwd=Path(__file__).resolve().parent).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_pipeline(cfg: RunConfig, *, launch: Launcher = launch_subprocess,
                 echo: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """`peflow run`: every stage in order (selected ones run, others are reused)."""
    parent = start_pipeline_run(cfg, tags={"peflow.orchestrator": "peflow run"})
    summaries: list[dict[str, Any]] = []
    failed = True
    try:
        for t in tasks():
            if (t.stage == "synth" and cfg.data_source != BUILTIN) or (t.variant and not cfg.ablation):
                continue
            echo(f"== {t.id} ==")
            summaries.append(run_stage(t.stage, cfg, parent_run_id=parent, launch=launch, variant=t.variant))
        failed = False
    finally:
        end_pipeline_run(cfg, parent, summaries, failed=failed)
    return summaries


def params_spec() -> dict[str, dict[str, Any]]:
    """The run config as JSON-schema-style Params (name -> default, type, title, description).

    The DAG wraps each entry in an Airflow `Param`; `out` is per DAG run.
    """
    kinds = {int: "integer", float: "number", str: "string", bool: "boolean"}
    enums = {"scheduler": ["local_cwd", "kubernetes"], "recipe": list(RECIPES)}
    spec: dict[str, dict[str, Any]] = {}
    for f in dataclasses.fields(RunConfig):
        if f.name == "out":
            continue
        tp = {"int": int, "float": float, "str": str, "bool": bool}[str(f.type)]
        entry = {"default": f.default, "type": kinds[tp], "title": f.name.replace("_", " ").capitalize(),
                 "description": f.metadata["help"]}
        if f.name in enums:
            entry["enum"] = enums[f.name]
        spec[f.name] = entry
    return spec


def runs_root() -> Path:
    """Where DAG runs keep their stage folders: $PEFLOW_RUNS, else $PEFLOW_HOME/runs."""
    if os.environ.get("PEFLOW_RUNS"):
        return Path(os.environ["PEFLOW_RUNS"])
    return Path(os.environ.get("PEFLOW_HOME", ".run")).resolve() / "runs"


def run_dir(run_id: str) -> Path:
    """The folder of one DAG run under `runs_root()`, named after its (sanitised) run id."""
    return runs_root() / "".join(c if c.isalnum() or c in "-_." else "_" for c in run_id)


def dag_run_config(params: dict[str, Any], run_id: str) -> RunConfig:
    """The run config of one DAG run: its Params, and its run folder."""
    known = {f.name for f in dataclasses.fields(RunConfig)}
    return RunConfig(out=str(run_dir(run_id)), **{k: v for k, v in params.items() if k in known})
