"""Train the video data engine's captioner (paper section 2.2, steps 1-2): a PLM-style
vision-language model on the frozen PE-core from pretrain.

Model (`peflow.models.vlm`): PE-core's tower cut after block `layer`, its patch tokens
through transformers' PerceptionLM projector (Linear-GELU-Linear, 2x2 pooling) into a causal
LM, frames in order. `lm: tiny` builds a small Llama from a config with a byte-level BPE
tokenizer trained on the corpus text; any other value is a Hugging Face causal LM by hub id
or local folder. The tower stays frozen, so its tokens are computed once.

Two phases, as the paper's engine:
  1. base: image captions (an image is a one-frame clip) and the videos' web text
     (title + description: noisy, partly wrong, as web video text is);
  2. refined: finetuned on the human-refined captions of the train videos that have one,
     with image captions replayed (`replay_images`) so frame captioning is not forgotten.
Each phase is scored on held-out human captions (`eval_split`): BLEU-4, CIDEr and attribute
recall (shape, colour, action named correctly) under `base/` and `refined/` (the paper's
Tab. 1 finds the human data improves the captioner).

Outputs:
  OUT/vlm.json, OUT/vlm.safetensors, OUT/lm/   the refined captioner (peflow.models.vlm.load_vlm)
  OUT/base/                                    the base captioner (phase 1): the engine's frame captioner
  OUT/examples.json                            held-out clips: human caption, base and refined captions
  OUT/history.jsonl, OUT/loss.png, OUT/metrics.json, OUT/manifest.json
  OUT.ckpt/base/, OUT.ckpt/refined/            resumable checkpoints per phase
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peflow.config import opt
from peflow.stages.base import Result


@dataclass(kw_only=True)
class Config:
    """Options of `peflow train-captioner`."""

    checkpoint: str = opt("", "PE-core model whose tower the captioner reads (the pretrain stage's output).")
    data: str = opt("", "Corpus with image and video shards (the validate stage's output).")
    out: str = opt("", "Output folder for the captioner; checkpoints go to OUT.ckpt beside it.")
    layer: int = opt(2, "PE block whose patch tokens the captioner reads (1 = first; negative counts from the "
                        "end). On the nano model block 2 of 6 beat the last for action and shape.")
    pooling: int = opt(2, "Token pooling per side in the projector (2 = 2x2, as PLM; the token grid must divide).",
                       min=1)
    frames: int = opt(8, "Frames per clip, uniformly sampled, in order.", min=1)
    lm: str = opt("tiny", "Causal LM: 'tiny' (a small Llama built from a config, tokenizer trained on the corpus "
                          "text) or a Hugging Face model id or local folder.")
    lm_layers: int = opt(2, "Layers of the tiny LM.", min=1)
    lm_width: int = opt(128, "Hidden width of the tiny LM.", min=8)
    vocab_size: int = opt(1024, "BPE vocabulary of the tiny LM's tokenizer.", min=300)
    base_steps: int = opt(300, "Phase 1 (base) steps: image captions and video web text.", min=0)
    refined_steps: int = opt(600, "Phase 2 (refined) steps: human-refined video captions.", min=0)
    base_images: int = opt(4000, "Image-caption pairs of phase 1 (the first N of the train split).", min=0)
    replay_images: float = opt(0.25, "Phase 2: image captions mixed in, as a fraction of its video examples.",
                               min=0.0)
    global_batch: int = opt(32, "Clips per step.", min=1)
    lr: float = opt(2e-3, "Peak learning rate (AdamW; warm-up then cosine, per phase).", min=0.0)
    warmup_steps: int = opt(20, "Linear warm-up steps of each phase.", min=0)
    max_text_tokens: int = opt(96, "Longest caption, in LM tokens (longer ones are cut).", min=8)
    max_new_tokens: int = opt(80, "Longest generated caption when scoring, in LM tokens.", min=1)
    eval_split: str = opt("test", "Held-out video split whose human captions score each phase.")
    eval_videos: int = opt(160, "Held-out videos scored (the first N with a human caption).", min=1)
    seed: int = opt(0, "Seed of initialisation and data order.")
    checkpoint_every: int = opt(100, "Write a resumable checkpoint every N steps (and at each phase's end).",
                                min=1, key=False)
    threads: int = opt(0, "torch threads (0: torch's default).", min=0, key=False)
    log_model: bool = opt(True, "Log the captioner as an MLflow model and register it (peflow-captioner).",
                          key=False)
    progress: bool = opt(True, "Show progress bars.", key=False)


def _texts(images: list[Any], videos: list[Any]) -> list[str]:
    """What the tokenizer is trained on: every caption and web text of the train split."""
    out = [c.caption for c in images]
    for c in videos:
        out += [c.meta.get("title") or "", c.meta.get("description") or "", c.meta.get("human_caption") or ""]
    return [t for t in out if t]


def _phase(model: Any, cfg: Config, out: str, name: str, steps: int, bank: Any, ids: Any, targets: list[str],
           on_step: Any, offset: int = 0) -> list[dict[str, Any]]:
    """Train one phase (resuming from OUT.ckpt/<name>); history rows carry the phase and the step counted
    over both phases (`offset` = the steps before this phase)."""
    from peflow.train.checkpoint import ckpt_dir
    from peflow.train.objectives.captioner import CaptionObjective
    from peflow.train.trainer import Dist, TrainSettings, fit

    if steps == 0:
        return []
    settings = TrainSettings(ckpt_dir=ckpt_dir(out) / name, steps=steps, global_batch=cfg.global_batch,
                             lr=cfg.lr, warmup_steps=min(cfg.warmup_steps, steps), seed=cfg.seed,
                             checkpoint_every=cfg.checkpoint_every)
    objective = CaptionObjective(model, bank, ids, targets, max_len=cfg.max_text_tokens, name=f"captioner {name}")
    _, history = fit(objective, settings, Dist(), progress=cfg.progress)
    rows = [{**row, "phase": name, "step": row["step"] + offset} for row in history]
    for row in rows:
        on_step(row)
    return rows


def _score(model: Any, cfg: Config, clips: list[Any]) -> tuple[dict[str, float], list[str]]:
    from peflow.engine.clips import caption_clips
    from peflow.engine.metrics import caption_metrics

    model.eval()
    captions = caption_clips(model, [c.frames for c in clips], max_new_tokens=cfg.max_new_tokens)
    return caption_metrics(captions, [c.meta for c in clips]), captions


def run(cfg: Config, out: Path) -> Result:
    """Train both phases (resuming from OUT.ckpt), score each, and write the refined captioner to `out`."""
    import random

    import mlflow
    import torch

    from peflow.config import InputError
    from peflow.engine.clips import BASE, read_clips, read_images, vision_bank, web_text
    from peflow.models.lm import TinyLM, new_lm
    from peflow.models.pe import load_model, resolve_checkpoint
    from peflow.models.vlm import build_vlm
    from peflow.train.report import StepLogger, loss_plot

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    images = read_images(cfg.data, "train", limit=cfg.base_images) if cfg.base_images else []
    videos = read_clips(cfg.data, "train", frames=cfg.frames)
    held_out = [c for c in read_clips(cfg.data, cfg.eval_split, frames=cfg.frames) if c.meta.get("human_caption")]
    held_out = held_out[:cfg.eval_videos]
    human = [c for c in videos if c.meta.get("human_caption")]
    if not human:
        raise InputError(f"data {cfg.data}: no train video has a human caption (phase 2 has nothing to learn from)")
    if not held_out:
        raise InputError(f"data {cfg.data}: no {cfg.eval_split} video has a human caption to score against")
    torch.manual_seed(cfg.seed)
    lm, tokenizer = new_lm(cfg.lm, _texts(images, videos),
                           TinyLM(layers=cfg.lm_layers, hidden=cfg.lm_width, vocab_size=cfg.vocab_size))
    model = build_vlm(load_model(resolve_checkpoint(cfg.checkpoint)), lm, tokenizer, layer=cfg.layer,
                      pooling=cfg.pooling, max_frames=max(cfg.frames, 1))
    model.tower.requires_grad_(False)

    n_replay = min(len(images), round(cfg.replay_images * len(human)))
    replay = random.Random(cfg.seed).sample(images, n_replay) if n_replay else []
    groups = [images + videos, human + replay, held_out]
    bank, (base_ids, refined_ids, _) = vision_bank(model, groups)
    base_targets = [c.caption for c in images] + [web_text(c.meta) or c.meta.get("category", "") for c in videos]
    refined_targets = [c.meta["human_caption"] for c in human] + [c.caption for c in replay]

    logger = StepLogger(mlflow.active_run())
    history = _phase(model, cfg, cfg.out, "base", cfg.base_steps, bank, base_ids, base_targets, logger)
    metrics: dict[str, float] = {}
    base_metrics, base_caps = _score(model, cfg, held_out)
    model.save(out / BASE, extra={"stage": "train-captioner", "phase": "base", "lm_source": cfg.lm})
    history += _phase(model, cfg, cfg.out, "refined", cfg.refined_steps, bank, refined_ids, refined_targets, logger,
                      offset=cfg.base_steps)
    refined_metrics, refined_caps = _score(model, cfg, held_out)
    logger.flush()
    metrics.update({f"base/{k}": v for k, v in base_metrics.items()})
    metrics.update({f"refined/{k}": v for k, v in refined_metrics.items()})
    for phase in ("base", "refined"):
        rows = [r for r in history if r["phase"] == phase]
        if rows:
            metrics[f"{phase}/final_loss"] = float(rows[-1]["loss"])

    model.save(out, extra={"stage": "train-captioner", "lm_source": cfg.lm})
    examples = [{"key": c.key, "action": c.meta.get("category"), "human": c.meta["human_caption"], "base": b,
                 "refined": r} for c, b, r in zip(held_out, base_caps, refined_caps)]
    (out / "examples.json").write_text(json.dumps(examples, indent=1) + "\n")
    mlflow.log_table({k: [e[k] for e in examples[:50]] for k in examples[0]}, artifact_file="caption_examples.json")
    (out / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))
    if history:
        loss_plot(history, out / "loss.png")
    print(f"train-captioner: held-out {cfg.eval_split} ({len(held_out)} videos): "
          + "; ".join(f"{p} BLEU-4 {metrics[f'{p}/bleu4']:.3f} CIDEr {metrics[f'{p}/cider']:.3f} "
                      f"shape {metrics[f'{p}/recall_shape']:.0%} colour {metrics[f'{p}/recall_colour']:.0%} "
                      f"action {metrics[f'{p}/recall_action']:.0%}" for p in ("base", "refined")))
    counts = {"base_images": len(images), "base_videos": len(videos), "refined_videos": len(human),
              "refined_replay_images": len(replay), "held_out_videos": len(held_out),
              "vocab": len(tokenizer), "parameters": sum(p.numel() for p in model.parameters())}
    return Result(metrics=metrics, counts=counts, model=model if cfg.log_model else None,
                  artifacts=("examples.json", "loss.png", "metrics.json"),
                  tags={"peflow.lm": cfg.lm, "peflow.layer": str(model.layer)})
