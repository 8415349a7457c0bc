"""`peflow compare`: pipeline runs side by side, from MLflow.

A pipeline (parent) run carries every stage's metrics prefixed by the stage
(`evaluate/zeroshot/test/top1`, `pretrain/train/final_loss`); a stage run's
own metrics get its stage as prefix, so both kinds line up in one table. The
key metrics are shown by default; `metrics` takes names or globs, with or
without the stage prefix. Output: a rich table (best value per column marked),
a bar plot, or JSON.
"""

from __future__ import annotations

import dataclasses
import datetime
import fnmatch
import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

def key_metrics() -> list[str]:
    """The metrics shown by default (globs allowed), stage-prefixed: every registered stage's
    `key_metrics` (peflow.stages), the last stages (evaluation) first."""
    from peflow import stages

    return [stages.stage_key(s.name, m) for s in reversed(stages.all_stages()) for m in s.key_metrics]


LOWER_IS_BETTER = ("*loss*", "time/*", "*/seconds", "*rmse*")
UNRANKED = ("*best_layer", "*/steps", "*chance*", "*majority*", "*_layer", "*/layer", "*teacher_layer", "*/depth")
BEST_MARK = "*"


@dataclasses.dataclass
class Row:
    """One run of the comparison (a pipeline run's ablation variant is a row of its own);
    `metrics` are stage-prefixed."""

    run_id: str
    name: str
    recipe: str
    preset: str
    start: str
    status: str
    metrics: dict[str, float]
    variant: str | None = None

    @property
    def key(self) -> str:
        """Unique per row: the run id, `<run id>:<variant>` for a variant."""
        return self.run_id if self.variant is None else f"{self.run_id}:{self.variant}"


@dataclasses.dataclass
class Comparison:
    """The compared runs, the metric columns, and per column the keys of the best rows."""

    tracking_uri: str
    experiment: str | None
    rows: list[Row]
    columns: list[str]
    best: dict[str, list[str]]
    unmatched: list[str]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: each row's metrics limited to the columns, NaN as null."""
        d = dataclasses.asdict(self)
        for row, r in zip(d["rows"], self.rows, strict=True):
            row["key"] = r.key
            row["metrics"] = {c: None if math.isnan(r.metrics[c]) else r.metrics[c]
                              for c in self.columns if c in r.metrics}
        return d


def direction(metric: str) -> int:
    """+1 when higher is better, -1 when lower is better, 0 when not ranked (a layer index)."""
    if any(fnmatch.fnmatchcase(metric, p) for p in UNRANKED):
        return 0
    return -1 if any(fnmatch.fnmatchcase(metric, p) for p in LOWER_IS_BETTER) else 1


def client_for(tracking_uri: str | None) -> tuple[Any, str]:
    """An MlflowClient for `tracking_uri` (default $MLFLOW_TRACKING_URI) and the URI used."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise ValueError("no tracking URI: pass --tracking-uri or set MLFLOW_TRACKING_URI (`peflow run --out OUT` "
                         "tracks in sqlite:///OUT/mlruns/mlflow.db unless MLFLOW_TRACKING_URI is set)")
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise ValueError(f"no MLflow database at {uri.removeprefix('sqlite:///')}")
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri), uri


def _experiment(client: Any, name: str) -> Any:
    exp = client.get_experiment_by_name(name)
    if exp is None:
        names = sorted(e.name for e in client.search_experiments())
        raise ValueError(f"no experiment {name!r} (experiments: {', '.join(names) or 'none'})")
    return exp


def pipeline_runs(client: Any, experiment: str, last: int) -> list[Any]:
    """The newest `last` pipeline runs of `experiment`, newest first."""
    if last < 1:
        raise ValueError(f"--last must be >= 1, got {last}")
    exp = _experiment(client, experiment)
    runs = client.search_runs([exp.experiment_id], filter_string="attributes.run_name LIKE 'pipeline-%'",
                              order_by=["attributes.start_time DESC"], max_results=last)
    runs = [r for r in runs if "peflow.stage" not in r.data.tags]
    if not runs:
        raise ValueError(f"no pipeline runs in experiment {experiment!r}")
    return runs


def named_runs(client: Any, run_ids: Sequence[str], experiment: str) -> list[Any]:
    """The runs with these ids (or unique id prefixes within `experiment`), in the given order."""
    from mlflow.exceptions import MlflowException

    runs = []
    for rid in run_ids:
        try:
            runs.append(client.get_run(rid))
            continue
        except MlflowException:
            pass
        exp = client.get_experiment_by_name(experiment)
        found = [] if exp is None else [
            r for r in client.search_runs([exp.experiment_id], max_results=5000) if r.info.run_id.startswith(rid)]
        if len(found) != 1:
            why = "matches several runs" if found else "is not a run"
            raise ValueError(f"run id {rid!r} {why} (tracking URI {client.tracking_uri})")
        runs.append(found[0])
    return runs


def _stage_metrics(run: Any) -> dict[str, float]:
    """A stage run's metrics under the names the pipeline run gives them (`evaluate/...`,
    `ablation/evaluate/...`, `ladder/lamb/evaluate/...` for a stage run of a variant version, found by its
    output folder OUT/<version>/<stage>)."""
    from peflow.stages import metric_key

    stage = run.data.tags["peflow.stage"]
    parent = Path(run.data.params.get("out", "")).parent
    known = versions()
    variant = next((v for v in (parent.name, f"{parent.parent.name}/{parent.name}") if v in known), None)
    return {metric_key({"stage": stage, "variant": variant}, k): v for k, v in run.data.metrics.items()}


def versions() -> list[str]:
    """Every variant version a pipeline run may have: `ablation`, `metadata`, `ladder/baseline`, ..."""
    from peflow.stages import variants

    return [v.version(m) for v in variants() for m in v.versions()]


def rows(client: Any, run: Any) -> list[Row]:
    """A run as table rows: a stage run's metrics prefixed by its stage; a pipeline run's metrics
    (those missing, e.g. while it runs, filled in from its stage runs), and a row for each variant
    version it has (the recipe ablation, the engine ablation, each step of the ablation ladder)."""
    from peflow.stages import ABLATION, variants
    from peflow.train.recipe import other_recipe

    tags, params = run.data.tags, run.data.params
    is_stage = bool(tags.get("peflow.stage"))
    if is_stage:
        metrics = _stage_metrics(run)
    else:
        metrics = {}
        children = client.search_runs([run.info.experiment_id],
                                      filter_string=f"tags.mlflow.parentRunId = '{run.info.run_id}'")
        for child in children:
            if child.data.tags.get("peflow.stage"):
                metrics.update(_stage_metrics(child))
        metrics.update(run.data.metrics)
    start = datetime.datetime.fromtimestamp(run.info.start_time / 1000).strftime("%Y-%m-%d %H:%M")
    recipe = tags.get("peflow.recipe") or params.get("recipe", "")
    names = {v.name for v in variants()}
    plain = {k: v for k, v in metrics.items() if k.split("/", 1)[0] not in names}
    main = Row(run_id=run.info.run_id, name=run.info.run_name or "", start=start, status=run.info.status,
               recipe=recipe, preset=tags.get("peflow.preset") or params.get("preset", ""), metrics=plain)
    varied = {n: {k.removeprefix(f"{n}/"): v for k, v in metrics.items() if k.startswith(f"{n}/")}
              for n in versions()}
    out = [main] if plain or not any(varied.values()) else []
    for name, m in varied.items():
        if not m:
            continue
        # a stage run of a variant already names its own recipe; only the recipe ablation changes it
        other = other_recipe(recipe) if recipe and not is_stage and name == ABLATION else recipe
        out.append(dataclasses.replace(main, name=f"{main.name} ({name})", variant=name, metrics=m, recipe=other))
    return out


def select_columns(rows: Sequence[Row], patterns: Sequence[str]) -> tuple[list[str], list[str]]:
    """Metric columns matching `patterns` (in pattern order, sorted within a glob) that at least one
    row has; a pattern also matches a name without its stage prefix. Returns (columns, unmatched)."""
    have = sorted({k for r in rows for k in r.metrics})
    columns: list[str] = []
    unmatched = []
    for p in patterns:
        hits = [k for k in have if fnmatch.fnmatchcase(k, p) or fnmatch.fnmatchcase(k.split("/", 1)[-1], p)]
        columns += [k for k in hits if k not in columns]
        if not hits:
            unmatched.append(p)
    return columns, unmatched


def best_runs(rows: Sequence[Row], columns: Sequence[str]) -> dict[str, list[str]]:
    """Per ranked column with values from two rows or more: the keys of the rows holding the best value."""
    best = {}
    for c in columns:
        values = {r.key: r.metrics[c] for r in rows if c in r.metrics and not math.isnan(r.metrics[c])}
        sign = direction(c)
        if sign and len(values) >= 2:
            top = max(v * sign for v in values.values())
            best[c] = [rid for rid, v in values.items() if v * sign == top]
    return best


def compare(*, tracking_uri: str | None = None, experiment: str = "peflow", run_ids: Sequence[str] = (),
            metrics: Sequence[str] = (), last: int = 10) -> Comparison:
    """Collect the runs (`run_ids`, else the newest `last` pipeline runs of `experiment`) and their
    metric columns (`metrics`, else `key_metrics()`). Raises ValueError for unknown experiments, runs
    or metrics."""
    from mlflow.exceptions import MlflowException

    client, uri = client_for(tracking_uri)
    try:
        runs = named_runs(client, run_ids, experiment) if run_ids else pipeline_runs(client, experiment, last)
        table_rows = [r for run in runs for r in rows(client, run)]
    except MlflowException as e:
        raise ValueError(f"MLflow at {uri}: {e.message}") from None
    columns, unmatched = select_columns(table_rows, metrics or key_metrics())
    if metrics and not columns:
        raise ValueError(f"no run has a metric matching {', '.join(metrics)}")
    return Comparison(tracking_uri=uri, experiment=None if run_ids else experiment, rows=table_rows,
                      columns=columns, best=best_runs(table_rows, columns), unmatched=unmatched if metrics else [])


def fmt(value: float | None) -> str:
    """A table cell: '-' when missing, integers plain, else 4 significant digits."""
    if value is None or math.isnan(value):
        return "-"
    return f"{value:.0f}" if float(value).is_integer() and 1 <= abs(value) < 1e6 else f"{value:.4g}"


def _cell(cmp: Comparison, r: Row, c: str) -> str:
    text = fmt(r.metrics.get(c))
    return f"[bold green]{text} {BEST_MARK}[/]" if r.key in cmp.best.get(c, ()) else text


def table(cmp: Comparison, *, transposed: bool = False) -> Any:
    """The comparison as a rich Table, a row per run (`transposed`: a column per run, for narrow
    terminals); best values bold green and marked with BEST_MARK."""
    from rich.markup import escape
    from rich.table import Table

    what = f"experiment {cmp.experiment}" if cmp.experiment else "selected runs"
    runs = len({r.run_id for r in cmp.rows})
    rows = f" ({len(cmp.rows)} rows)" if runs != len(cmp.rows) else ""
    t = Table(title=f"{runs} runs{rows}, {what}",
              caption=f"{BEST_MARK} best (higher is better; lower for losses and times)")

    def status(r: Row) -> str:
        return r.status if r.status == "FINISHED" else f"[yellow]{escape(r.status)}[/]"

    if transposed:
        t.add_column("metric", no_wrap=True, min_width=max(map(len, cmp.columns), default=6))
        for r in cmp.rows:
            head = escape("\n".join([r.name, r.run_id[:8], f"{r.recipe} {r.preset}", *r.start.split()]))
            t.add_column(f"{head}\n{status(r)}", justify="right", overflow="fold")
        for c in cmp.columns:
            t.add_row(escape(c), *(_cell(cmp, r, c) for r in cmp.rows))
        return t
    for col in ("run", "name", "recipe", "preset", "start", "status"):
        t.add_column(col)
    for c in cmp.columns:  # one path component per header line keeps columns narrow
        t.add_column(c.replace("/", "/\n"), justify="right")
    for r in cmp.rows:
        t.add_row(r.run_id[:8], *map(escape, (r.name, r.recipe, r.preset)), r.start, status(r),
                  *(_cell(cmp, r, c) for c in cmp.columns))
    return t


def ladder_tables(cmp: Comparison) -> list[Any]:
    """A rich Table per compared pipeline run that has the ablation ladder: its steps next to the paper's
    Tab. 26 (peflow.ladder)."""
    from rich.markup import escape
    from rich.table import Table

    from peflow import ladder
    from peflow.stages import LADDER

    out = []
    for run_id in dict.fromkeys(r.run_id for r in cmp.rows):
        steps = {r.variant.removeprefix(f"{LADDER}/"): r.metrics for r in cmp.rows
                 if r.run_id == run_id and r.variant and r.variant.startswith(f"{LADDER}/")}
        rows = ladder.table(steps)
        if not rows:
            continue
        t = Table(title=f"ablation ladder of run {run_id[:8]} (paper Tab. 26)",
                  caption="ours: fractions on the corpus's shape task; paper: ImageNet %, L/14")
        for h in ladder.HEADER:
            t.add_column(h, justify="left" if h == "step" else "right")
        for row in rows:
            t.add_row(*map(escape, row))
        out.append(t)
    return out


def plot(cmp: Comparison, path: str | Path) -> Path:
    """Bar plot: metrics with values in [0, 1] grouped in one panel (one bar per run), each other
    metric in its own panel; best bars outlined."""
    from matplotlib.patches import Patch

    from peflow.plots import pyplot, save

    plt = pyplot()

    def values(c: str) -> list[float]:
        return [r.metrics[c] for r in cmp.rows if c in r.metrics]

    fractions = [c for c in cmp.columns if all(0 <= v <= 1 for v in values(c)) and direction(c)]
    others = [c for c in cmp.columns if c not in fractions]
    ncols = min(4, max(1, len(others)))
    nrows = (1 if fractions else 0) + math.ceil(len(others) / ncols)
    fig = plt.figure(figsize=(max(7.0, 3.2 * ncols, 3.0 + 0.4 * len(fractions) * len(cmp.rows)), 3.6 * nrows))
    grid = fig.add_gridspec(max(nrows, 1), ncols)
    colors = plt.get_cmap("tab10")
    width = 0.8 / max(1, len(cmp.rows))
    legend = [Patch(color=colors(i % 10), label=f"{r.name} ({r.run_id[:8]})") for i, r in enumerate(cmp.rows)]

    def bars(ax: Any, cols: list[str], labels: list[str]) -> None:
        for i, r in enumerate(cmp.rows):
            xs = [j + (i - (len(cmp.rows) - 1) / 2) * width for j in range(len(cols))]
            hs = [r.metrics.get(c, 0.0) for c in cols]
            edge = [2.0 if r.key in cmp.best.get(c, ()) else 0.0 for c in cols]
            ax.bar(xs, hs, width, color=colors(i % 10), edgecolor="black", linewidth=edge)
        ax.set_xticks(range(len(cols)), labels, rotation=20, ha="right", fontsize=8)
        ax.grid(axis="y", alpha=0.3)

    if fractions:
        ax = fig.add_subplot(grid[0, :])
        bars(ax, fractions, fractions)
        ax.set_ylim(0, 1)
        ax.set_title("scores in [0, 1] (outlined: best)", fontsize=9)
        ax.legend(handles=legend, fontsize=7, loc="upper right")
    for k, c in enumerate(others):
        ax = fig.add_subplot(grid[(1 if fractions else 0) + k // ncols, k % ncols])
        bars(ax, [c], [""])
        ax.set_title(c, fontsize=8)
        if not fractions and k == 0:
            ax.legend(handles=legend, fontsize=7)
    return save(fig, path)


def report(cmp: Comparison, *, plot_path: str | None, as_json: bool) -> None:
    """Print the comparison (rich table, or JSON) and write the plot when `plot_path` is set."""
    if as_json:
        print(json.dumps(cmp.to_dict(), indent=2))
    else:
        from rich.console import Console
        from rich.measure import Measurement

        # Piped output keeps whole rows (rich would squeeze them to 80 columns).
        wide = not sys.stdout.isatty() and "COLUMNS" not in os.environ
        console = Console(width=240 if wide else None)
        wide_table = table(cmp)
        fits = Measurement.get(console, console.options.update_width(10_000), wide_table).maximum <= console.width
        console.print(wide_table if fits else table(cmp, transposed=True))
        for p in cmp.unmatched:
            console.print(f"[yellow]no run has a metric matching {p!r}[/]")
        for t in ladder_tables(cmp):
            console.print(t)
    if plot_path and cmp.columns:
        written = plot(cmp, plot_path)
        if not as_json:
            print(f"plot: {written}")
