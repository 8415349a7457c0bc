"""PE lang (paper section 4): align PE-core's intermediate features to a language model, then
extract the encoder.

Model (`peflow.models.vlm`): PE-core's tower cut after block `layer` (the later blocks, the
final norm and the head dropped), LayerScale (new gammas at `layer_scale`, paper 0.1) and
DropPath (`drop_path`, paper 0.1) added on it; its patch tokens (CLS stripped) through
transformers' PerceptionLM projector (2-layer MLP, 2x2 pooling) into a causal LM (`lm: tiny`,
a small Llama with a BPE tokenizer trained on the corpus text; any Hugging Face causal LM by
hub id or local folder at scale).

Layer: a number (negative counts from the end) or `auto`: a quick frozen probe
(`peflow.evaluate.qa.qa_probe_layers`: each layer's class token and 2x2-pooled grid predict the
image questions' answers by logistic regression) ranks the layers and the best is taken; the
scores and the choice are written to OUT/layer.json. With `compare_last` a second model is
aligned the same way on the last layer, for the paper's Tab. 9 comparison (evaluate reports
both).

Two phases, as the paper's: (1) warm-up, projector only (the encoder and the LM frozen; with
the tiny LM, which has no language pretraining, `warmup_parts` adds the LM), on image captions; (2) all parameters, on image captions plus question answering over images and
videos (the corpus's QA pairs: count, colour, shape, position, action). Distributed like
pretrain (`peflow launch align-lang -j 2x1`); rank 0 writes the outputs.

Outputs:
  OUT/vlm.json, OUT/vlm.safetensors, OUT/lm/   PE lang at the chosen layer (load_vlm; LayerScale folded)
  OUT/PE-Lang.pt                               its encoder alone, official PE-Lang layout (no head, no
                                               ln_post, ls_{1,2}.gamma): registered as peflow-lang
  OUT/last/                                    the same for the last layer (compare_last)
  OUT/layer.json, OUT/history.jsonl, OUT/loss.png, OUT/metrics.json, OUT/manifest.json
  OUT.ckpt/layer<L>/{warmup,align}/            resumable checkpoints per model and phase
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peflow.config import check_block_or_auto, opt
from peflow.stages.base import Result

#: The encoder in the official layout, inside each model folder.
ENCODER_FILE = "PE-Lang.pt"


@dataclass(kw_only=True)
class Config:
    """Options of `peflow align-lang`."""

    checkpoint: str = opt("", "PE-core model to align (the pretrain stage's output).")
    data: str = opt("", "Corpus with image and video shards and QA pairs (the validate stage's output).")
    out: str = opt("", "Output folder for PE lang; checkpoints go to OUT.ckpt beside it.")
    layer: str = opt("auto", "PE block the LM reads (1 = first, negative from the end), or auto: the best layer "
                             "of a quick frozen QA probe.")
    compare_last: bool = opt(True, "Also align a model on the last layer (the paper's Tab. 9 comparison).")
    probe_images: int = opt(1000, "Train images of the auto layer probe (70% fit, 30% score).", min=10)
    pooling: int = opt(2, "Token pooling per side in the projector (2 = 2x2, as PLM).", min=1)
    frames: int = opt(4, "Frames per video, uniformly sampled, in order.", min=1)
    lm: str = opt("tiny", "Causal LM: 'tiny' (a small Llama built from a config, tokenizer trained on the corpus "
                          "text) or a Hugging Face model id or local folder.")
    lm_layers: int = opt(2, "Layers of the tiny LM.", min=1)
    lm_width: int = opt(128, "Hidden width of the tiny LM.", min=8)
    vocab_size: int = opt(1024, "BPE vocabulary of the tiny LM's tokenizer.", min=300)
    layer_scale: float = opt(0.1, "LayerScale init of the new gammas on the encoder (paper 0.1; 0 = none).",
                             min=0.0)
    drop_path: float = opt(0.1, "DropPath rate on the encoder's blocks (paper 0.1).", min=0.0)
    images: int = opt(3000, "Train images (captions and QA) used by both phases.", min=1)
    warmup_steps: int = opt(100, "Phase 1 steps: projector only (see warmup_parts), on image captions.", min=0)
    warmup_parts: str = opt("projector", "Parts that learn in phase 1 (comma-separated: projector, lm). The paper "
                                         "trains the projector alone on a pretrained LM; the tiny LM has no "
                                         "language pretraining, so the CPU presets warm it up too.")
    steps: int = opt(400, "Phase 2 steps: all parameters, on captions and image and video QA.", min=1)
    global_batch: int = opt(32, "Examples per step over all processes.", min=1)
    lr: float = opt(2e-3, "Peak learning rate of the projector and the LM (AdamW; warm-up then cosine).", min=0.0)
    encoder_lr_scale: float = opt(0.1, "Phase 2: the encoder's learning rate as a fraction of lr.", min=0.0)
    lr_warmup: int = opt(20, "Linear learning-rate warm-up steps of each phase.", min=0)
    max_text_tokens: int = opt(64, "Longest caption, in LM tokens (longer ones are cut).", min=8)
    seed: int = opt(0, "Seed of initialisation and data order.")
    checkpoint_every: int = opt(100, "Write a resumable checkpoint every N steps (and at each phase's end).",
                                min=1, key=False)
    threads: int = opt(0, "torch threads per process (0: torch's default).", min=0, key=False)
    log_model: bool = opt(True, "Log PE lang as an MLflow model and register it (peflow-lang).", key=False)
    progress: bool = opt(True, "Show progress bars (rank 0).", key=False)

    def validate(self) -> None:
        parts = {p.strip() for p in self.warmup_parts.split(",") if p.strip()}
        if not parts or parts - {"projector", "lm"}:
            raise ValueError(f"warmup_parts must name projector and/or lm, got {self.warmup_parts!r}")
        check_block_or_auto(self.layer, "layer")


def _texts(images: list[Any], videos: list[Any]) -> list[str]:
    """The tokenizer's training text: captions, questions and answers of the train split."""
    out = [c.caption for c in images]
    for c in (*images, *videos):
        out += [t for qa in c.meta.get("qa") or [] for t in (qa["question"], qa["answer"])]
    return [t for t in out if t]


def choose_layer(cfg: Config, pe_model: Any, images: list[Any]) -> tuple[int, dict[str, Any]]:
    """The block to align (1-based) and the record of why."""
    from peflow.evaluate.probes import pe_layer_taps
    from peflow.evaluate.qa import qa_probe_layers
    from peflow.models.pe import block_index, num_layers

    depth = num_layers(pe_model)
    if cfg.layer != "auto":
        layer = block_index(int(cfg.layer), depth)
        return layer, {"layer": layer, "depth": depth, "rule": "given by config"}
    scores = qa_probe_layers(pe_layer_taps(pe_model), images[:cfg.probe_images])
    layer = max(scores, key=lambda k: (scores[k], k))
    return layer, {"layer": layer, "depth": depth, "scores": scores, "images": min(len(images), cfg.probe_images),
                   "rule": "auto: highest held-out accuracy of a frozen linear probe (class token + 2x2-pooled "
                           "grid) predicting the image questions' answers, mean over question types"}


def _examples(images: list[Any], videos: list[Any]) -> tuple[list[Any], list[str], list[str]]:
    """Phase 2's (clip, prompt, target): each image's caption, and every image and video QA pair."""
    clips, prompts, targets = [], [], []
    for c in images:
        clips.append(c), prompts.append(""), targets.append(c.caption)
    for c in (*images, *videos):
        for qa in c.meta.get("qa") or []:
            clips.append(c), prompts.append(qa["question"]), targets.append(qa["answer"])
    return clips, prompts, targets


def _pixel_bank(clips: list[Any], size: int) -> tuple[Any, Any]:
    """Every distinct clip's frames once, normalised (fp16 [M, 3, S, S]), and each clip's rows [N, F] (-1 pad)."""
    import numpy as np
    import torch

    from peflow.models.vlm import frames_tensor

    row_of: dict[int, list[int]] = {}
    parts, row = [], 0
    for c in clips:
        if id(c) not in row_of:
            row_of[id(c)] = list(range(row, row + len(c.frames)))
            row += len(c.frames)
            parts.append(c.frames)
    flat = np.concatenate(parts)
    bank = torch.cat([frames_tensor(flat[i:i + 1024], size).half() for i in range(0, len(flat), 1024)])
    width = max(len(c.frames) for c in clips)
    ids = torch.full((len(clips), width), -1, dtype=torch.long)
    for n, c in enumerate(clips):
        ids[n, :len(c.frames)] = torch.tensor(row_of[id(c)])
    return bank, ids


def _align(cfg: Config, pe_model: Any, layer: int, tokenizer_lm: tuple[Any, Any], images: list[Any],
           videos: list[Any], dist: Any, on_step: Any, mlflow_offset: int = 0) -> tuple[Any, list[dict[str, Any]]]:
    """Both phases for one layer; returns the model (LayerScale unfolded) and its history rows (steps from 0;
    `on_step` gets them `mlflow_offset` later)."""
    import copy

    import torch

    from peflow.engine.clips import vision_bank
    from peflow.models.pe import add_layer_scale
    from peflow.models.vlm import build_vlm
    from peflow.train.checkpoint import ckpt_dir
    from peflow.train.objectives.captioner import CaptionObjective
    from peflow.train.trainer import TrainSettings, fit

    torch.manual_seed(cfg.seed)
    lm, tokenizer = copy.deepcopy(tokenizer_lm[0]), tokenizer_lm[1]
    model = build_vlm(pe_model, lm, tokenizer, layer=layer, pooling=cfg.pooling, max_frames=max(cfg.frames, 1))
    add_layer_scale(model.tower, init=cfg.layer_scale, drop_path=cfg.drop_path)
    root = ckpt_dir(cfg.out or "out") / f"layer{layer}"
    history: list[dict[str, Any]] = []

    def settings(name: str, steps: int) -> TrainSettings:
        return TrainSettings(ckpt_dir=root / name, steps=steps, global_batch=cfg.global_batch, lr=cfg.lr,
                             warmup_steps=min(cfg.lr_warmup, steps), seed=cfg.seed,
                             checkpoint_every=cfg.checkpoint_every)

    def rows(name: str, got: list[dict[str, Any]], offset: int) -> None:
        for row in got:
            row = {**row, "phase": name, "layer": layer, "step": row["step"] + offset}
            history.append(row)
            if on_step:  # MLflow steps count over every model of the run, so the curves follow each other
                on_step({**row, "step": row["step"] + mlflow_offset})

    if cfg.warmup_steps:
        model.eval()
        bank, (ids,) = vision_bank(model, [images])
        objective = CaptionObjective(model, bank, ids, [c.caption for c in images], train_parts=cfg.warmup_parts,
                                     max_len=cfg.max_text_tokens, name=f"align-lang L{layer} warm-up")
        model, got = fit(objective, settings("warmup", cfg.warmup_steps), dist, progress=cfg.progress)
        rows("warmup", got, 0)
    clips, prompts, targets = _examples(images, videos)
    bank, ids = _pixel_bank(clips, model.image_size)
    objective = CaptionObjective(model, bank, ids, targets, prompts=prompts, frozen_tower=False,
                                 train_parts="tower,projector,lm", max_len=cfg.max_text_tokens,
                                 tower_lr_scale=cfg.encoder_lr_scale, name=f"align-lang L{layer}")
    model, got = fit(objective, settings("align", cfg.steps), dist, progress=cfg.progress)
    rows("align", got, cfg.warmup_steps)
    return model, history


def run(cfg: Config, out: Path | None) -> Result | None:
    """Choose the layer, align (resuming from OUT.ckpt) and write PE lang into `out` (rank 0)."""
    import torch

    from peflow.config import InputError
    from peflow.engine.clips import read_clips, read_images
    from peflow.models.lm import TinyLM, new_lm
    from peflow.models.pe import load_model, num_layers, resolve_checkpoint
    from peflow.train.trainer import init_distributed

    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    try:
        images = read_images(cfg.data, "train", limit=cfg.images)
        videos = read_clips(cfg.data, "train", frames=cfg.frames)
    except FileNotFoundError as e:
        raise InputError(f"data {cfg.data}: {e}") from None
    if not any(c.meta.get("qa") for c in (*images, *videos)):
        raise InputError(f"data {cfg.data}: no QA pairs (json 'qa') in the train split; PE lang's phase 2 needs them")
    pe_model = load_model(resolve_checkpoint(cfg.checkpoint))
    layer, why = choose_layer(cfg, pe_model, images)
    layers = [layer] + ([num_layers(pe_model)] if cfg.compare_last and layer != num_layers(pe_model) else [])
    torch.manual_seed(cfg.seed)
    lm_tok = new_lm(cfg.lm, _texts(images, videos),
                    TinyLM(layers=cfg.lm_layers, hidden=cfg.lm_width, vocab_size=cfg.vocab_size))
    dist = init_distributed()
    try:
        logger = None
        if dist.rank == 0:
            import mlflow

            from peflow.train.report import StepLogger

            logger = StepLogger(mlflow.active_run())
        models, history = [], []
        for i, n in enumerate(layers):
            model, rows = _align(cfg, pe_model, n, lm_tok, images, videos, dist, logger,
                                 mlflow_offset=i * (cfg.warmup_steps + cfg.steps))
            models.append(model)
            history += rows
        if dist.rank != 0:
            return None
        logger.flush()
        return _finish(cfg, out, models, history, why, counts={"images": len(images), "videos": len(videos)})
    finally:
        if dist.world_size > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _finish(cfg: Config, out: Path, models: list[Any], history: list[dict[str, Any]], why: dict[str, Any], *,
            counts: dict[str, Any]) -> Result:
    import statistics

    from peflow.models.pe import fold_layer_scale, save_official_vision
    from peflow.models.vlm import LAST_LAYER_DIR
    from peflow.train.report import loss_plot

    metrics: dict[str, float] = {"layer": float(models[0].layer), "depth": float(why["depth"])}
    for score_layer, score in (why.get("scores") or {}).items():
        metrics[f"probe/layer{score_layer}"] = float(score)
    for model, folder, tag in zip(models, (out, out / LAST_LAYER_DIR), ("chosen", "last")):
        model = model.float().cpu().eval()
        save_official_vision(model.tower, folder / ENCODER_FILE)
        fold_layer_scale(model.tower)
        model.save(folder, extra={"stage": "align-lang", "lm_source": cfg.lm, "role": tag})
        rows = [r for r in history if r["layer"] == model.layer and r["phase"] == "align"]
        if rows:
            metrics[f"{tag}/final_loss"] = statistics.fmean(r["loss"] for r in rows[-10:])
            metrics[f"{tag}/first_loss"] = float(rows[0]["loss"])
    (out / "layer.json").write_text(json.dumps(why, indent=2, sort_keys=True) + "\n")
    (out / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))
    if history:
        loss_plot(history, out / "loss.png")
    print(f"align-lang: layer {why['layer']} of {why['depth']} ({why['rule'].split(':')[0]}); "
          + "; ".join(f"{t} loss {metrics[f'{t}/first_loss']:.3f} -> {metrics[f'{t}/final_loss']:.3f}"
                      for t in ("chosen", "last") if f"{t}/final_loss" in metrics))
    return Result(metrics=metrics, counts={**counts, "models": len(models)},
                  resolved={"layer": why["layer"], "layers": [m.layer for m in models]},
                  model=models[0] if cfg.log_model else None,
                  artifacts=("layer.json", "loss.png", "metrics.json"), tags={"peflow.layer": str(why["layer"])})
