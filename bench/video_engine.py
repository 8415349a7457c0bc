"""The video data engine's throughput per step: decode, caption, summarize, in videos/s, at
two corpus sizes (1x and 4x videos), so a user sees how each step grows.

    python bench/video_engine.py --captioner RUN/train-captioner --data RUN/validate
    python bench/video_engine.py --captioner ... --data ... --videos 100 --summarizer llm --summarizer-model DIR

Each size runs the caption stage's own per-batch code (`peflow.stages.caption`) on the first
N train videos (the 4x run cycles through them when the split is smaller) and times each step
separately; the sizes run back to back in one process, so the load on the machine is the same
for both. Writes bench/results/video_engine.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--captioner", required=True, help="a train-captioner output folder")
    ap.add_argument("--data", required=True, help="a corpus with a video train split")
    ap.add_argument("--videos", type=int, default=120, help="videos of the 1x size (default 120)")
    ap.add_argument("--summarizer", default="rules", choices=("rules", "llm"))
    ap.add_argument("--summarizer-model", default="")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "video_engine.json"))
    args = ap.parse_args()

    import torch

    from peflow.data.formats import decode_video_sample, shard_paths
    from peflow.engine.summarize import get_summarizer
    from peflow.models.vlm import load_vlm
    from peflow.stages.caption import Config, _caption_batch, _Speed
    from peflow.validation.shards import iter_raw

    cfg = Config(captioner=args.captioner, data=args.data, summarizer=args.summarizer,
                 summarizer_model=args.summarizer_model, progress=False)
    model = load_vlm(args.captioner)
    base = Path(args.captioner) / "base"
    frame_model = load_vlm(base) if (base / "vlm.json").is_file() else model
    summarizer = get_summarizer(cfg.summarizer, model=cfg.summarizer_model, max_words=cfg.max_words)
    raws = [raw for path in shard_paths(args.data, "train", kind="video") for raw, _ in iter_raw(path) if raw]
    if not raws:
        raise SystemExit(f"{args.data}: no train videos")
    results = {}
    for factor in (1, 4):
        n = args.videos * factor
        speed, batch = _Speed(), []
        t0 = time.perf_counter()
        for i in range(n):
            raw = raws[i % len(raws)]
            batch.append((raw, speed.timed("decode", decode_video_sample, raw, num_frames=cfg.frames)))
            if len(batch) == cfg.batch_size or i == n - 1:
                _caption_batch(model, frame_model, summarizer, cfg, batch, speed)
                speed.videos += len(batch)
                batch = []
        m = speed.metrics()
        results[f"{factor}x"] = {"videos": n, "wall_s": round(time.perf_counter() - t0, 2),
                                 **{k.removeprefix("speed/"): round(v, 2) for k, v in m.items()}}
        print(f"{factor}x ({n} videos): " + ", ".join(f"{s} {m[f'speed/{s}_videos_per_s']:.1f} videos/s "
                                                     f"({m[f'speed/{s}_seconds']:.1f} s)"
                                                     for s in ("decode", "caption", "summarize")))
    for s in ("decode", "caption", "summarize"):
        one, four = results["1x"][f"{s}_seconds"], results["4x"][f"{s}_seconds"]
        results[f"{s}_time_ratio_4x_over_1x"] = round(four / one, 2) if one else None
    report = {"bench": "video_engine", "host": platform.node(), "cpus": os.cpu_count(),
              "torch_threads": torch.get_num_threads(), "load_avg": os.getloadavg(), "summarizer": args.summarizer,
              "captioner": Path(args.captioner).name, "results": results}  # no path of this machine
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"time 4x / 1x: " + ", ".join(f"{s} {results[f'{s}_time_ratio_4x_over_1x']}"
                                        for s in ("decode", "caption", "summarize")) + f" -> {args.out}")


if __name__ == "__main__":
    main()
