"""Control experiment: how fast can the nano vision tower learn shape at all?

Trains, with the shape labels themselves (cross-entropy, no captions), either the
nano preset's vision tower (the timm PE ViT of `peflow.models`, plus a linear
head) or a small CNN (four conv-BN-ReLU-maxpool blocks, global average pool) on
the corpus's train images, then reports top-1 on the test split overall and
split by colour typicality (docs/metrics.md). It bounds what CLIP pretraining of
the same tower can reach on this budget: if labels cannot teach the tower shape
in N steps, captions will not either.

    python bench/shape_control.py --data data/synth --arch nano --steps 600
    python bench/shape_control.py --data data/synth --arch cnn --steps 600

Run contenders one after the other (or with --threads 1 each): two 2-thread jobs
on 2 cores slow each other down many times over.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from peflow.data.formats import iter_image_text, label_names, load_card, shard_paths
from peflow.evaluate.labelsets import primary


def load_split(root: str, split: str, size: int) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
    """uint8 images [N, S, S, 3], labels [N], sample jsons."""
    images, labels, metas = [], [], []
    for s in iter_image_text(shard_paths(root, split)):
        images.append(np.asarray(s["image"].convert("RGB").resize((size, size))))
        labels.append(int(s["meta"]["label_id"]))
        metas.append(s["meta"])
    return torch.from_numpy(np.stack(images)), torch.tensor(labels), metas


def to_input(x_NSSC: torch.Tensor) -> torch.Tensor:
    return x_NSSC.permute(0, 3, 1, 2).float().div(255).sub(0.5).div(0.5)


def build(arch: str, classes: int) -> nn.Module:
    if arch == "cnn":
        def block(i: int, o: int) -> nn.Module:
            return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(), nn.MaxPool2d(2))

        return nn.Sequential(block(3, 32), block(32, 64), block(64, 64), block(64, 64), nn.AdaptiveAvgPool2d(1),
                             nn.Flatten(), nn.Linear(64, classes))
    from peflow.models.pe import build_model, get_model_preset

    return nn.Sequential(build_model(arch).visual, nn.Linear(get_model_preset(arch).embed_dim, classes))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="corpus folder (a `peflow synth` output)")
    ap.add_argument("--arch", default="nano", help="a peflow model preset (its vision tower) or `cnn`")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--size", type=int, default=64, help="input resolution")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="also write the result as JSON here")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    classes = label_names(args.data)
    typical = load_card(args.data).get("typical_colours") or {}
    x_train, y_train, _ = load_split(args.data, "train", args.size)
    x_test, y_test, metas = load_split(args.data, "test", args.size)
    model = build(args.arch, len(classes)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1)
    warmup, g = 50, torch.Generator().manual_seed(args.seed)
    t0 = time.perf_counter()
    for step in range(args.steps):
        scale = min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for group in opt.param_groups:
            group["lr"] = args.lr * scale
        idx = torch.randint(0, len(y_train), (args.batch,), generator=g)
        loss = F.cross_entropy(model(to_input(x_train[idx])), y_train[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step:5d}  loss {loss.item():.3f}  {time.perf_counter() - t0:6.1f}s", flush=True)
    seconds = time.perf_counter() - t0

    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(to_input(x_test[i:i + 256])).argmax(-1) for i in range(0, len(y_test), 256)])
    correct = (pred == y_test).float()
    result = {"arch": args.arch, "steps": args.steps, "batch": args.batch, "seconds": round(seconds, 1),
              "test_top1": correct.mean().item(), "chance": 1 / len(classes)}
    if typical:
        is_typ = torch.tensor([primary(m).get("colour") == typical.get(classes[y]) for m, y in
                               zip(metas, y_test.tolist())])
        result["top1_typical_colour"] = correct[is_typ].mean().item()
        result["top1_atypical_colour"] = correct[~is_typ].mean().item()
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
