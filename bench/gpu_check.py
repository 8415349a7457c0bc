"""GPU check: PE-Core-B/16 and L/14 pretraining steps through peflow's trainer, and the bf16 matmul peak of the
same device, in one run.

    python bench/gpu_check.py                    # a CUDA machine: B/16 at 224 px (DDP path), L/14 at 336 px (FSDP)
    python bench/gpu_check.py --batch-b16 512 --batch-l14 256 --steps 20
    python bench/gpu_check.py --tiny --out /tmp/gpu_check.json   # CPU smoke of the same path (the test suite's)

Each check builds `peflow.train.trainer.Trainer` on the CLIP objective of `peflow pretrain`
(`ClipObjective`: the model preset, recipe `pe`, so LAMB - run `foreach` on CUDA by the trainer -
mask regularization, the gathered CLIP loss and the logit-scale clamp; bf16 autocast on CUDA) with
the trainer settings of the presets: B/16 as b16 (parallelism ddp), L/14 as l14 (FSDP2 with bf16
parameters and fp32 reductions, activation checkpointing), here on one device in a process group of
one. The objective's batch is a fixed synthetic batch already on the device: data loading is not
measured. Timed: the trainer's optimizer step (`Trainer._step`: forward, backward, gradient
reduction, LAMB, schedule, clamp), median over the steps after warm-up.

Reported per check: samples/s, step time, model FLOPs per sample (the objective's own count: 3x the
forward under torch's FlopCounterMode), MFU = samples/s x FLOPs / the matmul peak measured here
(best bf16 torch.mm TFLOP/s over square sizes, CUDA events), MFU against the device's spec peak
when known, HFU (4/3 x MFU under activation checkpointing), peak memory. Without CUDA (and
without --tiny) it exits with status 2 and says so. Results: bench/results/gpu_check.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from peflow.models.presets import get_model_preset
from peflow.train.losses import clip_forward, contrastive_loss
from peflow.train.objectives.clip import ClipObjective
from peflow.train.recipe import get_recipe, resolution_schedule
from peflow.train.trainer import Dist, Trainer, TrainSettings

RESULTS = Path(__file__).resolve().parent / "results" / "gpu_check.json"
#: bf16 dense spec peaks, TFLOP/s (torchtitan's get_peak_flops; research/clip-training-performance.md)
SPEC_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}


@dataclasses.dataclass(frozen=True)
class Check:
    """One timed configuration."""

    name: str
    model: str
    resolution: int
    batch: int
    parallelism: str = "ddp"
    activation_checkpointing: bool = False


class SyntheticClip(ClipObjective):
    """The pretraining objective on one fixed synthetic batch on the device: the step without data loading."""

    def setup(self, model: torch.nn.Module, settings: TrainSettings, dist: Dist) -> None:
        p = get_model_preset(self.preset)
        self.context_length, self.seed = p.context_length, settings.seed
        self.loss_fn = contrastive_loss(dist.rank, dist.world_size)
        self.schedule = resolution_schedule(self.resolutions, settings.steps)
        self.forward = clip_forward
        g = torch.Generator().manual_seed(settings.seed)
        rows, res = settings.global_batch // dist.world_size, self.resolutions[0][0]
        self.images = torch.randn(rows, 3, res, res, generator=g).to(dist.device)
        self.tokens = torch.randint(0, p.vocab_size, (rows, p.context_length), generator=g).to(dist.device)

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images, self.tokens


def matmul_peak(device: torch.device, sizes: tuple[int, ...], iters: int) -> float:
    """Best torch.mm TFLOP/s over square `sizes` (bf16 on CUDA, fp32 on CPU), after a warm-up."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
        for _ in range(3):
            torch.mm(a, b)
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(iters):
            torch.mm(a, b)
        _sync(device)
        best = max(best, 2 * n**3 * iters / (time.perf_counter() - t0) / 1e12)
        del a, b
    return best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_check(check: Check, dist: Dist, *, steps: int, warmup: int, ckpt_dir: Path) -> dict[str, Any]:
    """Build the trainer for `check`, run warm-up and timed steps; the check's numbers."""
    recipe = get_recipe("pe")
    obj = SyntheticClip(data=Path("unused"), preset=check.model, recipe=recipe, resolutions=[(check.resolution, 1.0)])
    settings = TrainSettings(ckpt_dir=ckpt_dir, steps=warmup + steps, global_batch=check.batch, lr=recipe.lr,
                             warmup_steps=0, checkpoint_every=10**9, parallelism=check.parallelism,
                             activation_checkpointing=check.activation_checkpointing)
    cuda = dist.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(dist.device)
    trainer = Trainer(obj, settings, dist)
    times = []
    for step in range(warmup + steps):
        t0 = time.perf_counter()
        trainer._step(step)  # the trainer's own optimizer step, as `fit` runs it
        _sync(dist.device)
        if step >= warmup:
            times.append(time.perf_counter() - t0)
    flops, _ = trainer._measure(warmup + steps - 1)
    step_s = statistics.median(times)
    foreach = [g.get("foreach") for g in trainer.opt.param_groups]
    out = {**dataclasses.asdict(check), "optimizer": type(trainer.opt).__name__, "foreach": all(foreach),
           "bf16": cuda, "steps": steps, "warmup": warmup, "step_s": step_s, "samples_per_s": check.batch / step_s,
           "model_gflops_per_sample": flops / 1e9, "model_tflops_per_s": check.batch / step_s * flops / 1e12,
           "peak_memory_gib": torch.cuda.max_memory_allocated(dist.device) / 2**30 if cuda else None}
    del trainer, obj
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return out


def checks(args: argparse.Namespace) -> list[Check]:
    """B/16 as preset b16 runs it and L/14 as l14 does (or the tiny CPU pair of the same two paths)."""
    if args.tiny:
        return [Check("test-ddp", "test", 32, 8), Check("test-fsdp-ac", "test", 32, 8, "fsdp", True)]
    return [Check("pe-core-b16", "pe-core-b16", args.res_b16, args.batch_b16),
            Check("pe-core-l14-fsdp", "pe-core-l14", args.res_l14, args.batch_l14, "fsdp", True)]


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"


def spec_peak(name: str) -> float | None:
    return next((v for k, v in SPEC_TFLOPS.items() if k in name), None)


def init_group(device: torch.device) -> Dist:
    """A process group of one (FSDP needs one; NCCL on CUDA, gloo on CPU)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                         init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return Dist(rank=0, world_size=1, device=device)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="CPU smoke: the test model through the same two paths")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 10; --tiny 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3; --tiny 1)")
    p.add_argument("--batch-b16", type=int, default=256, help="B/16 pairs per step on the device")
    p.add_argument("--batch-l14", type=int, default=128, help="L/14 pairs per step on the device")
    p.add_argument("--res-b16", type=int, default=224)
    p.add_argument("--res-l14", type=int, default=336)
    p.add_argument("--out", type=Path, default=RESULTS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if not args.tiny and not torch.cuda.is_available():
        print("bench/gpu_check.py: no CUDA device here (torch.cuda.is_available() is False); it measures GPU "
              "steps. `python bench/gpu_check.py --tiny` runs the same path on the CPU as a smoke test.",
              file=sys.stderr)
        return 2
    device = torch.device("cpu") if args.tiny else torch.device("cuda", 0)
    steps, warmup = args.steps or (2 if args.tiny else 10), args.warmup or (1 if args.tiny else 3)
    dist = init_group(device)
    try:
        peak = matmul_peak(device, (256, 512) if args.tiny else (4096, 8192, 16384), 5 if args.tiny else 50)
        name, spec = device_name(device), spec_peak(device_name(device))
        results = []
        with tempfile.TemporaryDirectory() as tmp:
            for check in checks(args):
                r = run_check(check, dist, steps=steps, warmup=warmup, ckpt_dir=Path(tmp) / check.name)
                r["mfu"] = r["model_tflops_per_s"] / peak
                r["mfu_spec"] = r["model_tflops_per_s"] / spec if spec else None
                r["hfu"] = r["mfu"] * (4 / 3 if check.activation_checkpointing else 1.0)
                results.append(r)
                print(f"{check.name}: {r['samples_per_s']:.1f} samples/s, {r['step_s'] * 1e3:.1f} ms/step, "
                      f"{r['model_gflops_per_sample']:.1f} GFLOP/sample, MFU {100 * r['mfu']:.1f}% of the measured "
                      f"peak" + (f", {100 * r['mfu_spec']:.1f}% of the spec" if spec else ""), flush=True)
    finally:
        torch.distributed.destroy_process_group()
    doc = {"command": " ".join(["python", "bench/gpu_check.py", *(argv if argv is not None else sys.argv[1:])]),
           "device": name, "torch": torch.__version__, "tiny": args.tiny, "cpu_count": os.cpu_count(),
           "matmul_peak_tflops": peak, "matmul_dtype": "bfloat16" if device.type == "cuda" else "float32",
           "spec_peak_tflops": spec, "checks": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"matmul peak {peak:.1f} TFLOP/s on {name}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
