"""The training loop every peflow training stage shares; what is trained is an `Objective`.

One function, any number of processes. Under torchrun (RANK/WORLD_SIZE/MASTER_ADDR in the
environment) `init_distributed` joins the process group (NCCL on CUDA, gloo on CPU);
otherwise the run is a single process. The global batch is fixed by the settings: each rank
takes global_batch / world_size rows and, when `micro_batch` is smaller, accumulates
gradients over micro-batches. bf16 autocast on CUDA, fp32 on CPU.

`parallelism` (peflow.train.parallel): "ddp" keeps the whole model on every rank and averages
gradients with one flat all-reduce per step; "fsdp" shards each transformer block (FSDP2,
bf16 compute and fp32 reduction on CUDA). `activation_checkpointing` recomputes every block's
activations in backward. Under FSDP every rank takes part in the history row's measurements
(the objective's `flops_per_sample` and `step_metrics` run on every rank with the root gathered),
and checkpoints hold the full state gathered onto rank 0. With either switch on, `fit` returns
on rank 0 a model built afresh by the objective holding the trained weights (the plain
architecture: no shards, no checkpointing hooks).

Resume: the newest checkpoint under `settings.ckpt_dir` restores model, optimizer, schedule,
step and RNG states; an objective whose data and randomness are functions of (seed, step, row)
continues exactly. Rank 0 appends one row per step to `ckpt_dir/history.jsonl`: step, the
objective's loss columns, lr, the objective's step metrics, samples/s, model FLOP/s, seconds.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from peflow.train import checkpoint as ckpt
from peflow.train import host, parallel
from peflow.train.optim import build_scheduler

if TYPE_CHECKING:
    from peflow.train.objectives.base import Objective

HISTORY = "history.jsonl"
StepHook = Callable[[dict[str, Any]], None]


@dataclass(kw_only=True)
class TrainSettings:
    """What the trainer itself needs of a run; a stage's plan extends it with its own fields."""

    ckpt_dir: Path
    steps: int
    global_batch: int
    micro_batch: int = 0  #: rows per forward on each rank; 0 = the whole local batch
    lr: float
    warmup_steps: int
    seed: int = 0
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    parallelism: str = "ddp"  #: "ddp" (whole model per rank, flat all-reduce) or "fsdp" (FSDP2 per block)
    activation_checkpointing: bool = False  #: recompute each transformer block's activations in backward


@dataclass
class Dist:
    """This process's place in the job."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def barrier(self) -> None:
        """Wait for every rank (a no-op alone)."""
        if self.world_size > 1:
            torch.distributed.barrier()

    def all_reduce_mean(self, t: torch.Tensor) -> torch.Tensor:
        """`t` averaged over ranks, in place (on this rank's device for NCCL); returns it."""
        if self.world_size > 1:
            torch.distributed.all_reduce(t)
            t /= self.world_size
        return t


def init_distributed() -> Dist:
    """Join the torchrun process group when launched by torchrun; a single process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if cuda else "gloo")
    return Dist(rank=rank, world_size=world, device=device)


def fit(objective: Objective, settings: TrainSettings, dist: Dist, *, on_step: StepHook | None = None,
        progress: bool = True) -> tuple[torch.nn.Module, list[dict[str, Any]]]:
    """Train (or resume) `objective` under `settings`; returns the model and the history (rank 0: all steps).

    `on_step` (rank 0) receives every history row, the replayed ones of a resumed run first;
    `progress` shows a progress bar labelled with `objective.name` on rank 0.
    """
    return Trainer(objective, settings, dist).fit(on_step=on_step, progress=progress)


class Trainer:
    """One run of an objective: model, optimizer, schedule, checkpoints and history."""

    def __init__(self, objective: Objective, settings: TrainSettings, dist: Dist) -> None:
        if settings.global_batch % dist.world_size:
            raise ValueError(f"global_batch {settings.global_batch} is not divisible by {dist.world_size} processes")
        if settings.parallelism not in parallel.PARALLELISMS:
            raise ValueError(f"parallelism must be one of {parallel.PARALLELISMS}, got {settings.parallelism!r}")
        self.objective, self.settings, self.dist = objective, settings, dist
        self.local_batch = settings.global_batch // dist.world_size
        self.micro = min(settings.micro_batch or self.local_batch, self.local_batch)
        self.hist_path = settings.ckpt_dir / HISTORY
        if dist.device.type == "cpu":  # no page faults on the tensors every step frees and reallocates
            host.keep_freed_memory()
        torch.manual_seed(settings.seed)
        self.model = objective.build_model(dist).to(dist.device).train()
        if dist.world_size > 1:
            for t in self.model.state_dict().values():
                torch.distributed.broadcast(t, src=0)
        if settings.activation_checkpointing:
            parallel.apply_activation_checkpointing(self.model)
        # FSDP needs a process group even for one rank (bench/gpu_check.py makes one)
        self.sharded = settings.parallelism == "fsdp"
        if self.sharded and not torch.distributed.is_initialized():
            raise ValueError("parallelism 'fsdp' needs a process group: launch with torchrun (peflow launch), "
                             "or train one process with parallelism 'ddp'")
        self.loss_module = (parallel.shard(objective, self.model, dist.device) if self.sharded
                            else parallel.LossModule(objective, self.model))
        objective.setup(self.model, settings, dist)
        self.opt = objective.build_optimizer(self.model, settings.lr)
        if self.sharded or dist.device.type == "cuda":
            parallel.use_foreach(self.opt)
        self.sched = build_scheduler(self.opt, warmup_steps=settings.warmup_steps, total_steps=settings.steps)
        self.autocast = dict(device_type=dist.device.type, dtype=torch.bfloat16, enabled=dist.device.type == "cuda")

    def fit(self, *, on_step: StepHook | None = None, progress: bool = True
            ) -> tuple[torch.nn.Module, list[dict[str, Any]]]:
        """Run the remaining steps; see `peflow.train.trainer.fit`."""
        s, dist = self.settings, self.dist
        start, history = self._resume(on_step)
        bar = _progress(self.objective.name, s.steps, start) if (progress and dist.rank == 0) else None
        try:
            for step in range(start, s.steps):
                t0 = time.perf_counter()
                losses, lr = self._step(step)
                done = step + 1
                if done % s.checkpoint_every == 0 or done == s.steps:
                    ckpt.save(s.ckpt_dir, done, model=self.model, optimizer=self.opt, scheduler=self.sched,
                              extra={"data_position": self.objective.data_position(done)}, rank=dist.rank,
                              world_size=dist.world_size, barrier=dist.barrier, keep=s.keep_checkpoints)
                dt = time.perf_counter() - t0
                measured = self._measure(step) if (self.sharded or dist.rank == 0) else None
                if dist.rank == 0:
                    row = self._row(step, losses, lr, dt, *measured)
                    history.append(row)
                    with open(self.hist_path, "a") as f:
                        f.write(json.dumps(row) + "\n")
                    if on_step:
                        on_step(row)
                    if bar is not None:
                        bar[0].update(bar[1], completed=done, description=self.objective.progress_text(row))
        finally:
            if bar is not None:
                bar[0].stop()
        return self._trained_model(), history

    def _resume(self, on_step: StepHook | None) -> tuple[int, list[dict[str, Any]]]:
        """Restore the newest checkpoint; rank 0 trims history.jsonl to the steps before it and replays them."""
        s, dist = self.settings, self.dist
        start = 0
        last = ckpt.latest(s.ckpt_dir)
        if last is not None:
            start = int(ckpt.load(last, model=self.model, optimizer=self.opt, scheduler=self.sched, rank=dist.rank,
                                  world_size=dist.world_size)["step"])
        history = _read_history(self.hist_path, start) if dist.rank == 0 else []
        if dist.rank == 0:
            s.ckpt_dir.mkdir(parents=True, exist_ok=True)
            self.hist_path.write_text("".join(json.dumps(r) + "\n" for r in history))
            for row in history:
                if on_step:
                    on_step(row)
        return start, history

    def _step(self, step: int) -> tuple[list[float], float]:
        """One optimizer step over this rank's micro-batches; returns the rank-averaged loss columns and the lr."""
        obj, dist, model = self.objective, self.dist, self.model
        batch = tuple(t.to(dist.device) for t in obj.batch(step))
        self.opt.zero_grad(set_to_none=True)
        starts = list(range(0, self.local_batch, self.micro))
        sums = torch.zeros(len(obj.loss_columns))
        for c0 in starts:
            micro = tuple(t[c0:c0 + self.micro] for t in batch)
            with torch.autocast(**self.autocast):
                terms = self.loss_module(micro, step=step, row0=dist.rank * self.local_batch + c0)
            (terms[obj.loss_columns[0]] / len(starts)).backward()
            sums += torch.tensor([_value(terms[c]) for c in obj.loss_columns]) / len(starts)
        _all_reduce_grads(parallel.replicated(model), dist)  # FSDP reduced the shards' gradients itself
        lr = self.opt.param_groups[0]["lr"]
        self.opt.step()
        self.sched.step()
        obj.after_step(model)
        return dist.all_reduce_mean(sums.to(dist.device)).tolist(), lr

    def _measure(self, step: int) -> tuple[float, dict[str, Any]]:
        """The objective's training FLOPs per sample and step metrics of `step`: rank 0 alone under DDP; every
        rank under FSDP (the model's forward and parameters are collective), with the root unit gathered."""
        obj, model = self.objective, self.model
        if not self.sharded:
            return obj.flops_per_sample(model, step), obj.step_metrics(model, step)
        self.loss_module.unshard()
        try:
            return obj.flops_per_sample(model, step), obj.step_metrics(model, step)
        finally:
            self.loss_module.reshard()

    def _row(self, step: int, losses: list[float], lr: float, dt: float, flops: float,
             metrics: dict[str, Any]) -> dict[str, Any]:
        """The history row of `step` (rank 0): losses, lr, the objective's metrics, throughput."""
        obj = self.objective
        sps = self.settings.global_batch / dt
        return {"step": step, **dict(zip(obj.loss_columns, losses)), "lr": lr, **metrics,
                "samples_per_s": sps, "model_flops_per_s": sps * flops, "step_s": dt}

    def _trained_model(self) -> torch.nn.Module:
        """The model `fit` returns: the trained one itself, or (FSDP or activation checkpointing) on rank 0 a
        fresh build of the objective's architecture holding the trained weights; every rank calls it."""
        if not (self.sharded or self.settings.activation_checkpointing):
            return self.model
        state = parallel.full_model_state(self.model) if self.sharded else self.model.state_dict()
        if self.dist.rank != 0:
            return self.model
        plain = self.objective.build_model(self.dist)
        plain.load_state_dict(state, strict=True)
        return plain.to(self.dist.device).train()


def _value(v: torch.Tensor | float) -> float:
    """A loss term as a Python float (detached)."""
    return v.detach().item() if isinstance(v, torch.Tensor) else float(v)


def _all_reduce_grads(params: list[torch.nn.Parameter], dist: Dist) -> None:
    """Average the gradients of `params` over ranks with one flat all-reduce."""
    if dist.world_size == 1 or not params:
        return
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
    dist.all_reduce_mean(flat)
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n


def _read_history(path: Path, before: int) -> list[dict[str, Any]]:
    """The history rows of the steps before `before` (the ones a resume keeps)."""
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r["step"] < before]


def _progress(label: str, total: int, start: int) -> tuple[Any, Any]:
    """A started rich progress bar labelled `label`, and its task."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
                   TimeRemainingColumn())
    task = bar.add_task("", total=total, completed=start)
    bar.start()
    return bar, task
