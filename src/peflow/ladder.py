"""The paper's ablation ladder (Tab. 26): vanilla CLIP to the full PE-core recipe, one step at a time.

Each step adds one piece to the step before it, so step k is the baseline
plus the first k-1 changes, and the last step is the paper's PE recipe (LAMB)
at the run's budget: for a run of `pe` itself the same pretrain config, so its
output is the main run's, reused. At a
run's budget the steps map onto its pretrain config as the paper's do onto
its L/14 run:

1. baseline: vanilla CLIP (AdamW), one resolution, the CLS token, absolute
   position embedding only, half the run's batch;
2. + progressive resolution: the run's resolution schedule scaled by 2/3
   (the paper's 224 px final stage before its 336 px one), ending where the
   baseline trained;
3. + larger batch: the run's batch (twice the samples seen, as 32K -> 64K);
4. + LAMB (the run's lr; the paper's 4x lr step assumes its 443K-step budget);
5. + high-resolution stage: the run's own schedule (its last stage above
   step 2's);
6. + 2D RoPE; 7. + attention pooling (CLS kept as an input);
8. + augmentation (the run's crops, colour jitter, flips);
9. + mask regularization: the PE recipe, `pe`.

Each step is evaluated at the size it trained at last. Plain data and
stdlib only: the DAG reads the step names at parse time.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from peflow.train.recipe import parse_resolutions  # stdlib only


@dataclasses.dataclass(frozen=True)
class Step:
    """One step of the ladder, with the paper's numbers for it at L/14: Tab. 26's ImageNet val and
    robustness average (6 sets), Fig. 9's best COCO-probe layer (research/perception-encoder.md 2.1)."""

    name: str  #: MLflow-safe: the member of the `ladder` variant, OUT/ladder/<name>/
    label: str
    in_val: float
    robustness_avg: float
    best_layer: int  #: of 24 (COCO detection probe, Fig. 9)
    zflops: float  #: training compute (Fig. 2)


STEPS: tuple[Step, ...] = (
    Step("baseline", "1 baseline (vanilla CLIP)", 78.9, 75.3, 14, 1.0),
    Step("progressive", "2 + progressive resolution", 78.9, 75.1, 16, 0.5),
    Step("batch", "3 + larger batch", 79.5, 76.2, 16, 1.1),
    Step("lamb", "4 + LAMB", 79.9, 76.9, 16, 1.1),
    Step("highres", "5 + high-resolution stage", 80.4, 78.3, 16, 1.2),
    Step("rope", "6 + 2D RoPE", 80.7, 79.2, 16, 1.2),
    Step("attnpool", "7 + attention pooling", 81.0, 80.1, 18, 1.2),
    Step("augment", "8 + augmentation", 81.1, 80.8, 18, 1.2),
    Step("maskreg", "9 + mask regularization", 81.3, 80.9, 18, 1.2),
)
NAMES = tuple(s.name for s in STEPS)
PAPER_LAYERS = 24  #: depth of the paper's ladder model (L/14)


def step(name: str) -> Step:
    for s in STEPS:
        if s.name == name:
            return s
    raise ValueError(f"unknown ladder step {name!r}; known: {list(NAMES)}")


def _spec(stages: list[tuple[int, float]]) -> str:
    return ",".join(f"{r}:{f:g}" for r, f in stages)


def scaled(spec: str, factor: float, patch: int) -> str:
    """A resolution schedule with each size scaled and rounded to the patch grid (at least 2 patches);
    stages that land on the same size merge."""
    merged: dict[int, float] = {}
    for res, frac in parse_resolutions(spec):
        size = max(2 * patch, round(res * factor / patch) * patch)
        merged[size] = merged.get(size, 0.0) + frac
    return _spec(sorted(merged.items()))


def pretrain_changes(name: str, main: Any, patch: int, native: int) -> dict[str, Any]:
    """The pretrain config changes of ladder step `name`, given the run's own pretrain config `main`
    (its PE recipe, batch, resolutions) and the model's patch and native size."""
    k = NAMES.index(step(name).name) + 1
    full = main.resolutions.strip() or f"{native}:1"
    low = scaled(full, 2 / 3, patch)
    pieces = [p for p, first in (("progressive", 2), ("lamb", 4), ("augment", 8), ("mask_reg", 9)) if k >= first]
    changes: dict[str, Any] = {
        "recipe": "pe" if len(pieces) == 4 else "+".join(["vanilla", *pieces]),
        "global_batch": main.global_batch if k >= 3 else max(1, main.global_batch // 2),
        "resolutions": full if k >= 5 else (low if k >= 2 else f"{parse_resolutions(low)[-1][0]}:1"),
        "rope": k >= 6,
        "pool": "attn" if k >= 7 else "cls",
    }
    if k < 9:
        changes["mask_reg_fraction"] = None
    return changes


#: evaluate, for every step: zero-shot, retrieval and the cls layer probes (no dense, video or tracking:
#: the ladder compares image pretraining recipes)
EVALUATE_CHANGES: Mapping[str, Any] = {"probe_tasks": "cls", "video": False, "tracking": False}


#: the ladder table's own columns: (header, stage-prefixed metric of the step's evaluate or pretrain)
COLUMNS = (
    ("shape top-1", "evaluate/zeroshot/test/top1"),
    ("robustness avg", "evaluate/zeroshot/robustness_avg"),
    ("shape, atypical colour", "evaluate/zeroshot/test/top1_atypical_colour"),
    ("i2t R@1", "evaluate/retrieval/i2t/R1"),
)
PAPER_COLUMNS = ("paper: IN val", "paper: robustness avg", "paper: best layer / 24", "paper: ZFLOPs")
HEADER = ("step", *(c for c, _ in COLUMNS), "cls probe: best layer (score) / last", "train TFLOP",
          *PAPER_COLUMNS)


def _num(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table(values: Mapping[str, Mapping[str, float]]) -> list[list[str]]:
    """The ladder as table rows (`HEADER`), a row per step that has metrics: ours from `values` (step name ->
    stage-prefixed metrics, as the run report and `peflow compare` hold them), the paper's beside them."""
    rows = []
    for s in STEPS:
        m = values.get(s.name)
        if not m:
            continue
        best = m.get("evaluate/probe/cls/best_layer")
        probe = "-" if best is None else (f"{best:.0f} ({_num(m.get('evaluate/probe/cls/best'))}) / "
                                          f"{_num(m.get('evaluate/probe/cls/last'))}")
        seconds, rate = m.get("pretrain/train/seconds"), m.get("pretrain/train/model_flops_per_s")
        flop = None if seconds is None or rate is None else seconds * rate / 1e12
        rows.append([s.label, *(_num(m.get(k)) for _, k in COLUMNS), probe, _num(flop, 1),
                     f"{s.in_val:.1f}", f"{s.robustness_avg:.1f}", str(s.best_layer), f"{s.zflops:.1f}"])
    return rows
