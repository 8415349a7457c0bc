"""Benchmark: peflow's pretraining step vs open_clip's, and the matmul peak, in one run.

    python bench/train_step.py [--steps 20] [--rounds 3] [--threads 2] [--no-trainer]

The identical tiny configuration (issue 3): vision tower timm
`vit_pe_core_tiny_patch16_384` (width 192, depth 12, 3 heads, RoPE, attention
pooling) run at 64 px, text tower width 256 / 4 heads / 4 layers / context 32,
embed dim 256, batch 64, fp32, 2 threads, one process, synthetic data.

Measured, interleaved in rounds so that load on a shared machine hits every
contender alike:
- `mm_peak`: torch.mm GFLOP/s on square fp32 matrices (best of a few sizes);
- `peflow/<recipe>`: peflow's training step (`peflow.train`: `clip_forward`,
  the gathered CLIP loss, `build_optimizer` - LAMB for `pe`, AdamW for
  `vanilla` and `pe-adamw` (the nano preset's, so `make demo`'s) - and the
  logit-scale clamp, with mask regularization as the recipe says), on a
  model from `peflow.models.build_model`;
- `open_clip/pieces`: open_clip's own step pieces as `train_one_epoch` runs
  them (model(images, texts) -> `ClipLoss`, backward, AdamW with open_clip's
  parameter groups, clamp);
- `open_clip/trainer`: `python -m open_clip_train.main` itself
  (`--dataset-type synthetic --workers 0`), per-step samples/s parsed from its
  log. open_clip 3.3 cannot pass `img_size` to a timm tower from a config, so
  the child process wraps `timm.create_model` to add `img_size=64` for that
  one model name; nothing else in the trainer is touched;
- `open_clip/trainer+malloc`: the same trainer with glibc told by environment
  variables to keep freed memory mapped, as peflow's trainer does for itself
  (`peflow.train.host.keep_freed_memory`), so the allocator's share of the
  ratio is visible (`--no-trainer-malloc` skips it).

This process applies `keep_freed_memory` first (peflow's training processes do),
so the in-process contenders, open_clip's step pieces included, share it.

Samples/s are medians over steady-state steps (warm-up steps dropped). The
peak fraction is samples/s x training FLOPs per sample (3x the forward
counted by torch's FlopCounterMode) / mm_peak. Results:
bench/results/train_step.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

RESULTS = Path(__file__).resolve().parent / "results" / "train_step.json"
TIMM_TOWER = "vit_pe_core_tiny_patch16_384"
IMAGE, BATCH, CONTEXT, EMBED = 64, 64, 32, 256
TEXT = dict(context_length=CONTEXT, vocab_size=49408, width=256, heads=4, layers=4)
OPEN_CLIP_CFG = {
    "model_cfg": {
        "embed_dim": EMBED,
        "custom_text": True,
        "vision_cfg": {"timm_model_name": TIMM_TOWER, "timm_model_pretrained": False, "timm_pool": "map",
                       "timm_proj": None, "image_size": IMAGE},
        "text_cfg": TEXT,
    },
    "preprocess_cfg": {"size": IMAGE, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5],
                       "interpolation": "bilinear", "resize_mode": "squash"},
}


def set_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


def patch_timm_img_size() -> None:
    """Make open_clip's timm tower run at 64 px (open_clip 3.3 has no timm_model_kwargs)."""
    import timm

    create = timm.create_model

    def create_model(name: str, *a: Any, **kw: Any) -> Any:
        if name == TIMM_TOWER:
            kw.setdefault("img_size", IMAGE)
        return create(name, *a, **kw)

    timm.create_model = create_model
    import open_clip.timm_model as tm

    tm.timm.create_model = create_model


# --- measurements ----------------------------------------------------------------------------

def mm_peak(sizes: tuple[int, ...] = (1024, 2048), iters: int = 10) -> float:
    """Best torch.mm fp32 GFLOP/s over `sizes` (median of `iters` timings each)."""
    import torch

    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        for _ in range(2):
            torch.mm(a, b)
        ts = []
        for _ in range(iters):
            t = time.perf_counter()
            torch.mm(a, b)
            ts.append(time.perf_counter() - t)
        best = max(best, 2 * n**3 / statistics.median(ts) / 1e9)
    return best


def train_flops_per_sample(model: Any) -> float:
    """3x the forward FLOPs of one image-text pair (fwd + 2x bwd)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    images, tokens = torch.zeros(2, 3, IMAGE, IMAGE), torch.zeros(2, CONTEXT, dtype=torch.long)
    with FlopCounterMode(display=False) as c:
        model.encode_image(images)
        model.encode_text(tokens)
    return 3.0 * c.get_total_flops() / 2


def synthetic_batch(seed: int = 0) -> tuple[Any, Any]:
    import torch

    g = torch.Generator().manual_seed(seed)
    images = torch.randn(BATCH, 3, IMAGE, IMAGE, generator=g)
    tokens = torch.randint(1, 49406, (BATCH, CONTEXT), generator=g)
    tokens[:, 0], tokens[:, -1] = 49406, 49407
    return images, tokens


def peflow_contender(recipe_name: str, *, compile: bool = False) -> tuple[Callable[[], None], Any]:
    """peflow's training step (as `peflow.train.trainer.fit` runs it with the CLIP objective) on the tiny config.

    `compile`: `torch.compile` on `clip_forward` (model + loss), as `peflow pretrain
    --compile` (`TrainPlan.compile`) runs it.
    """
    import torch

    from peflow.models.pe import ModelPreset, build_model
    from peflow.train.losses import clamp_logit_scale, clip_forward, contrastive_loss, patch_mask
    from peflow.train.optim import build_optimizer
    from peflow.train.recipe import get_recipe

    preset = ModelPreset(name="bench-tiny", timm_base=TIMM_TOWER, image_size=IMAGE, patch_size=16, width=192,
                         depth=12, heads=3, embed_dim=EMBED, text_width=TEXT["width"], text_heads=TEXT["heads"],
                         text_layers=TEXT["layers"], context_length=CONTEXT)
    torch.manual_seed(0)
    model = build_model(preset).train()
    recipe = get_recipe(recipe_name)
    opt = build_optimizer(model, recipe, recipe.lr)  # vanilla: fused AdamW; pe: timm LAMB
    forward = torch.compile(clip_forward) if compile else clip_forward  # traces model + loss
    loss_fn = contrastive_loss()
    images, tokens = synthetic_batch()
    g = torch.Generator().manual_seed(1)

    def step() -> None:
        idx = mask = None
        if recipe.mask_reg_fraction > 0:  # as ClipObjective._mask_plan: a fraction of the batch, 40% of patches
            n = max(recipe.mask_reg_min, round(recipe.mask_reg_fraction * BATCH))
            idx = torch.randperm(BATCH, generator=g)[:n].sort().values
            mask = patch_mask(n, IMAGE // 16, IMAGE // 16, recipe.mask_ratio, g)
        opt.zero_grad(set_to_none=True)
        out = forward(model, images, tokens, loss_fn, mask_idx=idx, mask_MN=mask,
                           mask_reg_weight=recipe.mask_reg_weight)
        out.total.backward()
        opt.step()
        clamp_logit_scale(model, recipe.max_logit_scale)

    return step, model


def open_clip_contender() -> tuple[Callable[[], None], Any]:
    """open_clip's step pieces, as `open_clip_train.train.train_one_epoch` runs them (fp32, accum 1)."""
    import math

    import open_clip
    import torch
    from open_clip.loss import ClipLoss

    patch_timm_img_size()
    torch.manual_seed(0)
    cfg = OPEN_CLIP_CFG["model_cfg"]
    model = open_clip.CustomTextCLIP(embed_dim=cfg["embed_dim"], vision_cfg=cfg["vision_cfg"],
                                     text_cfg=cfg["text_cfg"], output_dict=True).train()

    # open_clip_train.main: no weight decay on gains, biases and logit_scale
    def exclude(n: str, p: Any) -> bool:
        return p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n

    named = list(model.named_parameters())
    gain = [p for n, p in named if exclude(n, p) and p.requires_grad]
    rest = [p for n, p in named if not exclude(n, p) and p.requires_grad]
    opt = torch.optim.AdamW([{"params": gain, "weight_decay": 0.0}, {"params": rest, "weight_decay": 0.2}],
                            lr=5e-4, betas=(0.9, 0.98), eps=1e-6)
    loss = ClipLoss(local_loss=False, gather_with_grad=False, cache_labels=True, rank=0, world_size=1)
    images, tokens = synthetic_batch()

    def step() -> None:
        opt.zero_grad()
        out = model(images, tokens)
        losses = loss(**out, output_dict=True)
        sum(losses.values()).backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))

    return step, model


def time_steps(step: Callable[[], None], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        step()
        out.append(time.perf_counter() - t)
    return out


# --- open_clip's own trainer in a child process ------------------------------------------------

def trainer_child(argv: list[str]) -> None:
    """Run `open_clip_train.main.main(argv)` with the timm img_size shim (child process)."""
    patch_timm_img_size()
    from open_clip_train.main import main

    main(argv)


#: glibc's environment twin of `peflow.train.host.keep_freed_memory`
MALLOC_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**31 - 1), "MALLOC_TOP_PAD_": str(64 << 20)}


def run_open_clip_trainer(steps: int, threads: int, extra_env: dict[str, str] | None = None) -> dict[str, Any]:
    """Per-step samples/s of `python -m open_clip_train.main` on the tiny config."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg_dir = Path(tmp) / "oc_tiny"
        cfg_dir.mkdir()
        (cfg_dir / "open_clip_config.json").write_text(json.dumps(OPEN_CLIP_CFG))
        argv = ["--model", f"local-dir:{cfg_dir}", "--dataset-type", "synthetic",
                "--train-num-samples", str(steps * BATCH), "--batch-size", str(BATCH), "--epochs", "1",
                "--workers", "0", "--device", "cpu", "--precision", "fp32", "--lr", "5e-4", "--warmup", "2",
                "--zeroshot-frequency", "0", "--val-frequency", "0", "--log-every-n-steps", "1",
                "--save-frequency", "0", "--report-to", "", "--logs", str(Path(tmp) / "logs"),
                "--name", "bench", "--seed", "0"]
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
                   CUDA_VISIBLE_DEVICES="", **(extra_env or {}))
        t = time.perf_counter()
        proc = subprocess.run([sys.executable, __file__, "--open-clip-trainer-child", "--", *argv],
                              env=env, capture_output=True, text=True, timeout=3600)
        wall = time.perf_counter() - t
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"open_clip_train.main failed ({proc.returncode}):\n{log[-3000:]}")
    # "... Data (t): 0.001 Batch (t): 0.512, 124.9/s, 124.9/s/gpu ..." : the rate is of this step alone
    rates = [float(m.group(2)) for m in re.finditer(r"Data \(t\): ([\d.]+) Batch \(t\): [\d.]+, ([\d.]+)/s", log)]
    data_t = [float(m.group(1)) for m in re.finditer(r"Data \(t\): ([\d.]+)", log)]
    if not rates:
        raise RuntimeError(f"no 'Batch (t)' lines in the open_clip log:\n{log[-3000:]}")
    return {"samples_per_s": rates, "data_time_avg_s": data_t[-1] if data_t else None, "wall_s": wall}


# --- main ------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=15, help="timed steps per contender per round")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps before the first round")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--recipes", default="vanilla,vanilla+compile,pe,pe+compile,pe-adamw",
                    help="peflow variants to time: <recipe>[+compile], comma-separated")
    ap.add_argument("--no-trainer", action="store_true", help="skip python -m open_clip_train.main")
    ap.add_argument("--no-trainer-malloc", action="store_true", help="skip open_clip's trainer with the allocator setting")
    ap.add_argument("--trainer-steps", type=int, default=40)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)

    set_threads(args.threads)
    import torch

    from peflow.train.host import keep_freed_memory

    keep_freed_memory()

    contenders: dict[str, tuple[Callable[[], None], Any]] = {}
    for r in [r for r in args.recipes.split(",") if r]:
        name, *opts = r.split("+")
        contenders[f"peflow/{r}"] = peflow_contender(name, compile="compile" in opts)
    contenders["open_clip/pieces"] = open_clip_contender()
    flops = {k: train_flops_per_sample(m) for k, (_, m) in contenders.items()}
    for step, _ in contenders.values():
        time_steps(step, args.warmup)

    times: dict[str, list[float]] = {k: [] for k in contenders}
    peaks = [mm_peak()]
    for _ in range(args.rounds):
        for k, (step, _) in contenders.items():
            times[k] += time_steps(step, args.steps)
        peaks.append(mm_peak())
    peak = statistics.median(peaks)

    results: dict[str, Any] = {}
    for k, ts in times.items():
        sps = BATCH / statistics.median(ts)
        results[k] = {"samples_per_s": sps, "step_s_median": statistics.median(ts), "steps": len(ts),
                      "train_gflop_per_sample": flops[k] / 1e9,
                      "gflop_per_s": sps * flops[k] / 1e9, "fraction_of_mm_peak": sps * flops[k] / 1e9 / peak}
    trainers = [] if args.no_trainer else [("open_clip/trainer", None)] + (
        [] if args.no_trainer_malloc else [("open_clip/trainer+malloc", MALLOC_ENV)])
    for key, env in trainers:
        tr = run_open_clip_trainer(args.trainer_steps, args.threads, env)
        steady = tr["samples_per_s"][min(args.warmup, len(tr["samples_per_s"]) - 1):]
        sps = statistics.median(steady)
        f = flops["open_clip/pieces"]
        results[key] = {"samples_per_s": sps, "steps": len(steady), "data_time_avg_s": tr["data_time_avg_s"],
                        "train_gflop_per_sample": f / 1e9, "gflop_per_s": sps * f / 1e9,
                        "fraction_of_mm_peak": sps * f / 1e9 / peak}
        peaks.append(mm_peak())

    base_key = "open_clip/trainer" if "open_clip/trainer" in results else "open_clip/pieces"
    ratios = {f"{k} / {base}": results[k]["samples_per_s"] / results[base]["samples_per_s"]
              for base in (base_key, "open_clip/trainer+malloc") if base in results
              for k in results if k.startswith("peflow/")}
    report = {
        "config": {"timm_tower": TIMM_TOWER, "image_size": IMAGE, "batch": BATCH, "text": TEXT, "embed_dim": EMBED,
                   "precision": "fp32", "threads": args.threads, "steps_per_round": args.steps,
                   "rounds": args.rounds},
        "machine": {"cpu": platform.processor() or platform.machine(), "python": platform.python_version(),
                    "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                    "load_avg": os.getloadavg()},
        "mm_peak_gflop_per_s": peak, "mm_peak_samples": peaks,
        "results": results, "ratios": ratios,
        "note": "" if "open_clip/trainer" in results else "open_clip trainer skipped; ratio against its step pieces",
    }
    print(f"torch.mm peak: {peak:.0f} GFLOP/s ({args.threads} threads; samples {[round(p) for p in peaks]})")
    for k, r in results.items():
        print(f"{k:<20} {r['samples_per_s']:7.1f} samples/s  {r['gflop_per_s']:6.1f} GFLOP/s  "
              f"{100 * r['fraction_of_mm_peak']:5.1f}% of mm peak  ({r['train_gflop_per_sample']:.3f} GFLOP/sample)")
    for k, v in ratios.items():
        print(f"ratio {k}: {v:.2f}x")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"-> {out}")
    return report


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--open-clip-trainer-child":
        trainer_child(sys.argv[3:] if sys.argv[2:3] == ["--"] else sys.argv[2:])
    else:
        main()
