"""Matplotlib plumbing shared by every plot peflow writes (loss curves, metric
bars, layer plots, run comparisons): the file-only Agg backend, and one way to
save a figure."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def pyplot() -> Any:
    """`matplotlib.pyplot` on the Agg backend (no display on servers and training workers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig: Any, path: str | Path, *, title: str = "") -> Path:
    """Write `fig` as a PNG to `path` and close it: optional suptitle, tight layout, no
    timestamp in the file (the same figure gives the same bytes); returns the path."""
    import matplotlib.pyplot as plt

    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(fig)
    return path
