"""The video data engine (paper section 2.2, step 3): one caption per video from the captioner
and a summarizer.

Per video: decode only the `frames` uniformly sampled frames (decoding stops at the last);
the refined captioner captions the clip (all frames, in order) and the base captioner (an
image captioner, as the paper takes frame captions from one; the refined one when the
folder has no `base/`) captions `key_frames` of them on their own (first, middle, last...);
the summarizer (`rules`, the deterministic CPU default, or
`llm`: any Hugging Face causal LM with a chat template, prompted as the paper) fuses the
clip caption, the frame captions and the video's title and description into one caption.
Videos that do not decode (truncated, zero bytes, another codec) are quarantined with the
reason; the others keep every entry, bytes unchanged, with `model_caption` filled in.

Scored on the held-out split's human captions (`eval_split`): the engine's captions
(`engine/`), the clip captions alone (`clip/`) and the web text (`metadata/`, title +
description: what finetuning without the engine learns from): BLEU-4, CIDEr, attribute recall.
Throughput per step (`speed/`): decode, caption, summarize, in videos/s.

Outputs (a corpus in PVD layout, readable by peflow.data.formats):
  OUT/video/<split>/shard-*.tar   every decodable video, json with model_caption and
                                  engine {clip_caption, frame_captions, summarizer}
  OUT/card.json                   the input card, with the engine's settings
  OUT/quarantine.jsonl            videos that did not decode: split, shard, key, reason
  OUT/examples.json               held-out videos: human, engine, clip and frame captions, title
  OUT/metrics.json, OUT/manifest.json
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peflow.config import opt
from peflow.stages.base import Result


def _backends() -> list[str]:
    from peflow.engine.summarize import BACKENDS

    return list(BACKENDS)


@dataclass(kw_only=True)
class Config:
    """Options of `peflow caption`."""

    captioner: str = opt("", "Captioner folder (the train-captioner stage's output).")
    data: str = opt("", "Corpus with video shards to caption (the validate stage's output).")
    out: str = opt("", "Output folder: the videos with model captions, quarantine.jsonl, examples.json.")
    splits: str = opt("train,val,test", "Comma-separated video splits to caption.")
    frames: int = opt(8, "Frames per clip, uniformly sampled, in order.", min=1)
    key_frames: int = opt(3, "Sampled frames also captioned on their own (evenly spread: first, middle, last).",
                          min=0)
    summarizer: str = opt("rules", "How clip caption, frame captions, title and description become one caption: "
                                   "rules (deterministic) or llm.", choices=_backends)
    summarizer_model: str = opt("", "The llm summarizer's Hugging Face model id or local folder (with a chat "
                                    "template).")
    max_words: int = opt(80, "Longest caption of the rules summarizer, in words.", min=1)
    max_new_tokens: int = opt(80, "Longest generated clip or frame caption, in LM tokens.", min=1)
    eval_split: str = opt("test", "Split whose human captions score the engine.")
    batch_size: int = opt(64, "Clips per captioner batch.", min=1, key=False)
    progress: bool = opt(True, "Show a progress bar.", key=False)

    def validate(self) -> None:
        if self.summarizer == "llm" and not self.summarizer_model:
            raise ValueError("summarizer llm needs summarizer_model (a Hugging Face model id or local folder)")


def key_frame_indices(frames: int, key_frames: int) -> list[int]:
    """Which of the sampled frames are captioned on their own: evenly spread, first and last included."""
    from peflow.data.formats import frame_indices

    return sorted(set(frame_indices(frames, key_frames))) if key_frames else []


class _Speed:
    """Seconds and videos per engine step."""

    def __init__(self) -> None:
        self.seconds = {"decode": 0.0, "caption": 0.0, "summarize": 0.0}
        self.videos = 0

    def timed(self, step: str, fn: Any, *args: Any, **kw: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*args, **kw)
        finally:
            self.seconds[step] += time.perf_counter() - t0

    def metrics(self) -> dict[str, float]:
        out = {f"speed/{k}_videos_per_s": (self.videos / s if s else 0.0) for k, s in self.seconds.items()}
        out.update({f"speed/{k}_seconds": round(s, 3) for k, s in self.seconds.items()})
        return out


def _caption_batch(model: Any, frame_model: Any, summarizer: Any, cfg: Config, batch: list[tuple[dict, Any]],
                   speed: _Speed) -> list[dict[str, Any]]:
    """Engine records of one batch of decoded videos: clip caption, frame captions, fused caption."""
    import numpy as np

    from peflow.engine.clips import caption_clips
    from peflow.engine.summarize import EngineInput

    clips = [v["frames"] for _, v in batch]
    keys = key_frame_indices(len(clips[0]), cfg.key_frames)
    clip_caps = speed.timed("caption", caption_clips, model, clips, batch_size=cfg.batch_size,
                            max_new_tokens=cfg.max_new_tokens)
    singles = [c[i:i + 1] for c in clips for i in keys if i < len(c)]
    frame_caps = speed.timed("caption", caption_clips, frame_model, singles, batch_size=cfg.batch_size * 3,
                             max_new_tokens=cfg.max_new_tokens) if singles else []
    per = np.cumsum([0] + [len([i for i in keys if i < len(c)]) for c in clips])
    inputs = [EngineInput(clip_caption=clip_caps[n], frame_captions=tuple(frame_caps[per[n]:per[n + 1]]),
                          title=v["meta"].get("title") or "", description=v["meta"].get("description") or "")
              for n, (_, v) in enumerate(batch)]
    fused = speed.timed("summarize", summarizer.summarize, inputs)
    return [{"clip_caption": x.clip_caption, "frame_captions": list(x.frame_captions), "model_caption": f}
            for x, f in zip(inputs, fused)]


def run(cfg: Config, out: Path) -> Result:
    """Caption every video of `cfg.splits` into `out` (the runner's staging folder)."""
    import mlflow

    from peflow.config import InputError
    from peflow.data.formats import decode_video_sample, find_shards, load_card
    from peflow.data.synth.writers import ShardWriter, json_bytes
    from peflow.engine.clips import BASE, web_text
    from peflow.engine.metrics import caption_metrics
    from peflow.engine.summarize import get_summarizer
    from peflow.models.vlm import load_vlm
    from peflow.validation.shards import iter_raw

    try:
        model = load_vlm(cfg.captioner)
        base = Path(cfg.captioner) / BASE
        frame_model = load_vlm(base) if (base / "vlm.json").is_file() else model
    except ValueError as e:
        raise InputError(f"captioner: {e}") from None
    summarizer = get_summarizer(cfg.summarizer, model=cfg.summarizer_model, max_words=cfg.max_words)
    try:
        shards = find_shards(cfg.data, "video")
    except FileNotFoundError as e:
        raise InputError(f"data {cfg.data}: {e}") from None
    splits = [s.strip() for s in cfg.splits.split(",") if s.strip()]
    missing = [s for s in splits if s not in shards]
    if missing:
        raise InputError(f"data {cfg.data}: no video split(s) {missing} (its video splits: {', '.join(shards)})")
    card = load_card(cfg.data) if (Path(cfg.data) / "card.json").is_file() else {}
    per_shard = int(card.get("shard_size", {}).get("video", 100))
    total = sum(_count(p) for s in splits for p in shards[s])
    bar = _bar(cfg.progress, total)
    speed, quarantine, counts, scored = _Speed(), [], {}, []
    try:
        for split in splits:
            with ShardWriter(out / "video" / split, per_shard) as writer:
                batch: list[tuple[dict, Any]] = []

                def flush() -> None:
                    for (raw, v), rec in zip(batch, _caption_batch(model, frame_model, summarizer, cfg, batch, speed)):
                        meta = {**v["meta"], "model_caption": rec["model_caption"],
                                "engine": {"clip_caption": rec["clip_caption"], "frame_captions":
                                           rec["frame_captions"], "summarizer": summarizer.name}}
                        entries = {k: val for k, val in raw.items() if not k.startswith("__")}
                        writer.write(raw["__key__"], {**entries, "json": json_bytes(meta)})
                        if split == cfg.eval_split and meta.get("human_caption"):
                            scored.append(meta)
                    speed.videos += len(batch)
                    if bar:
                        bar[0].advance(bar[1], len(batch))
                    batch.clear()

                n = 0
                for path in shards[split]:
                    rel = Path(path).relative_to(Path(cfg.data)).as_posix() if Path(path).is_absolute() else path
                    for raw, error in iter_raw(str(path)):
                        if raw is None:
                            quarantine.append({"split": split, "shard": rel, "key": None, "reason": error})
                            continue
                        try:
                            v = speed.timed("decode", decode_video_sample, raw, num_frames=cfg.frames)
                        except Exception as e:  # noqa: BLE001  (any decode failure is the video's, not ours)
                            quarantine.append({"split": split, "shard": rel, "key": raw.get("__key__"),
                                               "reason": f"media_undecodable: {type(e).__name__}: {e}"})
                            if bar:
                                bar[0].advance(bar[1], 1)
                            continue
                        batch.append((raw, v))
                        n += 1
                        if len(batch) == cfg.batch_size:
                            flush()
                if batch:
                    flush()
                counts[f"videos/{split}"] = n
    finally:
        if bar:
            bar[0].stop()
    if not speed.videos:
        raise InputError(f"data {cfg.data}: no decodable video in splits {splits} "
                         f"({len(quarantine)} quarantined; first: {quarantine[0]['reason'] if quarantine else '-'})")

    metrics: dict[str, float] = dict(speed.metrics())
    metrics["quarantined"] = float(len(quarantine))
    if scored:
        metrics.update({f"engine/{k}": v for k, v in caption_metrics([m["model_caption"] for m in scored],
                                                                      scored).items()})
        metrics.update({f"clip/{k}": v for k, v in caption_metrics([m["engine"]["clip_caption"] for m in scored],
                                                                    scored).items()})
        metrics.update({f"metadata/{k}": v for k, v in caption_metrics([web_text(m) for m in scored],
                                                                        scored).items()})
    examples = [{"key": m["video_id"], "action": m.get("category"), "human": m["human_caption"],
                 "engine": m["model_caption"], "clip": m["engine"]["clip_caption"],
                 "frames": " | ".join(m["engine"]["frame_captions"]), "title": m.get("title")} for m in scored]
    (out / "examples.json").write_text(json.dumps(examples, indent=1) + "\n")
    if examples:
        mlflow.log_table({k: [e[k] for e in examples[:50]] for k in examples[0]}, artifact_file="engine_examples.json")
    (out / "quarantine.jsonl").write_text("".join(json.dumps(q) + "\n" for q in quarantine))
    engine_card = {**card, "engine": {"captioner": str(cfg.captioner), "summarizer": summarizer.name,
                                      "frames": cfg.frames, "key_frames": cfg.key_frames}}
    (out / "card.json").write_text(json.dumps(engine_card, indent=2, sort_keys=True) + "\n")
    _report(metrics, speed, quarantine, cfg)
    return Result(metrics=metrics, counts={**counts, "quarantined": len(quarantine), "scored": len(scored)},
                  artifacts=("examples.json", "quarantine.jsonl", "metrics.json"),
                  tags={"peflow.summarizer": summarizer.name})


def _count(path: str) -> int:
    """Videos in one shard (tar members ending in a video extension)."""
    import tarfile

    from peflow.data.formats import VIDEO_EXTS

    try:
        with tarfile.open(path) as tar:
            return sum(1 for m in tar if m.isfile() and m.name.partition(".")[2].lower() in VIDEO_EXTS)
    except (OSError, tarfile.TarError):
        return 0


def _bar(show: bool, total: int) -> Any:
    if not show:
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("caption"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    task = bar.add_task("", total=total)
    bar.start()
    return bar, task


def _report(metrics: dict[str, float], speed: _Speed, quarantine: list, cfg: Config) -> None:
    line = (f"caption: {speed.videos} videos ({len(quarantine)} quarantined); videos/s decode "
            f"{metrics['speed/decode_videos_per_s']:.1f}, caption {metrics['speed/caption_videos_per_s']:.1f}, "
            f"summarize {metrics['speed/summarize_videos_per_s']:.1f}")
    print(line + f" -> {cfg.out}")
    for src in ("metadata", "clip", "engine"):
        if f"{src}/bleu4" in metrics:
            print(f"  {src:8s} vs human ({cfg.eval_split}): BLEU-4 {metrics[f'{src}/bleu4']:.3f} CIDEr "
                  f"{metrics[f'{src}/cider']:.3f} shape {metrics[f'{src}/recall_shape']:.0%} colour "
                  f"{metrics[f'{src}/recall_colour']:.0%} action {metrics[f'{src}/recall_action']:.0%}")
