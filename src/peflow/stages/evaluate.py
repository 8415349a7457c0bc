"""Evaluate a PE-core CLIP model: zero-shot classification on the clean
held-out split and each distribution-shift split, and image-text retrieval
(paper App. B.1.2 protocols), and layer-by-layer frozen probes (classification,
segmentation, depth, language at every block; metric names in docs/metrics.md).
On held-out videos (`video_split`): zero-shot on the 10 actions and the 7 motion
types, text-video retrieval, for the image-only model (`video/core/`) and the
video-finetuned one (`video/finetuned/`, from `video_checkpoint`). PE lang (`lang`, the
align-lang output): QA accuracy per question type next to the majority answer, for the
chosen and the last layer (`lang/{chosen,last}/qa/`). Dense rows (the paper's Tab. 36):
segmentation mIoU, depth R^2 and RMSE and tracking J (label propagation over the held-out
videos' instance masks) of PE-core's last and best intermediate layer and of PE spatial's
last layer (`spatial`, the align-spatial output): `dense/{core_last,core_best,spatial_last}/`.

Outputs:
  OUT/metrics.json   flat name -> number, the same numbers logged to MLflow
  OUT/metrics.png    bar plot of the metrics
  OUT/layers.png     probe score against layer, one panel per probe task (with probes on)
  OUT/layers.json    the per-layer probe table (with probes on)
  OUT/video_confusion.png, OUT/video_confusion.json   action confusion matrices (with video on)
  OUT/qa_examples.json   PE lang's answers to the first held-out questions (with lang)
  OUT/manifest.json  config, input hashes (corpus digest, checkpoint hash), counts

The checkpoint is a peflow checkpoint folder (`model.safetensors` +
`model.json`, e.g. the pretrain stage's output) or an official PE-Core `.pt`
(then `--preset` names its architecture, e.g. pe-core-t16).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peflow.config import InputError, opt
from peflow.stages.base import Result

if TYPE_CHECKING:
    from peflow.evaluate.probes import ProbeResult



def _model_presets() -> list[str]:
    from peflow.models.presets import MODEL_PRESETS

    return sorted(MODEL_PRESETS)


@dataclass(kw_only=True)
class Config:
    """Options of `peflow evaluate`."""

    checkpoint: str = opt("", "Model to evaluate: a peflow checkpoint folder (model.safetensors + model.json, or a "
                              "stage output holding one) or an official PE-Core .pt (needs --model).")
    data: str = opt("", "Corpus folder (image/<split>/shard-*.tar and card.json, as `peflow synth` writes).")
    out: str = opt("", "Output folder (replaced atomically when the evaluation completes).")
    model: str | None = opt(None, "Model preset; required for an official .pt, else read from model.json.",
                            choices=_model_presets)
    splits: str | None = opt(None, "Comma-separated splits to classify (default: test and every shift_* split).")
    retrieval_split: str = opt("test", "Split whose captions are used for image-text retrieval.")
    templates: str = opt("corpus", "Prompt template set: corpus, simple, openai or all.")
    dsl_reweight: bool = opt(False, "Also report retrieval with PE's DSL re-weighting (retrieval_dsl/*).")
    dsl_scale: float = opt(1.0, "Softmax scale of the DSL re-weighting.")
    batch_size: int = opt(256, "Images or texts per forward pass.", min=1, key=False)
    max_samples: int | None = opt(None, "Use at most this many samples per split (default: all).")
    image_size: int | None = opt(None, "Input resolution (default: the model's native size).")
    threads: int | None = opt(None, "torch CPU threads (default: torch's choice).", min=1, key=False)
    probes: bool = opt(True, "Also fit layer-by-layer frozen probes on every block (layers.png, probe/* metrics).")
    probe_train: int = opt(2000, "Images that train the probes: the first N of the train split.")
    probe_test: int = opt(500, "Images that score the probes: the first N of the test split.")
    probe_tasks: str = opt("cls,seg,depth,lang", "Comma-separated probe tasks: cls (label), seg (patch class), "
                                                 "depth (patch depth), lang (caption retrieval).")
    video_checkpoint: str = opt("", "Video-finetuned model (the finetune-video stage's output) to evaluate on "
                                    "held-out videos next to `checkpoint`; empty: only `checkpoint`.")
    video: bool = opt(True, "Evaluate on held-out videos too (video/* metrics), when the corpus has them.")
    video_split: str = opt("test", "Held-out video split (zero-shot on its actions, retrieval of its human captions).")
    video_frames: int = opt(8, "Frames per clip, uniformly sampled and averaged.", min=1)
    lang: str = opt("", "PE lang (the align-lang stage's output): QA accuracy per question type on held-out "
                        "images and videos, for the chosen and the last layer (lang/*); empty: skipped.")
    qa_images: int = opt(300, "Held-out images whose questions PE lang answers (the first N of video_split).", min=1)
    qa_videos: int = opt(160, "Held-out videos whose questions PE lang answers.", min=1)
    spatial: str = opt("", "PE spatial (the align-spatial stage's output): its last layer's dense probes and "
                           "tracking next to PE-core's last and best layers (dense/*); empty: PE-core only.")
    tracking: bool = opt(True, "Zero-shot video object tracking by label propagation (J score, dense/*/track_j).")
    track_videos: int = opt(40, "Held-out videos tracked (their per-frame instance masks).", min=1)
    track_frames: int = opt(8, "Frames per tracked video.", min=2)

    def probe_task_list(self) -> list[str]:
        """`probe_tasks` as a list; unknown names raise ValueError."""
        from peflow.evaluate.probes import TASKS

        tasks = [t.strip() for t in self.probe_tasks.split(",") if t.strip()]
        bad = [t for t in tasks if t not in TASKS]
        if bad or not tasks:
            raise ValueError(f"probe_tasks: unknown task(s) {bad or self.probe_tasks!r}; known: {', '.join(TASKS)}")
        return tasks

    def validate(self) -> None:
        from peflow.evaluate.templates import get_templates

        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.max_samples is not None and self.max_samples < 1:
            raise ValueError(f"max_samples must be >= 1, got {self.max_samples}")
        if self.image_size is not None and self.image_size < 8:
            raise ValueError(f"image_size must be >= 8, got {self.image_size}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        get_templates(self.templates)
        if self.probe_train < 1 or self.probe_test < 1:
            raise ValueError(f"probe_train and probe_test must be >= 1, got {self.probe_train}, {self.probe_test}")
        self.probe_task_list()


def evaluate_model(model: Any, tokenizer: Any, cfg: Config, *, classnames: list[str]) -> tuple[dict, dict]:
    """All metrics for `model` on `cfg.data`: (metrics, counts)."""
    import torch

    from peflow.data.formats import load_card
    from peflow.evaluate.features import encode_image_split, encode_texts, eval_splits
    from peflow.evaluate.labelsets import labelset_metrics
    from peflow.evaluate.retrieval import retrieval_metrics
    from peflow.evaluate.templates import get_templates
    from peflow.evaluate.zeroshot import class_embeddings, zeroshot_metrics

    size = cfg.image_size or int(model.visual.image_size[0])
    splits = eval_splits(cfg.data, cfg.splits)
    feats = {}
    for split in dict.fromkeys([*splits, cfg.retrieval_split]):
        feats[split] = encode_image_split(model, cfg.data, split, image_size=size, batch_size=cfg.batch_size,
                                          max_samples=cfg.max_samples, classnames=classnames)

    def texts(t: list[str]) -> torch.Tensor:
        return encode_texts(model, tokenizer, t, batch_size=cfg.batch_size)

    classifier = class_embeddings(texts, classnames, get_templates(cfg.templates))
    for split in splits:
        if bool((feats[split].labels < 0).any()):
            raise ValueError(f"{cfg.data}: split {split!r} has samples without a label (json label_id)")
    metrics = zeroshot_metrics({s: (feats[s].image_emb, feats[s].labels) for s in splits}, classifier)
    # What the model learned of colour and position, and shape without the colour cue (labelsets).
    metrics.update(labelset_metrics({s: feats[s] for s in splits}, load_card(cfg.data), classifier, texts))

    r = feats[cfg.retrieval_split]
    text_emb = texts(r.captions)
    metrics.update(retrieval_metrics(r.image_emb, text_emb, torch.arange(len(r)),
                                     dsl=cfg.dsl_reweight, dsl_scale=cfg.dsl_scale))
    counts = {f"images/{s}": len(f) for s, f in feats.items()}
    counts.update(classes=len(classnames), templates=len(get_templates(cfg.templates)),
                  captions=len(r.captions), image_size=size)
    return metrics, counts


def evaluate_probes(model: Any, tokenizer: Any, cfg: Config, *, classnames: list[str]) -> ProbeResult | None:
    """Layer-by-layer probes (None, with a printed note, when the corpus has no train split)."""
    from peflow.data.formats import find_shards
    from peflow.evaluate.probes import run_probes

    try:
        has_train = "train" in find_shards(cfg.data, "image")
    except FileNotFoundError:
        has_train = False
    if not has_train:
        print(f"peflow evaluate: note: {cfg.data} has no image train split to train probes on; probes skipped")
        return None
    result = run_probes(model, cfg.data, tokenizer=tokenizer, probe_train=cfg.probe_train, probe_test=cfg.probe_test,
                        image_size=cfg.image_size, tasks=cfg.probe_task_list(), classnames=classnames,
                        batch_size=cfg.batch_size)
    for note in result.notes:
        print(f"peflow evaluate: note: {note}")
    return result


def evaluate_videos(models: dict[str, Any], tokenizer: Any, cfg: Config, out: Path) -> tuple[dict, dict]:
    """Video zero-shot and retrieval of each model (name -> model) on the held-out videos; the confusion
    matrices into `out`. Returns (metrics, counts); nothing when the corpus has no such split."""
    import json

    from peflow.data.formats import find_shards
    from peflow.evaluate.video import evaluate_video, plot_confusion

    try:
        shards = find_shards(cfg.data, "video").get(cfg.video_split)
    except FileNotFoundError:
        shards = None
    if not shards:
        print(f"peflow evaluate: note: {cfg.data} has no video split {cfg.video_split!r}; video evaluation skipped")
        return {}, {}
    metrics, matrices, counts = {}, {}, {}
    for name, model in models.items():
        size = cfg.image_size or int(model.visual.image_size[0])
        m, matrix, n = evaluate_video(model, tokenizer, shards, num_frames=cfg.video_frames, image_size=size)
        metrics.update({f"video/{name}/{k}": v for k, v in m.items()})
        matrices[name], counts[f"videos/{cfg.video_split}"] = matrix, n
    plot_confusion(matrices, out / "video_confusion.png")
    (out / "video_confusion.json").write_text(json.dumps({k: v.tolist() for k, v in matrices.items()}) + "\n")
    return metrics, counts


def evaluate_lang(cfg: Config) -> tuple[dict, list[dict[str, Any]], dict]:
    """PE lang's QA accuracy per type (and the majority baseline) for the chosen and the last layer's model."""
    from peflow.engine.clips import read_clips, read_images
    from peflow.evaluate.qa import evaluate_qa
    from peflow.models.vlm import LAST_LAYER_DIR, load_vlm

    folders = {"chosen": Path(cfg.lang), "last": Path(cfg.lang) / LAST_LAYER_DIR}
    models = {tag: load_vlm(f) for tag, f in folders.items() if (f / "vlm.json").is_file()}
    if not models:
        raise InputError(f"lang {cfg.lang}: no PE lang model (vlm.json) here")
    frames = next(iter(models.values())).max_frames
    held_out = {"image": read_images(cfg.data, cfg.video_split, limit=cfg.qa_images),
                "video": read_clips(cfg.data, cfg.video_split, frames=frames, limit=cfg.qa_videos)}
    train = {"image": read_images(cfg.data, "train", limit=5000), "video": read_clips(cfg.data, "train", frames=1)}
    metrics: dict[str, float] = {}
    examples: list[dict[str, Any]] = []
    for tag, model in models.items():
        m, shown = evaluate_qa(model, held_out, train, prefix=f"lang/{tag}/qa", batch_size=cfg.batch_size)
        metrics.update(m)
        metrics[f"lang/{tag}/layer"] = float(model.layer)
        examples += [{"model": tag, "layer": model.layer, **e} for e in shown]
    counts = {"qa_images": len(held_out["image"]), "qa_videos": len(held_out["video"])}
    return metrics, examples, counts


def evaluate_dense(core: Any, probes: ProbeResult | None, cfg: Config) -> tuple[dict, ProbeResult | None, dict]:
    """The three rows of the paper's Tab. 36: PE-core's last layer, PE-core's best intermediate layer and PE
    spatial's last layer: frozen per-patch segmentation mIoU, depth R^2 and RMSE, and tracking J."""
    from peflow.evaluate.probes import DENSE_TASKS, pe_layer_taps, run_probes
    from peflow.evaluate.tracking import track_videos
    from peflow.models.pe import load_model, resolve_checkpoint

    rows: dict[str, dict[str, float]] = {"core_last": {}, "core_best": {}}
    spatial_model = spatial_probes = None
    if cfg.spatial:
        spatial_model = load_model(resolve_checkpoint(cfg.spatial)).eval()
        rows["spatial_last"] = {}
        if probes is not None and any(t in probes.per_layer for t in DENSE_TASKS):
            spatial_probes = run_probes(spatial_model, cfg.data, tokenizer=None, probe_train=cfg.probe_train,
                                        probe_test=cfg.probe_test, image_size=cfg.image_size,
                                        tasks=[t for t in DENSE_TASKS if t in probes.per_layer],
                                        batch_size=cfg.batch_size)
    for task, name in (("seg", "seg_miou"), ("depth", "depth_r2")):
        if probes is None or task not in probes.per_layer:
            continue
        scores = probes.per_layer[task]
        best = max(range(len(scores) - 1), key=lambda i: scores[i]) if len(scores) > 1 else 0
        rows["core_last"][name], rows["core_best"][name] = scores[-1], scores[best]
        rows["core_best"][f"{task}_layer"] = float(probes.layers[best])
        if spatial_probes is not None:
            rows["spatial_last"][name] = spatial_probes.per_layer[task][-1]
        if task == "depth":
            for row, r2, result in (("core_last", scores[-1], probes), ("core_best", scores[best], probes),
                                    ("spatial_last", rows.get("spatial_last", {}).get(name), spatial_probes)):
                if r2 is not None and result is not None and result.depth_rmse(r2) is not None:
                    rows[row]["depth_rmse"] = result.depth_rmse(r2)
    counts: dict[str, Any] = {}
    if cfg.tracking:
        try:
            core_track = track_videos(pe_layer_taps(core, cfg.image_size), cfg.data, cfg.video_split,
                                      num_videos=cfg.track_videos, num_frames=cfg.track_frames)
        except (FileNotFoundError, ValueError) as e:
            print(f"peflow evaluate: note: tracking skipped ({e})")
        else:
            layers = sorted(core_track.per_layer)
            inner = layers[:-1] or layers
            best = max(inner, key=lambda k: core_track.per_layer[k])
            rows["core_last"]["track_j"] = core_track.last
            rows["core_best"]["track_j"], rows["core_best"]["track_layer"] = core_track.per_layer[best], float(best)
            counts["tracked_videos"] = core_track.videos
            if spatial_model is not None:
                taps = pe_layer_taps(spatial_model, cfg.image_size)
                track = track_videos(taps, cfg.data, cfg.video_split, num_videos=cfg.track_videos,
                                     num_frames=cfg.track_frames, layers=[taps.layers[-1]])
                rows["spatial_last"]["track_j"] = track.last
    metrics = {f"dense/{row}/{k}": float(v) for row, values in rows.items() for k, v in values.items()}
    return metrics, spatial_probes, counts


def run(cfg: Config, out: Path) -> Result:
    """Evaluate `cfg.checkpoint` on `cfg.data` into `out` (the runner's staging folder)."""
    import torch

    from peflow.data.formats import label_names
    from peflow.evaluate.probes import plot_layers, write_layers_json
    from peflow.evaluate.report import plot_metrics
    from peflow.models import get_tokenizer, load_model
    from peflow.models.pe import resolve_checkpoint

    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    if not Path(cfg.data).is_dir():
        raise InputError(f"data {cfg.data}: not a folder")
    ckpt = resolve_checkpoint(cfg.checkpoint)
    try:
        classnames = label_names(cfg.data)
    except (FileNotFoundError, KeyError) as e:
        raise InputError(f"data {cfg.data}: no class list (card.json with 'categories'): {e}") from None
    model = load_model(ckpt, preset=cfg.model).eval()
    preset = getattr(model, "peflow_preset", cfg.model)
    tokenizer = get_tokenizer(preset)
    metrics, counts = evaluate_model(model, tokenizer, cfg, classnames=classnames)
    probes = evaluate_probes(model, tokenizer, cfg, classnames=classnames) if cfg.probes else None
    if probes is not None:
        metrics.update(probes.metrics)
        counts.update(probes.counts)
    resolved = {"resolved_checkpoint": str(ckpt), "resolved_preset": preset}
    if cfg.video:
        models = {"core": model}
        if cfg.video_checkpoint:
            video_ckpt = resolve_checkpoint(cfg.video_checkpoint)
            models["finetuned"] = load_model(video_ckpt).eval()
            resolved["resolved_video_checkpoint"] = str(video_ckpt)
        video_metrics, video_counts = evaluate_videos(models, tokenizer, cfg, out)
        metrics.update(video_metrics)
        counts.update(video_counts)
    spatial_probes = None
    if cfg.probes or cfg.tracking or cfg.spatial:
        dense_metrics, spatial_probes, dense_counts = evaluate_dense(model, probes, cfg)
        metrics.update(dense_metrics)
        counts.update(dense_counts)
    if cfg.lang:
        import json

        lang_metrics, qa_examples, lang_counts = evaluate_lang(cfg)
        metrics.update(lang_metrics)
        counts.update(lang_counts)
        (out / "qa_examples.json").write_text(json.dumps(qa_examples, indent=1) + "\n")
    seconds = time.perf_counter() - t0

    title = f"{preset} · {ckpt.name} · {Path(cfg.data).name}"
    plot_metrics({k: v for k, v in metrics.items() if not k.startswith("probe/")}, out / "metrics.png", title=title)
    if probes is not None:
        write_layers_json(probes, out / "layers.json")
        plot_layers(probes, out / "layers.png", title=f"layer-by-layer probes · {title}",
                    others={"PE spatial": spatial_probes} if spatial_probes is not None else None)
    print(f"peflow evaluate: {len(metrics)} metrics in {seconds:.1f}s -> {cfg.out}")
    for k in ("zeroshot/test/top1", "zeroshot/test/top1_atypical_colour", "zeroshot/robustness_avg",
              "zeroshot_colour/test/top1", "zeroshot_position/test/top1", "retrieval/i2t/R1", "retrieval/t2i/R1"):
        if k in metrics:
            print(f"  {k} = {metrics[k]:.4f}")
    for task in probes.per_layer if probes is not None else ():
        best, last = int(metrics[f"probe/{task}/best_layer"]), probes.layers[-1]
        print(f"  probe/{task}: best layer {best} = {metrics[f'probe/{task}/best']:.4f}, "
              f"last layer {last} = {metrics[f'probe/{task}/last']:.4f}")
    for k in sorted(k for k in metrics if k.startswith("dense/") or (k.startswith("lang/") and k.endswith("/mean"))):
        print(f"  {k} = {metrics[k]:.4f}")
    for k in sorted(k for k in metrics if k.startswith("video/") and k.endswith(("/zeroshot/top1",
                                                                             "zeroshot_motion/top1", "t2v/R1"))):
        print(f"  {k} = {metrics[k]:.4f}")
    return Result(metrics=metrics, counts=counts, resolved=resolved,
                  tags={"peflow.eval_seconds": f"{seconds:.2f}"})
