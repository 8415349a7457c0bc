"""Run the suites with Great Expectations 1.x and turn the results into
per-row failure reasons; build the Data Docs site.

One file context per validation (in a scratch folder), a pandas data source
with one dataframe asset per suite, and a checkpoint per suite with result
format COMPLETE, so every failed expectation lists the index of each failing
row. The checkpoint's UpdateDataDocsAction renders the run into the site.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from peflow.validation import suites as suites_mod


@dataclasses.dataclass
class Outcome:
    """What the suites found."""

    reasons: dict[int, list[str]]  #: row index -> reasons (in suite order), failing rows only
    expectations: list[dict[str, Any]]  #: one summary per expectation run
    docs_dir: Path | None  #: the built Data Docs site (index.html inside)


def _context(project_dir: Path) -> Any:
    # GX 1.x posts usage statistics unless this is set before the context exists.
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="file", project_root_dir=str(project_dir))
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    context.variables.save()
    return context


def _row_indices(result: dict[str, Any]) -> list[int]:
    out = []
    for item in result.get("unexpected_index_list") or []:
        # plain index labels; dicts when unexpected_index_column_names is set
        out.append(int(item["index"] if isinstance(item, dict) else item))
    return out


def run_suites(df: Any, names: Sequence[str], bounds: suites_mod.Bounds,
               label_sets: dict[str, Sequence[str] | None], project_dir: Path) -> Outcome:
    """Validate the rows of `df` (features.extract) with the named suites."""
    import great_expectations as gx

    context = _context(project_dir)
    source = context.data_sources.add_pandas(name="peflow_samples")
    reasons: dict[int, list[str]] = {}
    summaries: list[dict[str, Any]] = []
    for name in names:
        kind = suites_mod.SUITE_KIND[name]
        rows = df[df["kind"] == kind]
        if rows.empty:
            continue
        asset = source.add_dataframe_asset(name=f"{name}_samples")
        batch = asset.add_batch_definition_whole_dataframe("all_rows")
        suite = context.suites.add(gx.ExpectationSuite(name=f"peflow_{name}"))
        for _, expectation in suites_mod.build(name, bounds, label_sets.get(kind)):
            suite.add_expectation(expectation)
        vd = context.validation_definitions.add(gx.ValidationDefinition(name=f"peflow_{name}", data=batch,
                                                                        suite=suite))
        checkpoint = context.checkpoints.add(gx.Checkpoint(
            name=f"peflow_{name}", validation_definitions=[vd],
            actions=[gx.checkpoint.UpdateDataDocsAction(name="data_docs")],
            result_format={"result_format": "COMPLETE"}))
        result = checkpoint.run(batch_parameters={"dataframe": rows})
        for validation in result.run_results.values():
            for er in validation.results:
                cfg = er.expectation_config
                reason = cfg.meta["reason"]
                if er.exception_info and er.exception_info.get("raised_exception"):
                    # a broken expectation is a bug here, not bad data: never quarantine silently
                    raise RuntimeError(f"suite {name}: {cfg.type} on {cfg.kwargs.get('column')} raised: "
                                       f"{er.exception_info.get('exception_message')}")
                failing = [] if er.success else _row_indices(er.result)
                for i in failing:
                    if reason not in reasons.setdefault(i, []):
                        reasons[i].append(reason)
                summaries.append({
                    "suite": name, "expectation": cfg.type, "reason": reason,
                    "column": cfg.kwargs.get("column") or f"{cfg.kwargs.get('column_A')},{cfg.kwargs.get('column_B')}",
                    "success": bool(er.success), "unexpected_count": len(failing),
                })
    docs = _build_docs(context, project_dir) if summaries else None
    return Outcome(reasons=reasons, expectations=summaries, docs_dir=docs)


def _build_docs(context: Any, project_dir: Path) -> Path:
    context.build_data_docs()
    site = project_dir / "gx" / "uncommitted" / "data_docs" / "local_site"
    if not (site / "index.html").is_file():
        raise RuntimeError(f"Great Expectations built no Data Docs at {site}")
    return site


def copy_docs(site: Path | None, dest: Path) -> None:
    """Copy the Data Docs site to `dest` (an empty folder when no suite ran)."""
    if site is None:
        dest.mkdir(parents=True, exist_ok=True)
        return
    shutil.copytree(site, dest)
