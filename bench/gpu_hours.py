"""GPU-hours of the GPU presets' stages, estimated from FLOPs per sample and a stated MFU.

    python bench/gpu_hours.py [--mfu 0.4] [--peak-tflops 989]

FLOPs per image-text pair are counted by peflow's own counter (`torch.utils.flop_counter`
over the model's image and text towers, 3x the forward for training) on the meta device,
so no weights are allocated; pretraining is weighted by its progressive-resolution
schedule. The other training stages are estimated as (steps x global batch x frames)
image-tower passes at the model's image size: an upper bound for stages that train less
than the whole tower. GPU-hours = FLOPs / (MFU x peak). Prints a markdown table and
writes bench/results/gpu_hours.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from peflow import presets
from peflow.models.pe import build_model
from peflow.models.presets import get_model_preset
from peflow.train.objectives.clip import flops_per_sample
from peflow.train.recipe import parse_resolutions

GPU_PRESETS = ("b16", "l14", "g14")
#: stage -> config fields multiplied into image passes (frames default 1)
OTHER_STAGES = ("train-captioner", "finetune-video", "align-lang", "align-spatial")


def image_flops(model: torch.nn.Module, resolution: int) -> float:
    """Training FLOPs of one image through the image tower (3x forward)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        model.encode_image(torch.zeros(1, 3, resolution, resolution, device="meta"))
    return 3.0 * counter.get_total_flops()


def stage_costs(name: str) -> dict[str, dict[str, float]]:
    """{stage: {samples, flops}} of one pipeline preset's training stages."""
    pipe = presets.get(name)
    pre = pipe.config("pretrain")
    mp = get_model_preset(pre.model)
    with torch.device("meta"):
        model = build_model(pre.model)
    schedule = parse_resolutions(pre.resolutions) if pre.resolutions else [(mp.image_size, 1.0)]
    samples = float(pre.steps) * pre.global_batch
    per_pair = sum(frac * flops_per_sample(model, res, mp.context_length) for res, frac in schedule)
    out = {"pretrain": {"samples": samples, "flops": samples * per_pair, "flops_per_sample": per_pair}}
    per_image = image_flops(model, mp.image_size)
    for stage in OTHER_STAGES:
        cfg = pipe.config(stage)
        steps = sum(getattr(cfg, f, 0) or 0 for f in ("steps", "base_steps", "refined_steps", "warmup_steps"))
        n = float(steps) * cfg.global_batch * (getattr(cfg, "frames", 1) or 1)
        out[stage] = {"samples": n, "flops": n * per_image, "flops_per_sample": per_image}
    return out


def _hours(h: float) -> str:
    return f"{h:,.0f}" if h >= 10 else f"{h:.2g}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mfu", type=float, default=0.40, help="model FLOPs utilisation assumed")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense peak per GPU (H100/H200 SXM: 989)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "gpu_hours.json"))
    a = p.parse_args()
    rate = a.mfu * a.peak_tflops * 1e12
    rows, doc = [], {"mfu": a.mfu, "peak_tflops": a.peak_tflops, "presets": {}}
    for name in (n for n in GPU_PRESETS if n in presets.names()):
        costs = stage_costs(name)
        for c in costs.values():
            c["gpu_hours"] = c["flops"] / rate / 3600
        doc["presets"][name] = {"nodes": presets.get(name).nodes, "stages": costs}
        rows.append((name, presets.get(name).nodes, costs))
    stages = ["pretrain", *OTHER_STAGES]
    print(f"GPU-hours at {a.mfu:.0%} MFU of {a.peak_tflops:.0f} TFLOPS (bf16)\n")
    print("| preset | nodes | " + " | ".join(stages) + " | wall-clock on the preset's nodes |")
    print("|---" * (len(stages) + 3) + "|")
    for name, nodes, costs in rows:
        gpus = int(nodes.split("x")[0]) * int(nodes.split("x")[1])
        total = sum(c["gpu_hours"] for c in costs.values())
        cells = " | ".join(_hours(costs[s]["gpu_hours"]) for s in stages)
        print(f"| {name} | {nodes} | {cells} | {total / gpus / 24:,.1f} days on {gpus} GPUs |")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
