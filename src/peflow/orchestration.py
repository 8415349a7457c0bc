"""Pipeline runs: the task functions the Airflow DAG calls and `peflow run` uses.

One code path for both. A run's config (`RunConfig`: the DAG's Params form,
`peflow run`'s options) names a pipeline preset and the few overrides users
change most; `resolve` turns it into every task's stage config, wired to the
run's folders, and checks them all before the first stage starts. In-process
stages run through the stage runner here; distributed ones through their
TorchX component (`launch` callback: the DAG passes the TorchX runner,
`peflow run` a child `peflow launch`). No Airflow or TorchX import here.

Which stages run: every selected stage runs (`stage: evaluate` reruns
evaluate); the others are reused, from the run's own folder or from the
output store of any earlier run with the same key (peflow.store). With
`stage: all` every stage is reused when its key is in the store.
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

from peflow import config, io, presets, remote, runner, stages, tracking
from peflow.config import ConfigError, opt, req
from peflow.train.recipe import RECIPES as recipe_presets  # stdlib only: no torch at DAG parse time
from peflow.train.recipe import other_recipe

BUILTIN = "builtin"
ABLATION = stages.ABLATION
RECIPES = tuple(recipe_presets)  # ("pe", "vanilla", "pe-adamw"): the named pretraining recipes
SCHEDULERS = ("local_cwd", "kubernetes")
#: Run-config fields that set the field of that name in every stage config that has one.
SHORTCUTS = ("recipe", "seed", "steps", "max_failure_rate")


@dataclasses.dataclass(kw_only=True)
class RunConfig:
    """One pipeline run (the DAG's Params; `peflow run`'s options)."""

    out: str = req("pipeline root: each stage writes OUT/<stage>/")
    preset: str = opt("nano", "pipeline preset: every stage's config (corpus, model, budget)", choices=presets.names)
    data_source: str = opt(BUILTIN, "'builtin' generates the corpus (synth); or a path of a corpus in a layout "
                                    "validate reads (peflow layout, img2dataset/LAION-style shards, PVD)")
    stage: str = opt("all", "stages to run: 'all', or a comma-separated list (the others are reused from this "
                            "or any earlier run with the same configuration)")
    scheduler: str = opt("local_cwd", "TorchX scheduler for distributed stages", choices=SCHEDULERS)
    nodes: str = opt("", "nodes x processes per node for distributed stages (TorchX -j; empty: the preset's)")
    recipe: str | None = opt(None, "pretraining recipe (empty: the preset's)", choices=RECIPES)
    seed: int | None = opt(None, "seed of every stage that takes one (empty: the preset's)")
    steps: int | None = opt(None, "training steps (empty: the preset's)", min=1)
    max_failure_rate: float | None = opt(None, "validation fails above this fraction of bad samples "
                                               "(empty: the preset's)", min=0.0)
    overrides: str = opt("", "more stage fields: 'stage.field=value,...', e.g. 'pretrain.lr=0.002,evaluate.probes=false'")
    experiment: str = opt("peflow", "MLflow experiment name")
    ablation: bool = opt(False, "also train and evaluate the other recipe (vanilla CLIP; pe for a vanilla run) at "
                                "the same budget, under OUT/ablation/; the report puts the two side by side")
    engine_ablation: bool = opt(False, "also finetune on video titles and descriptions instead of the engine's "
                                       "captions (paper Tab. 2), under OUT/metadata/; the report puts them side "
                                       "by side with the image-only model")
    ladder: bool = opt(False, "also run the paper's ablation ladder (Tab. 26): nine pretrainings at the run's budget, "
                              "vanilla CLIP to the PE recipe one step at a time, each evaluated, under "
                              "OUT/ladder/<step>/; the report shows them as one table next to the paper's")

    def __post_init__(self) -> None:
        for name in ("preset", "scheduler", "recipe"):
            value, choices = getattr(self, name), config.field_choices(_field(name))
            if value is not None and value not in choices:
                raise ConfigError(f"{name}: {value!r} is not one of {choices}")
        self.selected()  # unknown stage names raise here

    def selected(self) -> list[str]:
        """The stages this run executes (every stage for 'all')."""
        names = [s.strip() for s in self.stage.split(",") if s.strip() not in ("", "all")]
        known = stages.names()
        bad = [n for n in names if n not in known]
        if bad:
            raise ConfigError(f"stage: unknown stage(s) {bad}; known: {known}")
        return names or known

    def forced(self, name: str) -> bool:
        """Whether stage `name` was named in `stage` (it reruns even when its output could be reused)."""
        return name in [s.strip() for s in self.stage.split(",")]

    def variants(self) -> list[str]:
        """The variants this run has (those whose `param` is set)."""
        return [v.name for v in stages.variants() if getattr(self, v.param, False)]

    def members(self, variant: str) -> list[str]:
        """The members of `variant` this run makes (none when it does not have the variant)."""
        return list(stages.get_variant(variant).versions()) if variant in self.variants() else []

    def pipeline(self) -> presets.Pipeline:
        return presets.get(self.preset)

    def launch_nodes(self) -> str:
        return self.nodes or self.pipeline().nodes


def _field(name: str) -> dataclasses.Field:
    return next(f for f in dataclasses.fields(RunConfig) if f.name == name)


@dataclasses.dataclass(frozen=True)
class Task:
    """One task of a pipeline run: a stage, or a variant's version of it (peflow.stages.Variant). A variant
    task without a member is the DAG's task mapped over the variant's members; with one, one member's run."""

    stage: str
    variant: str | None = None
    member: str | None = None

    @property
    def id(self) -> str:
        """Task id in the DAG: `pretrain`, `pretrain_ablation`, `pretrain_ladder` (mapped over the ladder's steps)."""
        return self.stage if self.variant is None else f"{self.stage}_{self.variant}"

    @property
    def version(self) -> str | None:
        """The variant version of the output (folder under OUT, metric prefix): None for a main task,
        `ablation`, `ladder/lamb`."""
        if self.variant is None:
            return None
        v = stages.get_variant(self.variant)
        if self.member is None and v.members:
            raise ValueError(f"task {self.id} is mapped over {list(v.members)}: each member has its own version")
        return v.version(self.member or v.name)

    @property
    def label(self) -> str:
        """`pretrain`, `pretrain_ablation`, `pretrain_ladder[lamb]`: the task and, of a mapped one, its member."""
        members = stages.get_variant(self.variant).members if self.variant else ()
        return f"{self.id}[{self.member}]" if members and self.member else self.id

    @property
    def inputs(self) -> list[tuple[str, Task | None]]:
        """(input field, the task whose output it reads) per input: a variant task reads its variant's version
        of an upstream the variant remakes, and nothing (None: left empty) of one it leaves stale."""
        v = stages.get_variant(self.variant) if self.variant else None
        out: list[tuple[str, Task | None]] = []
        for field, up in stages.get(self.stage).inputs:
            if v is not None and up in v.stages():
                out.append((field, Task(up, self.variant, self.member)))
            else:
                out.append((field, None if v is not None and up in v.stale() else Task(up)))
        return out

    @property
    def upstream(self) -> list[Task]:
        """The tasks whose outputs this one reads."""
        return list(dict.fromkeys(t for _, t in self.inputs if t is not None))


def tasks() -> list[Task]:
    """Every task of the DAG, in a valid order: the stages, then each variant's tasks (mapped over its members)."""
    return [Task(s.name) for s in stages.all_stages()] + [Task(n, v.name) for v in stages.variants()
                                                          for n in v.stages()]


def instances(cfg: RunConfig) -> list[Task]:
    """Every task this run executes, in a valid order: the stages, then each variant's, member by member."""
    out = [Task(s.name) for s in stages.all_stages()]
    for v in stages.variants():
        out += [Task(n, v.name, m) for m in cfg.members(v.name) for n in v.stages()]
    return out


def summary_label(summary: dict[str, Any]) -> str:
    """The task label (`Task.label`) of a `run_stage` summary."""
    variant = summary["task"][len(summary["stage"]) + 1:] or None
    return Task(summary["stage"], variant, summary.get("member")).label


def external(cfg: RunConfig, t: Task) -> bool:
    """Whether task `t` is the corpus and the run reads it from its data source instead of making it."""
    return t.stage == "synth" and cfg.data_source != BUILTIN


def stage_dir(cfg: RunConfig, name: str, version: str | None = None) -> str:
    """Where a stage's output lives (a path, or an `s3://` URI under an `s3://` OUT); with an external
    data source, synth's is that source. A variant version lives under OUT/<version>/ (OUT/ablation/,
    OUT/ladder/lamb/)."""
    if name == "synth" and cfg.data_source != BUILTIN:
        return cfg.data_source
    if version is not None:
        return remote.join(cfg.out, *version.split("/"), name)
    return remote.join(cfg.out, name)


def local_root(cfg: RunConfig) -> Path:
    """The run's folder on this machine: OUT, or the local copy of an `s3://` OUT."""
    return Path(remote.localize(cfg.out))


def parse_overrides(spec: str) -> dict[str, dict[str, str]]:
    """'pretrain.lr=0.002,evaluate.probes=false' -> {"pretrain": {"lr": "0.002"}, "evaluate": {...}}."""
    out: dict[str, dict[str, str]] = {}
    for item in (x.strip() for x in spec.split(",")):
        if not item:
            continue
        name, eq, value = item.partition("=")
        stage, dot, field = name.strip().rpartition(".")
        if not eq or not dot:
            raise ConfigError(f"overrides: {item!r} is not 'stage.field=value'")
        if stage not in stages.names():
            raise ConfigError(f"overrides: unknown stage {stage!r}; known: {stages.names()}")
        out.setdefault(stage, {})[field.strip()] = value.strip()
    return out


def task_config(cfg: RunConfig, t: Task, pipeline: presets.Pipeline | None = None) -> Any:
    """The stage config of task `t` in this run: the preset's, the shortcuts and overrides over it,
    wired to the run's folders. Raises ConfigError naming a bad field."""
    stage = stages.get(t.stage)
    pipeline = pipeline or cfg.pipeline()
    base = pipeline.config(t.stage)
    fields = {f.name for f in dataclasses.fields(base)}
    changes: dict[str, Any] = {k: getattr(cfg, k) for k in SHORTCUTS if k in fields and getattr(cfg, k) is not None}
    changes.update(parse_overrides(cfg.overrides).get(t.stage, {}))
    if t.variant is not None and t.stage in stages.get_variant(t.variant).roots:
        main = config.replace(base, changes, where=t.stage)
        changes.update(stages.get_variant(t.variant).change(t.stage, main, t.member or t.variant))
    changes["out"] = str(stage_dir(cfg, t.stage, t.version))
    for field, up in t.inputs:
        changes[field] = "" if up is None else str(stage_dir(cfg, up.stage, up.version))
    stage_cfg = config.replace(base, changes, where=t.label)
    runner.check(stage, stage_cfg)
    return stage_cfg


def resolve(cfg: RunConfig) -> dict[str, Any]:
    """Every task's stage config (task label -> config), all checked: the first bad field raises
    ConfigError before any stage runs."""
    pipeline = cfg.pipeline()
    cfg.selected()
    for v in stages.variants():
        if getattr(cfg, v.param, False) and not v.stages():
            raise ConfigError(f"{v.param}: no registered stage for variant {v.name!r} to vary")
    return {t.label: task_config(cfg, t, pipeline) for t in instances(cfg) if not external(cfg, t)}


def config_argv(stage_cfg: Any) -> list[str]:
    """A stage config as `peflow <stage>` options (every field that has a value)."""
    argv: list[str] = []
    for f in dataclasses.fields(stage_cfg):
        value = getattr(stage_cfg, f.name)
        flag = "--" + f.name.replace("_", "-")
        if value is None:
            continue
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + f.name.replace("_", "-"))
        else:
            argv += [flag, str(value)]
    return argv


def launch_subprocess(name: str, argv: list[str], cfg: RunConfig) -> None:
    """Run a distributed stage through `peflow launch` (TorchX) as a child process."""
    cmd = [sys.executable, "-m", "peflow.cli", "launch", name, "-j", cfg.launch_nodes(), "--scheduler",
           cfg.scheduler, "--", *argv]
    rc = subprocess.call(cmd)
    if rc == 2:
        raise ConfigError(f"peflow launch {name} refused its configuration (exit 2; the log says why)")
    if rc != 0:
        raise RuntimeError(f"peflow launch {name} exited with {rc}")


Launcher = Callable[[str, list[str], RunConfig], None]


def run_stage(name: str, cfg: RunConfig, *, parent_run_id: str | None = None,
              launch: Launcher = launch_subprocess, variant: str | None = None,
              member: str | None = None) -> dict[str, Any]:
    """Run one task of a pipeline run: the stage (or a variant member's version of it) when selected, else
    reuse its output. Returns a small summary (fits in an Airflow XCom): task id, variant version and
    member, output path and key, whether it ran (or how it was reused), seconds, and the stage's metrics."""
    stage = stages.get(name)
    t0 = time.monotonic()
    if variant is not None:
        v = stages.get_variant(variant)
        if variant not in cfg.variants():
            raise ConfigError(f"task {name}_{variant}: this run has no {variant} variant (set {v.param})")
        if member is None and v.members:
            raise ConfigError(f"task {name}_{variant}: name a member of the variant: {list(v.members)}")
        member = member or variant
        v.version(member)  # an unknown member raises
    task = Task(name, variant, member)
    if external(cfg, task):
        source = stage_dir(cfg, name)
        if not (remote.exists(source) if remote.is_remote(source) else Path(source).is_dir()):
            raise config.InputError(f"data_source {source}: not a folder")
        return {"stage": name, "task": task.id, "variant": None, "member": None, "recipe": None, "out": str(source),
                "key": None,
                "ran": False, "reused": "data source", "seconds": 0.0, "metrics": {}}
    stage_cfg = task_config(cfg, task)
    selected = name in cfg.selected()
    force = cfg.forced(name)
    env = {"MLFLOW_EXPERIMENT_NAME": cfg.experiment, tracking.PARENT_ENV: parent_run_id or ""}
    with io.environ(env):  # child processes (torchrun replicas) inherit these
        outcome = None if force else runner.reuse(stage, stage_cfg)
        if outcome is None and not selected:
            raise ConfigError(f"stage {task.label} is not selected (stage: {cfg.stage!r}) and no earlier run made its "
                              f"output with this configuration; select it too, or run 'all'")
        if outcome is None and stage.distributed:
            launch(name, ["--preset", cfg.preset, *(["--force"] if force else []), *config_argv(stage_cfg)], cfg)
            outcome = runner.published(stage, stage_cfg.out)
        elif outcome is None:
            outcome = runner.execute(stage, stage_cfg, force=force)
    recipe = getattr(stage_cfg, "recipe", None) if stage.ablation else None
    return {"stage": name, "task": task.id, "variant": task.version, "member": member, "recipe": recipe,
            "out": outcome.out,
            "key": outcome.key, "ran": outcome.ran, "reused": outcome.reused,
            "seconds": round(time.monotonic() - t0, 2), "metrics": outcome.metrics}


def start_pipeline_run(cfg: RunConfig, *, tags: dict[str, str] | None = None) -> str:
    """Open the parent MLflow run of a pipeline run; returns its id."""
    resolve(cfg)  # every stage's config checked before anything starts (and before MLflow loads)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow


    experiment = tracking.set_experiment(tracking.tracking_uri(local_root(cfg) / "_"), cfg.experiment)
    all_tags = {"peflow.preset": cfg.preset, "peflow.recipe": task_recipe(cfg, None), "peflow.git_commit": git_commit(), **(tags or {})}
    client = mlflow.MlflowClient()
    run = client.create_run(experiment.experiment_id, run_name=f"pipeline-{remote.name(cfg.out)}", tags=all_tags)
    for k, v in dataclasses.asdict(cfg).items():
        client.log_param(run.info.run_id, k, v)
    return run.info.run_id


def end_pipeline_run(cfg: RunConfig, run_id: str, summaries: list[dict[str, Any]], *, failed: bool) -> None:
    """Close the parent run: stage timings and every stage's metrics, prefixed by stage."""
    import mlflow

    mlflow.set_tracking_uri(tracking.tracking_uri(local_root(cfg) / "_"))
    client = mlflow.MlflowClient()
    for s in summaries:
        if not s:
            continue
        member = f"/{s['member']}" if s.get("member") and s["member"] != s.get("variant") else ""
        client.log_metric(run_id, f"time/{s['task']}{member}_s", s["seconds"])
        for k, v in s.get("metrics", {}).items():
            if isinstance(v, (int, float)):
                client.log_metric(run_id, stages.metric_key(s, k), float(v))
    try:
        from peflow.run_report import log_report

        log_report(cfg, run_id, summaries)
    except Exception as e:  # noqa: BLE001  (a broken report must not hide the run's own status)
        logging.getLogger(__name__).warning("pipeline report not written: %s: %s", type(e).__name__, e)
    client.set_terminated(run_id, "FAILED" if failed else "FINISHED")


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                              cwd=Path(__file__).resolve().parent).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def task_recipe(cfg: RunConfig, variant: str | None) -> str:
    """The pretraining recipe behind a task's output: the run's, or the other one for the ablation."""
    recipe = cfg.recipe or getattr(cfg.pipeline().config("pretrain"), "recipe", "pe")
    return other_recipe(recipe) if variant == ABLATION else recipe


def run_pipeline(cfg: RunConfig, *, launch: Launcher = launch_subprocess,
                 echo: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """`peflow run`: every active task in order (selected ones run, others are reused)."""
    parent = start_pipeline_run(cfg, tags={"peflow.orchestrator": "peflow run"})
    summaries: list[dict[str, Any]] = []
    failed = True
    try:
        for t in instances(cfg):
            echo(f"== {t.label} ==")
            summaries.append(run_stage(t.stage, cfg, parent_run_id=parent, launch=launch, variant=t.variant,
                                       member=t.member))
        failed = False
    finally:
        end_pipeline_run(cfg, parent, summaries, failed=failed)
    return summaries


def params_spec() -> dict[str, dict[str, Any]]:
    """The run config as JSON-schema-style Params (name -> default, type, title, description, enum).

    The DAG wraps each entry in an Airflow `Param`; `out` is per DAG run.
    """
    kinds = {int: "integer", float: "number", str: "string", bool: "boolean"}
    spec: dict[str, dict[str, Any]] = {}
    for f, tp in config.resolved_fields(RunConfig):
        if f.name == "out":
            continue
        kind = kinds[config.base_type(tp)]
        entry: dict[str, Any] = {"default": f.default, "type": ["null", kind] if config.optional(tp) else kind,
                                 "title": f.name.replace("_", " ").capitalize(), "description": f.metadata["help"]}
        choices = config.field_choices(f)
        if choices is not None:
            entry["enum"] = [None, *choices] if config.optional(tp) else choices
        if f.name == "stage":
            entry["examples"] = ["all", *stages.names()]
        spec[f.name] = entry
    return spec


def runs_root() -> str:
    """Where DAG runs keep their stage folders: $PEFLOW_RUNS (a path or an `s3://` URI), else
    $PEFLOW_HOME/runs."""
    if os.environ.get("PEFLOW_RUNS"):
        return os.environ["PEFLOW_RUNS"]
    return str(Path(os.environ.get("PEFLOW_HOME", ".run")).resolve() / "runs")


def run_dir(run_id: str) -> str:
    """The folder (or URI) of one DAG run under `runs_root()`, named after its (sanitised) run id."""
    return remote.join(runs_root(), "".join(c if c.isalnum() or c in "-_." else "_" for c in run_id))


def dag_run_config(params: dict[str, Any], run_id: str) -> RunConfig:
    """The run config of one DAG run: its Params, and its run folder."""
    known = {f.name for f in dataclasses.fields(RunConfig)}
    return RunConfig(out=str(run_dir(run_id)), **{k: v for k, v in params.items() if k in known})
