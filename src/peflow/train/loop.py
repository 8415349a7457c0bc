"""The PE-core pretraining loop: one function, any number of processes.

Under torchrun (RANK/WORLD_SIZE/MASTER_ADDR in the environment) it joins the
process group (NCCL on CUDA, gloo on CPU); otherwise it runs alone. The
global batch is fixed by the plan: each rank takes global_batch / world_size
rows and, when `micro_batch` is smaller, accumulates gradients over
micro-batches (the contrastive negatives of one micro-batch are the
micro-batch gathered over ranks). Gradients are averaged over ranks with one
flat all-reduce per step. bf16 autocast on CUDA, fp32 on CPU.

Resume: the newest checkpoint under `plan.ckpt_dir` restores model,
optimizer, schedule, step and RNG states; data order, augmentation and masks
are functions of (seed, step, row), so the run continues exactly.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from peflow.train import checkpoint as ckpt
from peflow.train.data import ShardIndex, TrainLoader
from peflow.train.losses import clamp_logit_scale, clip_forward, contrastive_loss, patch_mask
from peflow.train.optim import build_optimizer, build_scheduler
from peflow.train.recipe import Recipe, resolution_at, resolution_schedule

HISTORY = "history.jsonl"


@dataclass(kw_only=True)
class TrainPlan:
    """Everything one pretraining run needs, resolved from the stage config, recipe and budget."""

    data: Path
    ckpt_dir: Path
    preset: str
    recipe: Recipe
    steps: int
    global_batch: int
    micro_batch: int = 0  #: rows per forward on each rank; 0 = the whole local batch
    lr: float
    warmup_steps: int
    seed: int = 0
    resolutions: list[tuple[int, float]]
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    init_from: str = ""
    compile: bool = False  #: torch.compile the forward + loss (`clip_forward`)


@dataclass
class Dist:
    """This process's place in the job."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()

    def all_reduce_mean(self, t: torch.Tensor) -> torch.Tensor:
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


def flops_per_sample(model: torch.nn.Module, resolution: int, context_length: int) -> float:
    """Training FLOPs per image-text pair at `resolution`: 3x the counted forward (fwd + 2x bwd)."""
    from torch.utils.flop_counter import FlopCounterMode

    dev = next(model.parameters()).device
    images = torch.zeros(2, 3, resolution, resolution, device=dev)
    tokens = torch.zeros(2, context_length, dtype=torch.long, device=dev)
    with FlopCounterMode(display=False) as counter:
        model.encode_image(images)
        model.encode_text(tokens)
    return 3.0 * counter.get_total_flops() / 2


def _all_reduce_grads(model: torch.nn.Module, dist: Dist) -> None:
    if dist.world_size == 1:
        return
    params = [p for p in model.parameters() if p.requires_grad]
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
    dist.all_reduce_mean(flat)
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n


def _read_history(path: Path, before: int) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r["step"] < before]


def train(plan: TrainPlan, dist: Dist, *, on_step: Callable[[dict[str, Any]], None] | None = None,
          progress: bool = True) -> tuple[torch.nn.Module, list[dict[str, Any]]]:
    """Run (or resume) `plan`; returns the trained model and the per-step history (rank 0: all steps)."""
    from peflow.models.pe import build_model, get_model_preset, get_tokenizer, load_model

    plan.recipe.validate()
    torch.manual_seed(plan.seed)
    p = get_model_preset(plan.preset)
    model = load_model(plan.init_from, preset=plan.preset) if plan.init_from else build_model(plan.preset)
    model.to(dist.device).train()
    if dist.world_size > 1:
        for t in model.state_dict().values():
            torch.distributed.broadcast(t, src=0)
    tokenizer = get_tokenizer(p)
    loader = TrainLoader(ShardIndex.from_corpus(plan.data, "train"), global_batch=plan.global_batch,
                         rank=dist.rank, world_size=dist.world_size, seed=plan.seed, recipe=plan.recipe,
                         tokenizer=tokenizer)
    opt = build_optimizer(model, plan.recipe, plan.lr)
    sched = build_scheduler(opt, warmup_steps=plan.warmup_steps, total_steps=plan.steps)
    loss_fn = contrastive_loss(dist.rank, dist.world_size)
    schedule = resolution_schedule(plan.resolutions if plan.recipe.progressive_resolution
                                   else [(plan.resolutions[-1][0], 1.0)], plan.steps)

    start = 0
    last = ckpt.latest(plan.ckpt_dir)
    if last is not None:
        start = int(ckpt.load(last, model=model, optimizer=opt, scheduler=sched, rank=dist.rank,
                              world_size=dist.world_size)["step"])
    hist_path = plan.ckpt_dir / HISTORY
    history = _read_history(hist_path, start) if dist.rank == 0 else []
    if dist.rank == 0:
        plan.ckpt_dir.mkdir(parents=True, exist_ok=True)
        hist_path.write_text("".join(json.dumps(r) + "\n" for r in history))
        for row in history:
            if on_step:
                on_step(row)

    autocast = dict(device_type=dist.device.type, dtype=torch.bfloat16, enabled=dist.device.type == "cuda")
    # Compiling the function, not the module, keeps the model's state_dict keys (checkpoints) unchanged.
    forward = torch.compile(clip_forward) if plan.compile else clip_forward
    micro = plan.micro_batch or loader.local_batch
    flops: dict[int, float] = {}
    bar = _progress(plan.steps, start) if (progress and dist.rank == 0) else None
    try:
        for step in range(start, plan.steps):
            t0 = time.perf_counter()
            res = resolution_at(schedule, step)
            images, tokens = loader.batch(step, res)
            images, tokens = images.to(dist.device), tokens.to(dist.device)
            opt.zero_grad(set_to_none=True)
            chunks = list(range(0, loader.local_batch, micro))
            sums = torch.zeros(3)
            for c0 in chunks:
                im, tk = images[c0:c0 + micro], tokens[c0:c0 + micro]
                idx, mask = _mask_plan(plan, step, dist.rank * loader.local_batch + c0, im, model)
                with torch.autocast(**autocast):
                    out = forward(model, im, tk, loss_fn, mask_idx=idx, mask_MN=mask,
                              mask_reg_weight=plan.recipe.mask_reg_weight)
                (out.total / len(chunks)).backward()
                sums += torch.tensor([out.total.item(), out.clip.item(),
                                      out.mask_reg.item() if out.mask_reg is not None else 0.0]) / len(chunks)
            _all_reduce_grads(model, dist)
            lr = opt.param_groups[0]["lr"]
            opt.step()
            sched.step()
            clamp_logit_scale(model, plan.recipe.max_logit_scale)
            loss, clip, mreg = dist.all_reduce_mean(sums).tolist()
            done = step + 1
            if done % plan.checkpoint_every == 0 or done == plan.steps:
                ckpt.save(plan.ckpt_dir, done, model=model, optimizer=opt, scheduler=sched,
                          extra={"data_position": loader.position(done)}, rank=dist.rank,
                          world_size=dist.world_size, barrier=dist.barrier, keep=plan.keep_checkpoints)
            if dist.rank == 0:
                dt = time.perf_counter() - t0
                if res not in flops:
                    flops[res] = flops_per_sample(model, res, p.context_length)
                sps = plan.global_batch / dt
                row = {"step": step, "loss": loss, "clip_loss": clip, "mask_reg_loss": mreg, "lr": lr,
                       "logit_scale": float(model.logit_scale.detach().exp()), "resolution": res, "samples_per_s": sps,
                       "model_flops_per_s": sps * flops[res], "step_s": dt}
                history.append(row)
                with open(hist_path, "a") as f:
                    f.write(json.dumps(row) + "\n")
                if on_step:
                    on_step(row)
                if bar is not None:
                    bar[0].update(bar[1], completed=done,
                                  description=f"loss {loss:.3f} res {res} {sps:.0f} samples/s")
    finally:
        if bar is not None:
            bar[0].stop()
    return model, history


def _mask_plan(plan: TrainPlan, step: int, row0: int, images: torch.Tensor, model: torch.nn.Module
               ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Which rows get a masked copy and which patches; seeded by (seed, step, first global row)."""
    r = plan.recipe
    if r.mask_reg_fraction <= 0:
        return None, None
    n = min(images.shape[0], max(r.mask_reg_min, round(r.mask_reg_fraction * images.shape[0])))
    g = torch.Generator().manual_seed(int(np.random.SeedSequence([plan.seed, step, row0, 11]).generate_state(1)[0]))
    idx = torch.randperm(images.shape[0], generator=g)[:n].sort().values
    patch = model.visual.trunk.patch_embed.patch_size[0]
    gh, gw = images.shape[2] // patch, images.shape[3] // patch
    return idx.to(images.device), patch_mask(n, gh, gw, r.mask_ratio, g).to(images.device)


def _progress(total: int, start: int) -> tuple[Any, Any]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("pretrain"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
                   TimeRemainingColumn())
    task = bar.add_task("", total=total, completed=start)
    bar.start()
    return bar, task


def plan_dict(plan: TrainPlan) -> dict[str, Any]:
    """The plan as plain values (for params and the manifest)."""
    d = dataclasses.asdict(plan)
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in d.items()}
