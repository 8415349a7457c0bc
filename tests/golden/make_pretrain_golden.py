"""Golden per-step losses of short fixed-seed pretraining runs (tests/golden/pretrain_losses.json).

Regenerate (only when a change of the numbers is intended, and say why in the commit):

    .venv/bin/python tests/golden/make_pretrain_golden.py

Each case trains the `test` model preset on the `test` synthetic corpus (seed 0) for a few
steps in one process with one torch thread, through `peflow.train.loop.train`; the per-step
loss terms, learning rate, logit scale and resolution are what a refactor of the training
loop must leave unchanged. `tests/unit/test_trainer.py` re-runs the cases and compares.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

GOLDEN = Path(__file__).with_name("pretrain_losses.json")
COMMAND = ".venv/bin/python tests/golden/make_pretrain_golden.py"
#: The history columns recorded per step (timings are not deterministic and are left out).
KEYS = ("loss", "clip_loss", "mask_reg_loss", "lr", "logit_scale", "resolution")

#: name -> (recipe, steps, global_batch, micro_batch, resolutions, checkpoint_every)
CASES: dict[str, dict[str, Any]] = {
    # full PE recipe: LAMB, augmentation, mask regularization, progressive resolution and
    # gradient accumulation over two micro-batches of 8
    "pe": dict(recipe="pe", steps=6, global_batch=16, micro_batch=8, resolutions=[(16, 0.5), (32, 0.5)],
               checkpoint_every=3),
    # the CLIP baseline: AdamW, no augmentation, no mask regularization, one resolution
    "vanilla": dict(recipe="vanilla", steps=6, global_batch=16, micro_batch=0, resolutions=[(32, 1.0)],
                    checkpoint_every=3),
}


def make_corpus(out: Path) -> Path:
    """The `test` synthetic corpus (seed 0, one worker) under `out`."""
    from peflow import runner
    from peflow.stages import synth

    return Path(runner.execute("synth", synth.Config(out=str(out / "synth"), corpus="test", seed=0, workers=1)).out)


def plan_for(case: str, corpus: Path, ckpt_dir: Path) -> Any:
    """The TrainPlan of golden case `case` (a fixed seed, the `test` model preset)."""
    from peflow.train.loop import TrainPlan
    from peflow.train.recipe import get_recipe

    c = CASES[case]
    recipe = get_recipe(c["recipe"])
    return TrainPlan(data=corpus, ckpt_dir=ckpt_dir, preset="test", recipe=recipe, steps=c["steps"],
                     global_batch=c["global_batch"], micro_batch=c["micro_batch"], lr=recipe.lr,
                     warmup_steps=2, seed=0, resolutions=list(c["resolutions"]),
                     checkpoint_every=c["checkpoint_every"], keep_checkpoints=2)


def rows(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The recorded columns of a training history."""
    return [{"step": r["step"], **{k: r[k] for k in KEYS}} for r in history]


def run_case(case: str, corpus: Path, ckpt_dir: Path) -> list[dict[str, Any]]:
    """Train golden case `case` single-process with one torch thread; returns its recorded rows."""
    import torch

    from peflow.train.loop import Dist, train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _, history = train(plan_for(case, corpus, ckpt_dir), Dist(), progress=False)
    finally:
        torch.set_num_threads(threads)
    return rows(history)


def main() -> None:
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        corpus = make_corpus(Path(tmp))
        cases = {name: run_case(name, corpus, Path(tmp) / f"{name}.ckpt") for name in CASES}
    plans = {name: {k: (v if not isinstance(v, tuple) else list(v)) for k, v in c.items()}
             for name, c in CASES.items()}
    doc = {"regenerate": COMMAND, "torch": torch.__version__, "python": sys.version.split()[0],
           "plans": plans, "cases": cases}
    GOLDEN.write_text(json.dumps(doc, indent=1) + "\n")
    for name, r in cases.items():
        print(name, [round(x["loss"], 6) for x in r])


if __name__ == "__main__":
    main()
