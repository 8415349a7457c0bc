"""Sweep: pretraining recipes at one budget, each trained and evaluated the way the pipeline does.

    python bench/recipe_sweep.py --data CORPUS --root /tmp/sweep            # the default variants
    python bench/recipe_sweep.py --data CORPUS --root /tmp/sweep \\
        --variant vanilla:recipe=vanilla --variant pe-lr1e-2:lr=0.01,crop_scale_min=0.8

CORPUS is a validated corpus (`peflow validate` output). Each variant is NAME:field=value,...
over the preset's pretrain config (fields as `peflow pretrain --help` lists them, with
underscores). For each: `peflow launch pretrain -j NODES` (torchrun processes through TorchX,
as the pipeline launches it), then `peflow evaluate` on the clean test and shift splits
(retrieval, zero-shot, the cls probe; no video, tracking or dense probes). Both go through the
stage runner: an unchanged variant is reused from ROOT or the output store. Prints one table
(shape top-1, atypical-colour shape, robustness average, i2t R@1, best cls-probe layer vs the
last, train seconds) and writes bench/results/recipe_sweep.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results" / "recipe_sweep.json"
DEFAULT_VARIANTS = (
    "vanilla:recipe=vanilla",
    "pe:recipe=pe",
    "pe-lr4e-3:recipe=pe,lr=0.004",
    "pe-lr1e-2:recipe=pe,lr=0.01",
)
COLUMNS = (("shape top-1", "zeroshot/test/top1"), ("atypical colour", "zeroshot/test/top1_atypical_colour"),
           ("robustness avg", "zeroshot/robustness_avg"), ("i2t R@1", "retrieval/i2t/R1"),
           ("colour top-1", "zeroshot_colour/test/top1"))


def parse_variant(spec: str) -> tuple[str, dict[str, str]]:
    name, _, body = spec.partition(":")
    fields = {}
    for part in (p for p in body.split(",") if p.strip()):
        key, eq, value = part.partition("=")
        if not eq:
            raise SystemExit(f"variant {spec!r}: {part!r} is not field=value")
        fields[key.strip()] = value.strip()
    if not name:
        raise SystemExit(f"variant {spec!r}: no name")
    return name, fields


def flags(fields: dict[str, str]) -> list[str]:
    out = []
    for key, value in fields.items():
        flag = "--" + key.replace("_", "-")
        out += [flag if value == "true" else f"--no-{flag[2:]}"] if value in ("true", "false") else [flag, value]
    return out


def run(cmd: list[str]) -> float:
    t = time.perf_counter()
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, help="validated corpus folder")
    ap.add_argument("--root", required=True, help="folder for the variants' outputs (ROOT/NAME/{pretrain,evaluate})")
    ap.add_argument("--preset", default="nano")
    ap.add_argument("--nodes", default="2x1", help="TorchX -j of the pretraining runs")
    ap.add_argument("--variant", action="append", help="NAME:field=value,... (repeatable; default: "
                                                        + " ".join(DEFAULT_VARIANTS) + ")")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)

    peflow = [sys.executable, "-m", "peflow.cli"]
    rows: dict[str, Any] = {}
    for spec in args.variant or DEFAULT_VARIANTS:
        name, fields = parse_variant(spec)
        root = Path(args.root) / name
        pt, ev = root / "pretrain", root / "evaluate"
        wall = run([*peflow, "launch", "pretrain", "-j", args.nodes, "--", "--preset", args.preset,
                    "--data", args.data, "--out", str(pt), "--no-log-model", "--no-progress", *flags(fields)])
        run([*peflow, "evaluate", "--preset", args.preset, "--checkpoint", str(pt), "--data", args.data,
             "--out", str(ev), "--no-video", "--no-tracking", "--probe-tasks", "cls"])
        m = json.loads((ev / "metrics.json").read_text())
        m = m.get("metrics", m)
        train = json.loads((pt / "metrics.json").read_text())
        train = train.get("metrics", train)
        rows[name] = {"fields": fields, "pretrain_wall_s": wall, "train_s": train.get("train/seconds"),
                      **{key: m.get(key) for _, key in COLUMNS},
                      "probe/cls/best_layer": m.get("probe/cls/best_layer"), "probe/cls/best": m.get("probe/cls/best"),
                      "probe/cls/last": m.get("probe/cls/last")}
    head = ["variant", *(c for c, _ in COLUMNS), "cls probe best layer (best / last)", "train s"]
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for name, r in rows.items():
        cells = [f"{100 * r[k]:.1f}%" if r[k] is not None else "-" for _, k in COLUMNS]
        probe = (f"{int(r['probe/cls/best_layer'])} ({r['probe/cls/best']:.3f} / {r['probe/cls/last']:.3f})"
                 if r["probe/cls/best"] is not None else "-")
        seconds = r["train_s"] if r["train_s"] is not None else r["pretrain_wall_s"]  # a reused run: its own time
        print(f"| {name} | " + " | ".join(cells) + f" | {probe} | {seconds:.0f} |")
    # the corpus folder's name only: no path of this machine in a committed result
    report = {"preset": args.preset, "nodes": args.nodes, "data": Path(args.data).name,
              "load_avg": os.getloadavg(), "variants": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"-> {out}")
    return report


if __name__ == "__main__":
    main()
