"""What a longer run buys: the recipes at several budgets, robustness against training time.

    python bench/cost_curve.py --data CORPUS --root /tmp/cost                 # 1500, 3000, 12000 steps
    python bench/cost_curve.py --data CORPUS --root /tmp/cost --steps 1500,3000
    python bench/cost_curve.py --data CORPUS --root /tmp/cost --pairs vanilla@12000,pe@1500

Each (recipe, steps) pair is a `bench/recipe_sweep.py` variant over the preset's pretrain config
(trained through TorchX, evaluated through the stage runner; a pair already made is reused from
ROOT or the output store). On 2 idle cores the nano model takes 0.14-0.16 s a step with 2 processes
(vanilla, at one resolution, 0.16; the PE recipes' progressive resolution less), so 1500, 3000 and 12000
steps are about 4, 8 and 30 minutes of training. Writes
bench/results/cost_curve.json and the plot docs/img/cost_curve.png: shape top-1 on atypical
colours and the robustness average against the measured training minutes, a line per recipe.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import recipe_sweep  # noqa: E402  (the bench folder)

RESULTS = Path(__file__).resolve().parent / "results" / "cost_curve.json"
PLOT = Path(__file__).resolve().parents[1] / "docs" / "img" / "cost_curve.png"
PANELS = (("zeroshot/test/top1_atypical_colour", "shape top-1, atypical colour"),
          ("zeroshot/robustness_avg", "robustness average"), ("retrieval/i2t/R1", "i2t R@1"))


def plot(rows: dict[str, Any], path: Path) -> Path:
    from peflow.plots import pyplot, save

    plt = pyplot()
    fig, axes = plt.subplots(1, len(PANELS), figsize=(4.2 * len(PANELS), 3.6))
    for ax, (key, title) in zip(axes, PANELS):
        for recipe in dict.fromkeys(r["recipe"] for r in rows.values()):
            points = sorted((r["train_s"] / 60, r[key]) for r in rows.values()
                            if r["recipe"] == recipe and r.get(key) is not None and r.get("train_s"))
            ax.plot([x for x, _ in points], [y for _, y in points], "o-", label=recipe)
        ax.set_xlabel("training minutes (2 cores)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    return save(fig, path)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, help="validated corpus folder")
    ap.add_argument("--root", required=True, help="folder for the runs' outputs")
    ap.add_argument("--preset", default="nano")
    ap.add_argument("--nodes", default="2x1")
    ap.add_argument("--steps", default="1500,3000,12000", help="comma-separated step budgets")
    ap.add_argument("--recipes", default="vanilla,pe,pe-adamw")
    ap.add_argument("--pairs", help="comma-separated RECIPE@STEPS, in place of every recipe at every budget")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--plot", default=str(PLOT))
    args = ap.parse_args(argv)

    pairs = ([tuple(p.strip().split("@", 1)) for p in args.pairs.split(",")] if args.pairs else
             [(recipe, steps) for steps in args.steps.split(",") for recipe in args.recipes.split(",")])
    if any(len(p) != 2 or not p[1].isdigit() for p in pairs):
        raise SystemExit(f"--pairs {args.pairs!r}: each pair is RECIPE@STEPS")
    variants = [f"{recipe}-{steps}:recipe={recipe},steps={steps}" for recipe, steps in pairs]
    report = recipe_sweep.main(["--data", args.data, "--root", args.root, "--preset", args.preset,
                                "--nodes", args.nodes, "--out", args.out,
                                *(x for v in variants for x in ("--variant", v))])
    rows = {name: {**r, "recipe": r["fields"]["recipe"], "steps": int(r["fields"]["steps"])}
            for name, r in report["variants"].items()}
    report["variants"] = rows
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"plot: {plot(rows, Path(args.plot))}")
    return report


if __name__ == "__main__":
    main()
