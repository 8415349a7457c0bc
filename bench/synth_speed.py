"""Benchmark: how fast `peflow synth` builds a corpus (default: the nano preset).

    python bench/synth_speed.py [--preset nano] [--workers N ...]

Prints images/s, videos/s, wall time and size on disk per split, and writes
the numbers to bench/results/synth_speed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from peflow.data.synth import presets
from peflow.data.synth.generate import generate, write_card

RESULTS = Path(__file__).resolve().parent / "results" / "synth_speed.json"


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def measure(preset: str, workers: int, seed: int = 0) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "corpus"
        start, t0 = time.perf_counter(), os.times()
        # the generator itself (synth.run adds only the card and manifest), for split image/video timings
        result = generate(out, presets.get(preset), seed=seed, workers=workers)
        wall, t1 = time.perf_counter() - start, os.times()
        write_card(out, presets.get(preset), seed, result)
        metrics = result["speed"]
        # CPU seconds of this process and its (joined) workers: stable on a busy machine, unlike wall time
        cpu = sum(getattr(t1, f) - getattr(t0, f) for f in ("user", "system", "children_user", "children_system"))
        card = json.loads((out / "card.json").read_text())
        sizes = {f"{kind}/{split}": _size(out / kind / split)
                 for kind in ("image", "video") for split in card["splits"][kind]}
    return {"preset": preset, "workers": workers, "wall_seconds": round(wall, 2), "cpu_seconds": round(cpu, 2),
            "load_average_1min": round(os.getloadavg()[0], 2), **metrics,
            "images": sum(card["splits"]["image"].values()), "videos": sum(card["splits"]["video"].values()),
            "bytes_per_split": sizes, "total_mb": round(sum(sizes.values()) / 2**20, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="nano")
    ap.add_argument("--workers", type=int, nargs="+", default=[os.cpu_count() or 1])
    args = ap.parse_args()
    console = Console(width=120)
    runs = [measure(args.preset, w) for w in args.workers]
    table = Table(title=f"peflow synth --preset {args.preset} ({os.cpu_count()} CPUs)")
    for col in ("workers", "images", "images/s", "videos", "videos/s", "wall s", "CPU s", "load", "MB"):
        table.add_column(col, justify="right")
    for r in runs:
        table.add_row(str(r["workers"]), str(r["images"]), f"{r['images_per_s']:.0f}", str(r["videos"]),
                      f"{r['videos_per_s']:.1f}", f"{r['wall_seconds']:.1f}", f"{r['cpu_seconds']:.1f}",
                      f"{r['load_average_1min']:.1f}", f"{r['total_mb']:.1f}")
    console.print(table)
    sizes = Table(title="size on disk per split (last run)")
    sizes.add_column("split")
    sizes.add_column("MB", justify="right")
    for split, n in runs[-1]["bytes_per_split"].items():
        sizes.add_row(split, f"{n / 2**20:.2f}")
    console.print(sizes)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                               "platform": platform.platform()}, "runs": runs}, indent=2) + "\n")
    console.print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
