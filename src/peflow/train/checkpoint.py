"""Atomic, resumable training checkpoints.

Layout, in a folder that outlives the stage's staging folder (`OUT.ckpt/`):

    step-00000100/
        model.safetensors, model.json     the model (peflow.models.pe.save_model)
        trainer.pt                         optimizer, scheduler, step, data position
            rng-rank00000.pt, rng-rank00001.pt python/numpy/torch RNG states, per rank

The newest complete `step-*` folder is the one to resume (`latest`).

A model sharded by FSDP (peflow.train.parallel) is checkpointed in the same layout: every rank
takes part in gathering the full model and optimizer state onto rank 0, which writes the same
`model.safetensors`; `trainer.pt` then holds the optimizer state keyed by parameter name
(`optimizer_layout: "by_name"`, `torch.distributed.checkpoint.state_dict`'s full layout) rather
than by index. A resume shards both back, broadcast from rank 0. A checkpoint resumes under the
parallelism that wrote it (the optimizer layouts differ); the model file is the same either way.

A checkpoint is written into `.step-N.tmp-*` and renamed into place with
os.replace only when every rank's file is there, so a kill at any moment
leaves either the old or the new checkpoint, never half of one. `trainer.pt`
and the RNG files hold only tensors and plain containers: they are loaded
with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from peflow.models.pe import MODEL_FILE, save_model
from peflow.train import parallel

_STEP_DIR = re.compile(r"^step-(\d{8})$")
TRAINER_FILE = "trainer.pt"
#: How trainer.pt keys the optimizer state: by parameter index (optimizer.state_dict(), DDP) or by name (FSDP).
BY_INDEX, BY_NAME = "by_index", "by_name"


def rng_state() -> dict[str, Any]:
    """This process's python, numpy and torch RNG states, as tensors and plain values."""
    py = random.getstate()
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python_version": py[0],
        "python_state": torch.tensor(py[1], dtype=torch.int64),
        "python_gauss": py[2] if py[2] is not None else float("nan"),
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "numpy_has_gauss": int(np_state[3]),
        "numpy_gauss": float(np_state[4]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the python, numpy and torch (and CUDA, when saved and present) RNG states of `rng_state`."""
    gauss = state["python_gauss"]
    random.setstate((int(state["python_version"]), tuple(int(v) for v in state["python_state"].tolist()),
                     None if gauss != gauss else gauss))
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), int(state["numpy_pos"]),
                         int(state["numpy_has_gauss"]), float(state["numpy_gauss"])))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def step_dirs(root: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(found)


def latest(root: str | Path) -> Path | None:
    """The newest complete checkpoint folder under `root` (model and trainer state present), or None."""
    dirs = [p for _, p in step_dirs(root) if (p / TRAINER_FILE).is_file() and (p / MODEL_FILE).is_file()]
    return dirs[-1] if dirs else None


class _Gathered:
    """What `save_model` reads of a model (`state_dict()`, `peflow_preset`), for a state gathered from shards."""

    def __init__(self, state: dict[str, torch.Tensor], model: torch.nn.Module) -> None:
        self.state, self.peflow_preset = state, getattr(model, "peflow_preset", None)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.state


def save(root: str | Path, step: int, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
         scheduler: Any, extra: dict[str, Any], rank: int, world_size: int,
         barrier: Callable[[], None], keep: int = 2) -> Path | None:
    """Write checkpoint `step` collectively; every rank calls this. Returns the folder on rank 0.

    Rank 0 creates a temporary folder, every rank writes its RNG state there,
    rank 0 adds model and trainer state (of a sharded model: gathered from every
    rank first), renames the folder into place and prunes all but the newest `keep`.
    """
    root = Path(root)
    tmp = root / f".step-{step:08d}.tmp"
    sharded = parallel.is_sharded(model)
    if sharded:  # collective: the full state arrives on rank 0
        model_state, optim_state = parallel.full_model_state(model), parallel.full_optimizer_state(model, optimizer)
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    barrier()
    torch.save(rng_state(), tmp / f"rng-rank{rank:05d}.pt")
    barrier()
    if rank != 0:
        barrier()
        return None
    save_model(_Gathered(model_state, model) if sharded else model, tmp, extra={"step": step})
    torch.save({"optimizer": optim_state if sharded else optimizer.state_dict(),
                "optimizer_layout": BY_NAME if sharded else BY_INDEX, "scheduler": scheduler.state_dict(),
                "step": step, "world_size": world_size, **extra}, tmp / TRAINER_FILE)
    final = root / f"step-{step:08d}"
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for _, old in step_dirs(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def load(folder: str | Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
         rank: int, world_size: int) -> dict[str, Any]:
    """Restore model, optimizer, scheduler and this rank's RNG state; returns the trainer dict.

    Every rank calls this; a sharded model's state is read on rank 0 and sharded back to every rank.
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    sharded = parallel.is_sharded(model)
    # mmap: under FSDP only rank 0 reads the (full) optimizer state; the others need the small fields
    trainer = torch.load(folder / TRAINER_FILE, map_location="cpu", weights_only=True, mmap=sharded)
    layout = trainer.get("optimizer_layout", BY_INDEX)
    if layout != (BY_NAME if sharded else BY_INDEX):
        written, now = ("fsdp", "ddp") if layout == BY_NAME else ("ddp", "fsdp")
        raise ValueError(f"checkpoint {folder} was written with parallelism {written!r}; resume it with "
                         f"{written!r}, not {now!r} (or start over without its checkpoint folder)")
    if sharded:
        parallel.load_full_model_state(model, load_file(str(folder / MODEL_FILE)) if rank == 0 else {})
        parallel.load_full_optimizer_state(model, optimizer, trainer["optimizer"] if rank == 0 else {})
    else:
        model.load_state_dict(load_file(str(folder / MODEL_FILE)), strict=True)
        optimizer.load_state_dict(trainer["optimizer"])
    scheduler.load_state_dict(trainer["scheduler"])
    # Data order, augmentation and masks are seeded by (seed, step, row), not by these states, so a
    # resume with another process count still sees the same batches; the states are restored when they fit.
    rng_file = folder / f"rng-rank{rank:05d}.pt"
    if int(trainer["world_size"]) == world_size and rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=True))
    return trainer


def ckpt_dir(out: str | Path) -> Path:
    """Where a training stage's resumable checkpoints live: a sibling `OUT.ckpt`, which survives a killed run."""
    out = Path(out)
    return out.with_name(out.name + ".ckpt")
