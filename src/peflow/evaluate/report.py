"""The evaluation report: one bar plot of the metrics in `metrics.json`."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path


def _split_label(split: str) -> str:
    return split.removeprefix("shift_")


def plot_metrics(metrics: Mapping[str, float], path: str | Path, *, title: str = "") -> Path:
    """Bar plot: zero-shot top-1/top-5 per split (chance as a line) and
    retrieval R@K per direction. Written without a timestamp, so the same
    metrics give the same PNG bytes."""
    from peflow.plots import pyplot, save

    plt = pyplot()

    splits = [k.split("/")[1] for k in metrics if k.startswith("zeroshot/") and k.endswith("/top1")
              and k.count("/") == 2]
    ret = [k for k in metrics if k.startswith("retrieval/") and k.split("/")[-1][1:].isdigit()]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [max(len(splits), 1) + 1,
                                                                                  max(len(ret), 1)]})
    ax = axes[0]
    xs = range(len(splits))
    w = 0.4
    for off, name in ((-w / 2, "top1"), (w / 2, "top5")):
        vals = [metrics.get(f"zeroshot/{s}/{name}", 0.0) for s in splits]
        bars = ax.bar([x + off for x in xs], vals, w, label=name)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    if "zeroshot/robustness_avg" in metrics:
        ax.bar([len(splits)], [metrics["zeroshot/robustness_avg"]], w, color="tab:green", label="robustness avg")
    if "zeroshot/chance_top1" in metrics:
        ax.axhline(metrics["zeroshot/chance_top1"], color="grey", ls="--", lw=1, label="chance top-1")
    ax.set_xticks(list(xs) + ([len(splits)] if "zeroshot/robustness_avg" in metrics else []))
    ax.set_xticklabels([_split_label(s) for s in splits] + (["avg"] if "zeroshot/robustness_avg" in metrics
                                                            else []), rotation=20)
    ax.set_ylim(0, 1.05)
    ax.set_title("zero-shot classification")
    ax.legend(fontsize=7)

    ax = axes[1]
    bars = ax.bar(range(len(ret)), [metrics[k] for k in ret],
                  color=["tab:blue" if "/i2t/" in k else "tab:orange" for k in ret])
    ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks(range(len(ret)))
    ax.set_xticklabels([k.removeprefix("retrieval/") for k in ret], rotation=30, fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_title("retrieval (test captions)")
    return save(fig, path, title=title)
