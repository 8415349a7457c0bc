"""Validate a corpus with Great Expectations suites; quarantine bad samples.

Every sample of the corpus becomes a row of features (does the media decode,
its resolution, frame count and duration, caption present / length / UTF-8,
unique key, label in the card's label set, ...); the selected suites judge
the rows, and each failing row is quarantined with its reasons
(docs/validation.md).

Outputs (OUT is laid out like the input corpus, so the next stage reads it
as one):
  OUT/<kind>/<split>/shard-*.tar  the passed samples, bytes unchanged, re-sharded
  OUT/card.json                   the input card with the passed counts
  OUT/report.json                 totals, counts per reason, per kind and split
  OUT/quarantine.jsonl            one line per quarantined sample: shard, key, reasons
  OUT/data_docs/index.html        the Great Expectations Data Docs site
  OUT/metrics.json, OUT/manifest.json

Above `max_failure_rate` nothing is published at OUT: the report, the
quarantine list and the Data Docs go to `OUT.rejected/` and the stage fails
with the rate and the top reasons.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peflow.config import InputError, opt
from peflow.stages.base import Result


@dataclass(kw_only=True)
class Config:
    """Options of `peflow validate`."""

    data: str = opt("", "Corpus folder to validate (a `peflow synth` output or the same layout).")
    out: str = opt("", "Output folder: the clean corpus, report.json, quarantine.jsonl, data_docs/.")
    max_failure_rate: float = opt(0.05, "Fail (publish nothing) when more than this fraction of samples "
                                        "is quarantined.", min=0.0)
    suites: str = opt("image,video", "Comma-separated suites: image, video, captions (generated "
                                     "model_caption on videos). Kinds no suite covers are copied unvalidated.")
    min_side: int = opt(16, "Smallest accepted image / frame width and height, pixels.")
    max_side: int = opt(4096, "Largest accepted image / frame width and height, pixels.")
    min_frames: int = opt(2, "Fewest accepted decoded frames per video.")
    max_frames: int = opt(4096, "Most accepted decoded frames per video.")
    min_duration: float = opt(0.1, "Shortest accepted video, seconds.")
    max_duration: float = opt(600.0, "Longest accepted video, seconds.")
    min_caption_chars: int = opt(5, "Shortest accepted caption (and model_caption), characters.")
    max_caption_chars: int = opt(2000, "Longest accepted caption (and model_caption), characters.")
    min_caption_words: int = opt(3, "Fewest accepted words in a generated caption (captions suite).", min=0)
    max_caption_words: int = opt(300, "Most accepted words in a generated caption (captions suite).", min=0)
    max_caption_repeats: int = opt(3, "Most back-to-back repeats of a word or phrase in a generated caption "
                                      "(captions suite; more is a generation loop).", min=1)
    workers: int = opt(1, "Processes reading shards (features are extracted per shard).", min=1, key=False)

    def validate(self) -> None:
        from peflow.validation.suites import parse

        if not 0.0 <= self.max_failure_rate <= 1.0:
            raise ValueError(f"max_failure_rate must be in [0, 1], got {self.max_failure_rate}")
        parse(self.suites)
        self.bounds()

    def bounds(self) -> Any:  # -> peflow.validation.suites.Bounds
        from peflow.validation.suites import Bounds

        b = Bounds(**{f.name: getattr(self, f.name) for f in dataclasses.fields(Bounds)})
        b.check()
        return b


def rejected_dir(out: str | Path) -> Path:
    """Where the report goes when the corpus fails the threshold: `OUT.rejected`."""
    out = Path(out)
    return out.with_name(out.name + ".rejected")


def _check(cfg: Config) -> list[str]:
    from peflow.validation.suites import SUITE_KIND, parse

    names = parse(cfg.suites)  # the values are checked by the runner (Config.validate); these need the disk
    data = Path(cfg.data)
    if not data.is_dir():
        raise ValueError(f"data folder {cfg.data!r} does not exist")
    if Path(cfg.out).resolve() == data.resolve():
        raise ValueError(f"out must differ from data ({cfg.out!r})")
    kinds = sorted({SUITE_KIND[s] for s in names})
    from peflow.data.formats import find_corpus

    try:
        find_corpus(data, kinds)  # any layout peflow.data.formats resolves; the output is canonical
    except FileNotFoundError as e:
        raise ValueError(f"suites {names}: {e}") from None
    return names


def _label_sets(card: dict[str, Any] | None) -> dict[str, list[str] | None]:
    card = card or {}
    return {"image": card.get("categories"), "video": card.get("actions")}


def _metrics(report: dict[str, Any], seconds: float) -> dict[str, float]:
    m = {f"validate/{k}": report[k] for k in ("total", "passed", "quarantined", "failure_rate")}
    m.update({f"validate/reason/{r}": n for r, n in report["reasons"].items()})
    m["validate/seconds"] = round(seconds, 3)
    return m


def _write_findings(dest: Path, report: dict[str, Any], records: list[dict[str, Any]], docs: Path | None) -> None:
    from peflow.io import write_json_atomic
    from peflow.validation.clean import write_quarantine
    from peflow.validation.gx_run import copy_docs

    write_json_atomic(dest / "report.json", report)
    write_quarantine(dest / "quarantine.jsonl", records)
    copy_docs(docs, dest / "data_docs")


def _log(folder: Path, metrics: dict[str, float]) -> None:
    """A rejected corpus's findings, logged to the stage run the runner opened (it fails next)."""
    import mlflow

    mlflow.log_metrics(metrics)
    for name in ("report.json", "quarantine.jsonl"):
        mlflow.log_artifact(str(folder / name))
    mlflow.log_artifacts(str(folder / "data_docs"), artifact_path="data_docs")


def run(cfg: Config, out: Path) -> Result:
    """Validate `cfg.data`; write the clean corpus and the report into `out` (the staging folder)."""
    from peflow.data.formats import find_corpus
    from peflow.io import atomic_output_dir, dataset_digest, read_json
    from peflow.validation import clean, features, gx_run
    from peflow.validation.suites import SUITE_KIND

    names, bounds = _check(cfg), cfg.bounds()
    data = Path(cfg.data)
    card = read_json(data / "card.json") if (data / "card.json").is_file() else None
    label_sets = _label_sets(card)
    digest = dataset_digest(data)
    t0 = time.perf_counter()
    kinds = sorted({SUITE_KIND[s] for s in names})
    df = features.extract(data, label_sets, kinds=kinds, workers=cfg.workers)
    with tempfile.TemporaryDirectory(prefix="peflow-gx-") as scratch:
        outcome = gx_run.run_suites(df, names, bounds, label_sets, Path(scratch))
        report = clean.build_report(df, outcome.reasons, data=str(data), data_digest=digest, suites=names,
                                    max_failure_rate=cfg.max_failure_rate, bounds=dataclasses.asdict(bounds),
                                    expectations=outcome.expectations)
        report["unvalidated"] = [k for k in find_corpus(data) if k not in kinds]
        records = clean.quarantine_records(df, outcome.reasons)
        if not report["accepted"]:
            rejected = rejected_dir(cfg.out)
            with atomic_output_dir(rejected) as stage:
                _write_findings(stage, report, records, outcome.docs_dir)
            _log(rejected, _metrics(report, time.perf_counter() - t0))
            raise InputError(
                f"{report['failure_rate']:.1%} of samples failed validation ({report['quarantined']} of "
                f"{report['total']}), above max_failure_rate {cfg.max_failure_rate:.1%}; top reasons: "
                f"{clean.top_reasons(report)}. Nothing was published at {cfg.out}; report: "
                f"{rejected / 'report.json'} (quarantine.jsonl and data_docs/ beside it)")
        passed = clean.write_clean_copy(data, out, df, outcome.reasons, card)
        _write_findings(out, report, records, outcome.docs_dir)
    shutil.rmtree(rejected_dir(cfg.out), ignore_errors=True)  # a stale rejection no longer applies
    counts = {"total": report["total"], "passed": report["passed"], "quarantined": report["quarantined"],
              **{f"{k}/{s}": n for k, splits in passed.items() for s, n in splits.items()}}
    print(f"validate: {report['passed']} of {report['total']} samples passed, {report['quarantined']} quarantined "
          f"({report['failure_rate']:.2%}; {clean.top_reasons(report)}) -> {cfg.out}")
    return Result(metrics=_metrics(report, time.perf_counter() - t0), counts=counts,
                  artifacts=("report.json", "quarantine.jsonl", "data_docs"))
