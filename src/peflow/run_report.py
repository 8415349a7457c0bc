"""The pipeline run report: one self-contained HTML page per pipeline run.

Written by `end_pipeline_run` (so by the DAG's `end_run` task and by
`peflow run`) to `OUT/report.html` and logged to the parent MLflow run as the
artifact `report.html`. It holds the stage table, the key metrics (each
variant of the run, e.g. the recipe ablation's other recipe, in a column
beside the main one), the video table (image-only model, finetuned on web
text, finetuned on the engine's captions: the paper's Tab. 2), the best layer
per probe task against the last layer, the ablation ladder next to the
paper's Tab. 26, and every plot the stages wrote (loss curve, metric bars,
layer plot, confusion matrices), images embedded so the file travels alone.
"""

from __future__ import annotations

import base64
import fnmatch
import html
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from peflow import ladder, remote, stages
from peflow.compare import direction, key_metrics

REPORT = "report.html"

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.7em; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.best { font-weight: bold; background: #e6f4ea; }
.plots { display: grid; grid-template-columns: repeat(var(--cols), 1fr); gap: 1em; }
.plots figure { margin: 0; } .plots img { max-width: 100%; border: 1px solid #eee; }
.muted { color: #777; }
"""


def is_detail(name: str) -> bool:
    """Per-layer probe scores and top-5 numbers: kept in metrics.json, MLflow and this report's
    plots, left out of console summaries (`peflow run`, `make demo`)."""
    return ("/layer_" in name or name.endswith(("/top5", "/R5", "/R10")) or "/zeroshot_pair/" in name
            or "/speed/" in name and name.endswith("_seconds"))


def _columns(summaries: Sequence[Mapping[str, Any]]) -> list[str | None]:
    """Variant versions with a column, main first: [None] or [None, "ablation"]. The members of a variant
    with several (`ladder/<step>`) get a table of their own instead."""
    return [None, *sorted({s["variant"] for s in summaries if s.get("variant") and "/" not in s["variant"]})]


def _by_variant(summaries: Sequence[Mapping[str, Any]]) -> dict[str | None, dict[str, float]]:
    """variant -> {"<stage>/<metric>": value}. A variant column starts from the main tasks (an
    ablation reuses the main run's corpus and validation), then its own tasks replace theirs."""
    from peflow.stages import stage_key

    def numbers(s: Mapping[str, Any]) -> dict[str, float]:
        return {stage_key(s["stage"], k): float(v) for k, v in s.get("metrics", {}).items()
                if isinstance(v, (int, float))}

    main = {k: v for s in summaries if not s.get("variant") for k, v in numbers(s).items()}
    out: dict[str | None, dict[str, float]] = {None: main}
    for variant in sorted({s["variant"] for s in summaries if s.get("variant")}):
        out[variant] = {**main, **{k: v for s in summaries if s.get("variant") == variant
                                   for k, v in numbers(s).items()}}
    return out


def _recipe(summaries: Sequence[Mapping[str, Any]], variant: str | None) -> str:
    """The pretraining recipe behind a column: the variant's own pretraining, else the main run's."""
    for v in (variant, None):
        for s in summaries:
            if s.get("variant") == v and s.get("recipe"):
                return str(s["recipe"])
    return "?"


#: The video table's rows: (label, column of the report, metric prefix in that column).
VIDEO_ROWS = (("image-only PE-core", None, "evaluate/video/core/"),
              ("finetuned on title + description (a)", "metadata", "evaluate/video/finetuned/"),
              ("finetuned on the engine's captions (b)", None, "evaluate/video/finetuned/"))
VIDEO_COLUMNS = (("actions top-1 (10)", "zeroshot/top1"), ("motion types top-1 (7)", "zeroshot_motion/top1"),
                 ("t2v R@1", "retrieval/t2v/R1"), ("t2v R@5", "retrieval/t2v/R5"), ("v2t R@1", "retrieval/v2t/R1"),
                 ("v2t R@5", "retrieval/v2t/R5"))


def video_table(values: Mapping[str | None, Mapping[str, float]]) -> list[list[str]]:
    """Rows of the video table for the models this run has (paper Tab. 2's layout)."""
    rows = []
    for label, column, prefix in VIDEO_ROWS:
        have = values.get(column, {})
        if not any(k.startswith(prefix) for k in have):
            continue
        rows.append([label, *(_fmt(have.get(prefix + m)) for _, m in VIDEO_COLUMNS)])
    return rows


#: The paper's Tab. 36 rows (evaluate's dense/* metrics) and columns.
DENSE_ROWS = (("PE-core, last layer", "core_last"), ("PE-core, best intermediate layer", "core_best"),
              ("PE spatial, last layer", "spatial_last"))
DENSE_COLUMNS = (("seg mIoU", "seg_miou"), ("depth R^2", "depth_r2"), ("depth RMSE", "depth_rmse"),
                 ("tracking J", "track_j"))
QA_TYPES = (("image", ("count", "colour", "shape", "position", "mean")),
            ("video", ("action", "colour", "shape", "count", "mean")))


def dense_table(metrics: Mapping[str, float]) -> list[list[str]]:
    """Rows of the dense table (the main run's evaluate metrics), for the rows it has."""
    rows = []
    for label, row in DENSE_ROWS:
        prefix = f"evaluate/dense/{row}/"
        if any(k.startswith(prefix) for k in metrics):
            cells = []
            for _, m in DENSE_COLUMNS:
                v, layer = metrics.get(prefix + m), metrics.get(f"{prefix}{m.split('_')[0]}_layer")
                cells.append(_fmt(v) + (f" (layer {layer:.0f})" if v is not None and layer is not None else ""))
            rows.append([label, *cells])
    return rows


def qa_table(metrics: Mapping[str, float]) -> list[list[str]]:
    """PE lang's QA accuracy per type: the chosen layer, the last layer and the majority answer."""
    rows = []
    for modality, types in QA_TYPES:
        for t in types:
            chosen = metrics.get(f"evaluate/lang/chosen/qa/{modality}/{t}")
            if chosen is None:
                continue
            rows.append([f"{modality} {t}", _fmt(chosen), _fmt(metrics.get(f"evaluate/lang/last/qa/{modality}/{t}")),
                         _fmt(metrics.get(f"evaluate/lang/chosen/qa/{modality}/{t}_majority"))])
    return rows


def _fmt(v: float | None) -> str:
    if v is None:
        return "—"
    return f"{v:.0f}" if float(v).is_integer() and abs(v) >= 1 else f"{v:.4g}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], *, raw: bool = False) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(c if raw else f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def metric_rows(values: Mapping[str | None, Mapping[str, float]]) -> list[str]:
    """The metric names the key table shows: the key metrics of `peflow compare` (globs expanded in
    their order), among them each probe task's best layer, best score and last-layer score."""
    present = sorted(set().union(*(v.keys() for v in values.values())))
    rows = [k for pattern in key_metrics() for k in present if fnmatch.fnmatchcase(k, pattern)]
    return list(dict.fromkeys(rows))


def _metrics_html(values: Mapping[str | None, Mapping[str, float]], labels: Sequence[str]) -> str:
    rows = []
    for name in metric_rows(values):
        vals = [values[v].get(name) for v in values]
        have = [x for x in vals if x is not None]
        best = None
        if len(have) > 1 and direction(name):
            best = max(have, key=lambda x: direction(name) * x)
        cells = [f"<td>{html.escape(name)}</td>"]
        for x in vals:
            cls = "num best" if best is not None and x == best else "num"
            cells.append(f'<td class="{cls}">{_fmt(x)}</td>')
        rows.append(cells)
    return _table(["metric", *labels], rows, raw=True)


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (f'<figure><img alt="{html.escape(path.name)}" src="data:image/png;base64,{data}">'
            f"<figcaption class=muted>{html.escape(str(path))}</figcaption></figure>")


def build_report(cfg: Any, run_id: str, summaries: Sequence[Mapping[str, Any]]) -> str:
    """The report of one pipeline run as an HTML string."""
    variants = _columns(summaries)
    labels = [f"{'main' if v is None else v} ({_recipe(summaries, v)})" for v in variants]
    values = _by_variant(summaries)
    info = [["run", remote.name(cfg.out)], ["MLflow run", run_id], ["preset", cfg.preset],
            ["recipe", str(_recipe(summaries, None))],
            ["variants", ", ".join(cfg.variants()) or "none"],
            ["data source", cfg.data_source], ["written", time.strftime("%Y-%m-%d %H:%M:%S %Z")]]
    stage_rows = [[s.get("task", s["stage"]), s.get("recipe") or "", "ran" if s["ran"] else "reused",
                   f"{s['seconds']:.1f}", s["out"]] for s in summaries]
    parts = [f"<!doctype html><html><head><meta charset=utf-8><title>peflow run {html.escape(run_id)}</title>"
             f"<style>{_CSS}</style></head><body>",
             f"<h1>peflow pipeline run <code>{html.escape(remote.name(cfg.out))}</code></h1>",
             _table(["", ""], info), "<h2>Stages</h2>",
             _table(["task", "recipe", "status", "seconds", "output"], stage_rows),
             "<h2>Key metrics</h2>",
             "<p class=muted>Fractions in [0, 1]; probe rows: the best layer per task (1 = first block), "
             "its score, and the last layer's score (docs/metrics.md).</p>",
             _metrics_html({v: values[v] for v in variants}, labels)]
    video = video_table(values)
    if video:
        parts += ["<h2>Video: zero-shot and retrieval on held-out videos</h2>",
                  "<p class=muted>Clips are the mean of 8 frames' embeddings, so reversed motions (left/right, "
                  "up/down, grow/shrink) look the same: the 7 motion types merge those pairs (docs/video.md). "
                  "The (a) row needs the engine ablation (Param engine_ablation).</p>",
                  _table(["model", *(c for c, _ in VIDEO_COLUMNS)], video)]
    main = values.get(None, {})
    qa = qa_table(main)
    if qa:
        layers = (main.get("evaluate/lang/chosen/layer"), main.get("evaluate/lang/last/layer"))
        parts += ["<h2>PE lang: question answering on held-out images and videos</h2>",
                  _table(["question type", f"chosen layer ({_fmt(layers[0])})", f"last layer ({_fmt(layers[1])})",
                          "majority answer"], qa)]
    dense = dense_table(main)
    if dense:
        parts += ["<h2>Dense probes and tracking (paper Tab. 36)</h2>",
                  _table(["features", *(c for c, _ in DENSE_COLUMNS)], dense)]
    steps = ladder.table({k.removeprefix(f"{stages.LADDER}/"): v for k, v in values.items()
                          if k and k.startswith(f"{stages.LADDER}/")})
    if steps:
        parts += ["<h2>The ablation ladder (paper Tab. 26)</h2>",
                  "<p class=muted>Each step adds one piece to the one above, pretrained at this run's budget and "
                  "evaluated at the size it trained at last (docs/pretraining.md). Ours: fractions in [0, 1] on "
                  "the corpus's shape task and its shifted splits; the paper's: ImageNet val and its 6-set "
                  "robustness average (%) at L/14, its COCO probe's best layer of 24 (Fig. 9), and its compute."
                  "</p>", _table(list(ladder.HEADER), steps)]
    parts.append("<h2>Plots</h2>")
    for stage in dict.fromkeys(s["stage"] for s in summaries):
        figs = []
        for v in variants:
            s = next((x for x in summaries if x["stage"] == stage and x.get("variant") == v), None)
            folder = Path(remote.localize(s["out"])) if s else None
            pngs = sorted(folder.glob("*.png")) if folder is not None and folder.is_dir() else []
            figs.append("".join(_img(p) for p in pngs) or "<p class=muted>no plots</p>")
        if any("<img" in f for f in figs):
            cols = len(figs)
            parts.append(f"<h3>{html.escape(stage)}</h3><div class=plots style='--cols:{cols}'>")
            parts += [f"<div><h4>{html.escape(lab)}</h4>{f}</div>" for lab, f in zip(labels, figs)]
            parts.append("</div>")
    parts.append("</body></html>")
    return "\n".join(parts)


def log_report(cfg: Any, run_id: str, summaries: Sequence[Mapping[str, Any]]) -> Path:
    """Write OUT/report.html (atomically; for an `s3://` OUT, its local copy, then uploaded) and log it to the
    pipeline's MLflow run; returns its local path."""
    import mlflow

    from peflow.io import write_text_atomic

    path = Path(remote.localize(cfg.out)) / REPORT
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, build_report(cfg, run_id, [s for s in summaries if s]))
    if remote.is_remote(cfg.out):
        remote.upload_file(path, remote.join(cfg.out, REPORT))
    mlflow.MlflowClient().log_artifact(run_id, str(path))
    return path
