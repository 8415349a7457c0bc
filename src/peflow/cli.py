"""The `peflow` command: one subcommand per registered stage, generated from
the stage's config dataclass, plus the orchestration helpers."""

from __future__ import annotations

import dataclasses
import inspect
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

import typer

from peflow import config, presets, remote, stages
from peflow.config import base_type, field_choices, field_help, resolved_fields

DEFAULT_PRESET = "nano"


def _option(name: str, typ: type, default: Any, help: str, *, optional: bool) -> inspect.Parameter:
    """One keyword-only typer option `--name` (`--name/--no-name` for a bool); `...` as default: required."""
    flag = "--" + name.replace("_", "-")
    decls = [f"{flag}/--no-{name.replace('_', '-')}"] if typ is bool else [flag]
    show = default is not None and default is not ...
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=typ | None if optional else typ,
                             default=typer.Option(default, *decls, help=help, show_default=show))


def _fail(prog: str, e: Exception) -> None:
    typer.secho(f"{prog}: {e}", fg="red", err=True)
    raise typer.Exit(2) from None


def _field_options(cls: type, shown: Any) -> list[inspect.Parameter]:
    """One option per config field, default None (= the preset's value, shown in the help)."""
    params = []
    for f, tp in resolved_fields(cls):
        typ = base_type(tp)
        if typ not in (int, float, str, bool):
            raise TypeError(f"{cls.__name__}.{f.name}: unsupported CLI type {tp}")
        value = getattr(shown, f.name)
        extra = [f"{DEFAULT_PRESET}: {value!r}"] if value not in (None, "") else []
        choices = field_choices(f)
        if choices is not None:
            extra.append("one of " + ", ".join(choices))
        help = field_help(f) + (f" ({'; '.join(extra)})" if extra else "")
        params.append(_option(f.name, typ, None, help, optional=True))
    return params


def _stage_command(stage: stages.Stage) -> Any:
    """`peflow <stage>`: the preset's config of the stage, the options over it, through the stage runner."""
    cls = stage.config_cls
    common = [
        _option("preset", str, DEFAULT_PRESET, f"pipeline preset the unset options come from: {', '.join(presets.names())}",
                optional=False),
        _option("force", bool, False, "run even when an output with this key exists (here or in the store)",
                optional=False),
        _option("experiment", str, None, "MLflow experiment (default: $MLFLOW_EXPERIMENT_NAME, else 'peflow')",
                optional=True),
        _option("tracking_uri", str, None, "MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else SQLite "
                "beside OUT)", optional=True),
    ]
    names = {f.name for f in dataclasses.fields(cls)}
    clash = names & {p.name for p in common}
    assert not clash, f"{cls.__name__} fields {clash} clash with the common stage options"

    def command(**kwargs: Any) -> None:
        from peflow import io, runner

        preset, force = kwargs.pop("preset"), kwargs.pop("force")
        env = {"MLFLOW_EXPERIMENT_NAME": kwargs.pop("experiment"), "MLFLOW_TRACKING_URI": kwargs.pop("tracking_uri")}
        try:
            base = presets.get(preset).config(stage.name)
            cfg = config.replace(base, {k: v for k, v in kwargs.items() if v is not None}, where=stage.name)
            with io.environ(env):
                runner.execute(stage, cfg, force=force)
        except ValueError as e:  # ConfigError, InputError and the stages' own value errors
            _fail(f"peflow {stage.name}", e)

    shown = presets.get(DEFAULT_PRESET).config(stage.name)
    command.__signature__ = inspect.Signature([*common, *_field_options(cls, shown)])  # type: ignore[attr-defined]
    command.__doc__ = (stage.load().__doc__ or stage.summary).strip()
    return command


def _config_command(cls: type, call: Any, doc: str) -> Any:
    """A typer callback whose options are the fields of the dataclass `cls` (with its defaults)."""
    params = []
    for f, tp in resolved_fields(cls):
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        choices = field_choices(f)
        help = field_help(f) + (f" (one of {', '.join(choices)})" if choices else "")
        params.append(_option(f.name, base_type(tp), ... if required else f.default, help,
                              optional=not required and f.default is None))

    def command(**kwargs: Any) -> None:
        try:
            call(cls(**kwargs))
        except ValueError as e:
            _fail("peflow", e)

    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__doc__ = doc.strip()
    return command


def _run_pipeline(cfg: Any) -> None:
    from rich.console import Console
    from rich.table import Table

    from peflow import orchestration
    from peflow.run_report import is_detail

    from rich.markup import escape

    console = Console()
    summaries = orchestration.run_pipeline(cfg, echo=lambda m: console.rule(escape(m.strip("= "))))
    table = Table(title=f"pipeline run {cfg.out}")
    for col in ("task", "ran", "seconds", "key metrics"):
        table.add_column(col, overflow="fold")
    for s in summaries:
        metrics = ", ".join(f"{k}={v:.3g}" for k, v in s["metrics"].items()
                            if isinstance(v, (int, float)) and not is_detail(k))
        table.add_row(escape(orchestration.summary_label(s)), "yes" if s["ran"] else f"reused ({s['reused']})", f"{s['seconds']:.1f}", metrics)
    console.print(table)
    report = Path(remote.localize(cfg.out)) / "report.html"
    if report.is_file():
        console.print(f"report: {report}" + (f" (and {remote.join(cfg.out, 'report.html')})"
                                              if remote.is_remote(cfg.out) else ""))


REPO = Path(__file__).resolve().parents[2]


def launch(
    ctx: typer.Context,
    stage: str = typer.Argument(..., help="a registered distributed stage, e.g. pretrain"),
    j: str = typer.Option("2x1", "-j", help="{nnodes}x{nproc_per_node}"),
    scheduler: str = typer.Option("local_cwd", help="local_cwd (this machine) or kubernetes (Volcano)"),
    dryrun: bool = typer.Option(False, "--dryrun", help="print the scheduler request, run nothing"),
    image: Optional[str] = typer.Option(None, help="container image (kubernetes)"),
    gpu: Optional[int] = typer.Option(None, help="GPUs per node"),
    cpu: Optional[int] = typer.Option(None, help="CPUs per node"),
    mem_mb: Optional[int] = typer.Option(None, "--memMB", help="memory per node (MB)"),
    queue: str = typer.Option("default", help="Volcano queue (kubernetes)"),
    namespace: str = typer.Option("default", help="Kubernetes namespace"),
    log_dir: Optional[str] = typer.Option(None, help="keep local replica logs here"),
) -> None:
    stage_obj = stages.get(stage)
    if not stage_obj.distributed:
        typer.secho(f"peflow launch: {stage} runs in-process; use `peflow {stage}`", fg="red", err=True)
        raise typer.Exit(2)
    if not (REPO / "components" / "launch.py").is_file():
        typer.secho(f"peflow launch: needs a peflow checkout with components/ (looked in {REPO})", err=True)
        raise typer.Exit(2)
    argv = [sys.executable, "-m", "components.launch", stage, "-j", j, "--scheduler", scheduler,
            "--queue", queue, "--namespace", namespace]
    argv += ["--dryrun"] if dryrun else []
    for flag, value in (("--image", image), ("--gpu", gpu), ("--cpu", cpu), ("--memMB", mem_mb),
                        ("--log-dir", log_dir)):
        if value is not None:
            argv += [flag, str(value)]
    # TorchX lives in components/ (the library never imports it): run it as a child.
    rc = subprocess.call([*argv, "--", *ctx.args], cwd=REPO)
    raise typer.Exit(rc)


def compare_runs(
    experiment: str = typer.Option("peflow", help="MLflow experiment whose newest pipeline runs are compared"),
    runs: Optional[list[str]] = typer.Option(None, "--runs", help="run ids instead (pipeline or stage runs; "
                                             "unique prefixes work); repeat the option or separate by commas"),
    metrics: Optional[str] = typer.Option(None, help="comma-separated metric names or globs, with or without the "
                                          "stage prefix (default: the key metrics every run may have)"),
    last: int = typer.Option(10, help="how many of the newest pipeline runs to compare (without --runs)"),
    plot: Optional[str] = typer.Option(None, help="bar plot file (default: compare.png; with --json: none unless "
                                       "given; '' for none)"),
    as_json: bool = typer.Option(False, "--json", help="print the table as JSON instead"),
    tracking_uri: Optional[str] = typer.Option(None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI)"),
) -> None:
    from peflow import compare

    ids = [i.strip() for r in runs or [] for i in r.split(",") if i.strip()]
    names = [m.strip() for m in (metrics or "").split(",") if m.strip()]
    try:
        cmp = compare.compare(tracking_uri=tracking_uri, experiment=experiment, run_ids=ids, metrics=names,
                              last=last)
    except ValueError as e:
        typer.secho(f"peflow compare: {e}", fg="red", err=True)
        raise typer.Exit(2) from None
    compare.report(cmp, plot_path=plot if plot is not None or as_json else "compare.png", as_json=as_json)


def build_app() -> typer.Typer:
    """The `peflow` command over the stages registered now: one subcommand per stage, then run,
    launch and compare."""
    from peflow.orchestration import RunConfig

    app = typer.Typer(name="peflow", help="Train, align and evaluate Perception Encoder (PE) vision encoders.",
                      no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
    for stage in stages.all_stages():
        app.command(name=stage.name, help=stage.summary)(_stage_command(stage))
    app.command(name="run", help="Run the whole pipeline (or --stage X) through the same task functions the DAG "
                "uses.")(_config_command(RunConfig, _run_pipeline, "Run the pipeline: every stage's folder at "
                                                                   "OUT/<stage>/."))
    app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
                help="Run a distributed stage through the TorchX component: "
                "`peflow launch pretrain -j 2x1 -- --preset nano --data D --out O`.")(launch)
    app.command(name="compare", help="Compare pipeline runs from MLflow: key metrics as a table (best marked) and a "
                "bar plot: `peflow compare --last 5`, `peflow compare --runs ID --runs ID --metrics "
                "'evaluate/probe/*/best'`.")(compare_runs)
    return app


def main(argv: list[str] | None = None) -> None:
    """Entry point; `argv` lets tests and launchers call it in-process."""
    build_app()(args=argv if argv is not None else sys.argv[1:], prog_name="peflow")


if __name__ == "__main__":
    main()
