"""Pipeline presets: a whole run's per-stage configs, from one function each.

`nano()` is written out once (the embedded default: minutes on 2 CPU cores);
the others change a few fields of it. The Airflow Params form (a `preset`
enum), `params.yaml`/`dvc.yaml` (`python -m peflow.pipeline`), `peflow run`
and every `peflow <stage> --preset P` read their configs from here. A stage
a preset does not mention runs with its Config's defaults.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from peflow import config, stages


@dataclasses.dataclass(frozen=True)
class Pipeline:
    """One pipeline preset.

    Attributes:
        name: the preset's name (`--preset`).
        nodes: nodes x processes per node of the distributed stages (TorchX `-j`).
        configs: stage name -> that stage's Config (wiring fields left empty).
        resource: the TorchX named resource of one node of the distributed stages (`components/resources.py`:
            GPUs, CPUs, memory); empty: the stage's registry resources (the CPU presets).
    """

    name: str
    nodes: str
    configs: Mapping[str, Any]
    resource: str = ""

    def config(self, stage: str) -> Any:
        """The config of `stage` in this preset (the Config's defaults when the preset has none)."""
        if stage in self.configs:
            return self.configs[stage]
        return stages.get(stage).config_cls()

    def derive(self, name: str, *, nodes: str | None = None, resource: str | None = None,
               **changes: Mapping[str, Any]) -> Pipeline:
        """A preset from this one: `changes` maps a stage name (`_` for `-`) to field changes."""
        configs = dict(self.configs)
        for ident, fields in changes.items():
            stage = next(s.name for s in stages.all_stages() if s.ident == ident)
            configs[stage] = config.replace(self.config(stage), fields, where=f"preset {name}: {stage}")
        return Pipeline(name=name, nodes=nodes or self.nodes, configs=configs,
                        resource=self.resource if resource is None else resource)


def nano() -> Pipeline:
    """The embedded default: the nano corpus and model, about 10 minutes end to end on 2 CPU cores."""
    from peflow.stages import align_lang, align_spatial, caption, evaluate, finetune_video, pretrain, synth
    from peflow.stages import train_captioner, validate, validate_captions

    return Pipeline(name="nano", nodes="2x1", configs={
        "synth": synth.Config(corpus="nano", seed=0),
        "validate": validate.Config(max_failure_rate=0.05, suites="image,video"),
        # Tuned on 2 CPU cores, nano corpus (24,000 training images), batch 64: zero-shot top-1 (test)
        # of the nano model 35% at 1000 steps (vanilla, one process); through TorchX, 2 processes,
        # 2000 steps: vanilla 34.4% in 338 s, pe 23.4% in 523 s. LAMB at 4e-3 learned slower than at
        # 1e-3; crops down to 8% of the image did not learn (captions no longer describe the crop);
        # AdamW at 2e-3 stalled at ln(batch).
        # 1200 steps for the demo's 15-minute goal (docs/alignment.md): pe 24.2% / 20.2% through Airflow
        # (timm's LAMB loop / FusedLamb). At 1200 steps (bench/results/recipe_sweep_tuned.json) pe-adamw,
        # the PE recipe with AdamW in place of LAMB, beats vanilla: shape 37.8% vs 30.8%, robustness
        # average 19.3% vs 15.4%, i2t R@1 28.6% vs 30.6% (pe: 20.2%, 14.5%, 1.8%).
        "pretrain": pretrain.Config(model="nano", recipe="pe-adamw", steps=1200, global_batch=64, lr=1e-3,
                                    resolutions="48:0.5,64:0.5", crop_scale_min=0.5, seed=0),
        # The engine, measured on 2 CPU cores (nano corpus, 960 human-captioned train videos): the
        # captioner reading block 2 of the nano tower named the action in held-out videos' captions in
        # 48% with 4x4 pooling and 800 refined steps (128 s; colour 88%, CIDEr 2.10), 31% with PLM's
        # 2x2 pooling and 500 steps (153 s; colour 97%); 2x2 and 800 steps: 44% (block 6: 33%, a 4-layer
        # LM: 44% and 1.6x slower, 4 frames: 35%, 480 human captions: 35%).
        "train-captioner": train_captioner.Config(layer=2, pooling=4, frames=8, base_steps=200, refined_steps=500,
                                                  base_images=4000, global_batch=32, lr=2e-3),
        "caption": caption.Config(frames=8, key_frames=3, summarizer="rules", batch_size=128),
        "validate-captions": validate_captions.Config(max_failure_rate=0.05),
        # 0.44 s per step (8 frames x 32 clips); lr 1e-3 vs 2e-4: t2v R@1 11.9% vs 13.1% (engine captions)
        "finetune-video": finetune_video.Config(captions="engine", frames=8, steps=100, global_batch=32, lr=1e-3),
        # PE lang, measured on 2 cores (nano; chosen layer 3 by the QA probe, and the last layer 6): 2x2 pooling,
        # 2 frames, batch 32, 250 steps: colour 37% vs 16% majority, QA mean 24% vs 21%; 4x4 pooling, batch 16:
        # at the majority; 4 frames, 400 steps: colour 38%, mean 26%, 2.5x the time.
        "align-lang": align_lang.Config(layer="auto", compare_last=True, frames=2, pooling=2, images=1500,
                                        warmup_steps=60, warmup_parts="projector,lm", steps=120, global_batch=32,
                                        lr=2e-3),
        "align-spatial": align_spatial.Config(teacher_layer="auto", masks="superpixels", points=8, images=1000,
                                              steps=120, global_batch=32, lr=2e-3),
        "evaluate": evaluate.Config(probes=True, probe_train=2000, probe_test=500, video_frames=8, track_videos=24),
    })


def test() -> Pipeline:
    """CI: the test corpus (32 px) and model, seconds per stage, not learning."""
    return nano().derive("test", synth={"corpus": "test"},
                         pretrain={"model": "test", "steps": 20, "global_batch": 32, "lr": None,
                                   "resolutions": "32:1.0", "crop_scale_min": None},
                         train_captioner={"base_steps": 4, "refined_steps": 4, "base_images": 32, "global_batch": 8,
                                          "lm_width": 32, "vocab_size": 300, "eval_videos": 8,
                                          "max_new_tokens": 16, "checkpoint_every": 2},
                         caption={"max_new_tokens": 16, "batch_size": 16},
                         # an untrained captioner writes short loops: checked, not rejected
                         validate_captions={"min_caption_words": 1, "max_caption_repeats": 64,
                                            "max_failure_rate": 0.5},
                         finetune_video={"steps": 4, "global_batch": 8, "frames": 4, "checkpoint_every": 2},
                         align_lang={"warmup_steps": 2, "steps": 4, "global_batch": 8, "images": 40, "probe_images": 40,
                                     "frames": 2, "lm_width": 32, "vocab_size": 300, "checkpoint_every": 2},
                         align_spatial={"steps": 4, "global_batch": 8, "images": 40, "probe_images": 40, "points": 4,
                                        "checkpoint_every": 2},
                         evaluate={"probe_train": 120, "probe_test": 24, "video_frames": 4})


def small_cpu() -> Pipeline:
    """A larger CPU run: the small corpus and the small-cpu model at 128 px."""
    return nano().derive("small-cpu", synth={"corpus": "small"},
                         pretrain={"model": "small-cpu", "steps": 2000, "global_batch": 256, "lr": None,
                                   "resolutions": "64:0.4,96:0.35,128:0.25"})


#: The node of the GPU presets: 8 GPUs of 80 GB (H100 80GB; the same request fits H200 nodes).
GPU_NODE = "peflow_8xh100_80gb"


def b16() -> Pipeline:
    """PE-Core-B16 at the paper's budget (443K steps at batch 131,072; 112-160-224 px) on one node of 8 GPUs.

    The GPU presets contrast 16,384 pairs per micro-batch: the CLIP loss of a micro-batch gathers it over
    every GPU (micro_batch x GPUs negatives). On one node that takes micro-batches of 2,048, which fit an
    80 GB GPU with activation checkpointing (about 12 MiB per pair at 224 px, 100 MiB without: measured on
    CPU, docs/gpu.md); B/16 fits each GPU whole (DDP). The budget (about 6.6e21 FLOP) is about 29 days on
    one node at 45% MFU: `nodes=4x8` (micro_batch 512, no recompute) divides it by five.
    """
    return nano().derive("b16", nodes="1x8", resource=GPU_NODE, synth={"corpus": "full"},
                         # the paper's recipe, LAMB included, at the paper's batch and length
                         pretrain={"model": "pe-core-b16", "recipe": "pe", "steps": 443_000, "global_batch": 131_072,
                                   "lr": None, "micro_batch": 2048, "recompute": True,
                                   "resolutions": "112:0.42,160:0.33,224:0.25", "crop_scale_min": None})


def l14() -> Pipeline:
    """PE-Core-L14 at the paper's budget (98-154-224-336 px) on 4 nodes: FSDP2 and activation checkpointing,
    so that micro-batches of 512 fit at 336 px (about 90 MiB per pair with recomputation, 600 without)."""
    return b16().derive("l14", nodes="4x8",
                        pretrain={"model": "pe-core-l14", "resolutions": "98:0.42,154:0.33,224:0.17,336:0.08",
                                  "micro_batch": 512, "parallelism": "fsdp", "recompute": True})


def g14() -> Pipeline:
    """PE-Core-G14 at the paper's budget (656K steps, 86B samples; 98-154-224-336-448 px, stage lengths not
    published: L's proportions with a last 448 px stage) on 16 nodes, FSDP2 and activation checkpointing;
    micro_batch 128 (about 400 MiB per pair at 448 px with recomputation) x 128 GPUs = 16,384 negatives."""
    return l14().derive("g14", nodes="16x8",
                        pretrain={"model": "pe-core-g14", "steps": 656_000, "micro_batch": 128,
                                  "resolutions": "98:0.40,154:0.30,224:0.15,336:0.10,448:0.05"})


PRESETS: dict[str, Callable[[], Pipeline]] = {"test": test, "nano": nano, "small-cpu": small_cpu, "b16": b16,
                                              "l14": l14, "g14": g14}


def names() -> list[str]:
    return list(PRESETS)


def get(name: str) -> Pipeline:
    """The pipeline preset `name`; an unknown name raises ConfigError listing the known ones."""
    if name not in PRESETS:
        raise config.ConfigError(f"preset: {name!r} is not one of {names()}")
    return PRESETS[name]()
