"""From per-row reasons to the stage's outputs: the quarantine list, the report
and the clean copy of the corpus.

The clean copy has the canonical corpus layout (`<kind>/<split>/shard-*.tar`
and `card.json`), whatever layout the input has (`peflow.data.formats`: a flat
folder of shards, split folders, a splits.json manifest), so downstream stages
read it exactly like a corpus: every passed sample's entries are copied byte
for byte, in input order, re-sharded with the input's shard size (the card's
`shard_size`, else the most samples an input shard of that kind holds) by the
byte-deterministic shard writer (same input and options => same shard bytes).
An input without card.json gets a card with its name, splits and shard counts.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from peflow.validation.shards import KINDS
from peflow.validation.suites import REASONS

#: top-level files the stage writes itself (or drops: card.md would show stale counts); a validated
#: corpus given as input has them too
REWRITTEN = {"image", "video", "card.json", "card.md", "manifest.json", "metrics.json", "report.json",
             "quarantine.jsonl", "data_docs", "splits.json"}
DEFAULT_SHARD_SIZE = {"image": 1000, "video": 100}


def ordered(reasons: Iterable[str]) -> list[str]:
    """Reasons in the documented order (REASONS), repeats dropped."""
    order = list(REASONS)
    return sorted(set(reasons), key=lambda r: order.index(r) if r in order else len(order))


def quarantine_records(df: Any, reasons: Mapping[int, list[str]]) -> list[dict[str, Any]]:
    """One record per failing row, in corpus order: where it is, why, and any error text."""
    records = []
    for i in sorted(reasons):
        row = df.loc[i]
        details = {c: row[c] for c in ("decode_error", "aux_error") if isinstance(row[c], str)}
        records.append({"kind": row["kind"], "split": row["split"], "shard": row["shard"],
                        "position": int(row["position"]), "key": row["key"], "reasons": ordered(reasons[i]),
                        **({"details": details} if details else {})})
    return records


def _rates(total: int, bad: int) -> dict[str, Any]:
    return {"total": total, "passed": total - bad, "quarantined": bad,
            "failure_rate": bad / total if total else 0.0}


def build_report(df: Any, reasons: Mapping[int, list[str]], *, data: str, data_digest: str,
                 suites: list[str], max_failure_rate: float, bounds: Mapping[str, Any],
                 expectations: list[dict[str, Any]]) -> dict[str, Any]:
    """report.json: totals, counts per reason, per kind and per kind/split, the threshold and the verdict."""
    failed = df.index.isin(list(reasons))
    per_reason = Counter(r for rs in reasons.values() for r in rs)
    report: dict[str, Any] = {"data": data, "data_digest": data_digest, "suites": suites,
                              **_rates(len(df), int(failed.sum()))}
    report["max_failure_rate"] = max_failure_rate
    report["accepted"] = report["failure_rate"] <= max_failure_rate
    report["reasons"] = dict(sorted(per_reason.items(), key=lambda kv: (-kv[1], kv[0])))
    report["reason_descriptions"] = {r: REASONS[r] for r in report["reasons"] if r in REASONS}
    for group, cols in (("by_kind", ["kind"]), ("by_split", ["kind", "split"])):
        report[group] = {}
        for key, part in df.groupby(cols, sort=True):
            key = key if isinstance(key, tuple) else (key,)
            report[group]["/".join(key)] = _rates(len(part), int(part.index.isin(list(reasons)).sum()))
    report["bounds"] = dict(bounds)
    report["expectations"] = expectations
    return report


def top_reasons(report: Mapping[str, Any], n: int = 5) -> str:
    """'caption_missing 12, media_undecodable 3' (most frequent first)."""
    items = list(report["reasons"].items())[:n]
    return ", ".join(f"{r} {c}" for r, c in items) or "none"


def write_quarantine(path: Path, records: list[dict[str, Any]]) -> None:
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n")


def _input_shard_sizes(df: Any) -> dict[str, int]:
    """kind -> the most samples one input shard of that kind holds."""
    rows = df[df["key"].notna()]
    return {kind: int(n) for kind, n in rows.groupby(["kind", "shard"]).size().groupby(level=0).max().items()}


def write_clean_copy(src: Path, dst: Path, df: Any, reasons: Mapping[int, list[str]],
                     card: Mapping[str, Any] | None) -> dict[str, dict[str, int]]:
    """Write the passed samples of `src` into `dst` in the canonical layout; returns passed counts per kind/split.

    Kinds without rows in `df` (no selected suite covers them) are copied unchanged (outside the
    canonical layout: each split's shards, byte for byte, as `<kind>/<split>/shard-NNNNNN.tar`)."""
    from peflow.data.formats import corpus_layout, find_corpus
    from peflow.data.synth.writers import ShardWriter
    from peflow.validation.shards import iter_raw

    sizes = {**DEFAULT_SHARD_SIZE, **_input_shard_sizes(df), **((card or {}).get("shard_size") or {})}
    ok = df[~df.index.isin(list(reasons)) & (df["readable"] == True)]  # noqa: E712 (object column)
    keep = set(zip(ok["shard"], ok["position"].astype(int)))
    counts: dict[str, dict[str, int]] = {}
    shards: dict[str, dict[str, int]] = {}
    for (kind, split), part in df.groupby(["kind", "split"], sort=True):
        n = 0
        with ShardWriter(dst / kind / split, int(sizes.get(kind, DEFAULT_SHARD_SIZE[kind]))) as writer:
            for rel in dict.fromkeys(part["shard"]):
                for position, (raw, _) in enumerate(iter_raw(str(src / rel), check=False)):
                    if raw is not None and (rel, position) in keep:
                        writer.write(raw["__key__"], {k: v for k, v in raw.items() if not k.startswith("__")})
                        n += 1
        counts.setdefault(kind, {})[split] = n
        shards.setdefault(kind, {})[split] = len(writer.shards)
    layout = corpus_layout(src)
    found = find_corpus(src)
    if layout != "canonical":
        for kind in (k for k in found if k not in counts):
            for split, paths in found[kind].items():
                (dst / kind / split).mkdir(parents=True)
                for i, path in enumerate(paths):
                    shutil.copyfile(path, dst / kind / split / f"shard-{i:06d}.tar")
                shards.setdefault(kind, {})[split] = len(paths)
    _write_card(src, dst, card, counts, shards)
    if layout == "canonical":
        _copy_other(src, dst, set(counts))
    else:
        _copy_other(src, dst, set(KINDS), [Path(p) for splits in found.values() for ps in splits.values() for p in ps])
    return counts


def _write_card(src: Path, dst: Path, card: Mapping[str, Any] | None, counts: dict[str, dict[str, int]],
                shards: dict[str, dict[str, int]]) -> None:
    out = dict(card or {"name": src.name})
    out["splits"] = {**(out.get("splits") or {}), **counts}
    out["shards"] = {**(out.get("shards") or {}), **shards}
    out["validated"] = {"source_splits": (card or {}).get("splits"), "report": "report.json",
                        "quarantine": "quarantine.jsonl"}
    (dst / "card.json").write_text(json.dumps(out, indent=2, sort_keys=True) + "\n")


def _copy_other(src: Path, dst: Path, validated: set[str], shards: Iterable[Path] = ()) -> None:
    """Anything else in the corpus folder (not validated here) is carried over unchanged.

    `shards` (outside the canonical layout: every input shard) are not: the clean copy holds
    their samples. Nor are folders holding them, nor per-shard sidecar files beside them
    (img2dataset's `<shard>.parquet` and `<shard>_stats.json` describe the input shards)."""
    shards = [Path(os.path.abspath(p)) for p in shards]
    src_abs = Path(os.path.abspath(src))
    holders = {src_abs / p.relative_to(src_abs).parts[0] for p in shards}
    stems = {p.name.removesuffix(".tar") for p in shards if p.parent == src_abs}
    for p in sorted(src.iterdir()):
        if p.name in REWRITTEN - (set(KINDS) - validated) or p.name.startswith("."):
            continue
        if shards and (Path(os.path.abspath(p)) in holders or p.suffix == ".tar"
                       or any(p.name.startswith((f"{s}.", f"{s}_")) for s in stems)):
            continue
        if p.is_dir():
            shutil.copytree(p, dst / p.name)
        else:
            shutil.copy2(p, dst / p.name)
