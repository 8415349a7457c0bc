"""`make demo`: run the stage graph on the built-in corpus under DVC, push the
datasets to the DVC remote, and show what each stage made.

`python -m peflow.demo [--root DIR]` (DIR: the DVC project, default the repo).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from peflow import io, pipeline, stages

console = Console()


def _dvc(root: Path, *args: str) -> None:
    exe = shutil.which("dvc") or str(Path(sys.executable).with_name("dvc"))
    console.print(f"[bold]$ dvc {' '.join(args)}[/]")
    subprocess.run([exe, *args], cwd=root, check=True)


def summary(root: Path) -> Table:
    table = Table(title="peflow demo: what each stage made")
    for col in ("stage", "output", "counts", "metrics"):
        table.add_column(col, overflow="fold")
    for s in stages.STAGES:
        out = pipeline.stage_dir(root / pipeline.DATA_ROOT, s.name)
        mpath = out / io.MANIFEST
        if not mpath.is_file():
            table.add_row(s.name, "(not run)", "", "")
            continue
        m = io.read_json(mpath)
        counts = ", ".join(f"{k}={v}" for k, v in m.get("counts", {}).items())
        metrics = ""
        if (out / io.METRICS).is_file():
            metrics = ", ".join(f"{k}={v:.3g}" for k, v in json.loads((out / io.METRICS).read_text()).items())
        table.add_row(s.name, str(out.relative_to(root)), counts, metrics)
    return table


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m peflow.demo", description=__doc__)
    p.add_argument("--root", default=".", help="the DVC project (default: current folder)")
    a = p.parse_args(argv)
    root = Path(a.root).resolve()
    t0 = time.monotonic()
    try:
        _dvc(root, "repro")
        _dvc(root, "push")
    except subprocess.CalledProcessError as e:
        console.print(f"[red]demo failed: {' '.join(map(str, e.cmd))} exited {e.returncode}[/]")
        return 1
    except KeyboardInterrupt:
        console.print("[yellow]interrupted: stage outputs are written atomically, nothing half-written[/]")
        return 130
    console.print(summary(root))
    card = root / pipeline.DATA_ROOT / "synth" / "card.md"
    if card.is_file():
        console.print(f"dataset card: {card.relative_to(root)}")
    console.print(f"demo finished in {time.monotonic() - t0:.0f}s; datasets are tracked in dvc.lock and "
                  f"pushed to the DVC remote ({root / '.dvc' / 'config'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
