"""The stage registry: the one list every face of a stage is generated from.

The `peflow <stage>` command, the TorchX component, the Airflow task (and its
Asset), the `dvc.yaml` stage, the Params form, `peflow compare`'s and the run
report's key metrics and the model registry all read a stage's entry here,
so a new stage is one module (its `Config` and `run`) and one `register` call.

Stage modules keep their top-level imports light (stdlib, numpy); torch and
the model libraries are imported inside `run`, so `peflow --help` and the DAG
parse stay fast.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from peflow import ladder  # stdlib only


@dataclasses.dataclass(frozen=True, kw_only=True)
class Stage:
    """One pipeline stage.

    Attributes:
        name: command name (`peflow <name>`), DAG task id, DVC stage name; may hold hyphens.
        module: the module holding `Config` (a dataclass with an `out` field) and
            `run(cfg, out) -> Result` (peflow.runner).
        summary: one line for `--help` and the DAG task's doc.
        inputs: (config field, upstream stage) pairs: the stage reads the upstream stage's output
            folder through that field (`--<field>`).
        distributed: launched through TorchX (torchrun) rather than in-process.
        code: source folders or files (repo paths) beyond the stage module that its output depends
            on: part of its output key and of its DVC deps.
        resources: TorchX resources per node (cpu, gpu, memMB) of a distributed stage.
        model_name: the registered MLflow model the stage's model becomes a version of (alias
            `candidate`), or None.
        evaluates: the registered model whose `champion` alias this stage's `champion_metric` ranks.
        champion_metric: the metric (higher is better) that moves `champion`.
        key_metrics: metric names (globs) shown by `peflow compare` and the run report.
        ablation: takes a pretraining recipe: the `ablation` variant runs it again with the other
            recipe, and every stage that reads its output (evaluate).
        dataset: its output is a dataset (corpus, validated data, captions): pushed to DVC.
        optional: input fields the stage runs without (left empty when a variant does not remake
            that input).
    """

    name: str
    module: str
    summary: str
    inputs: tuple[tuple[str, str], ...] = ()
    distributed: bool = False
    code: tuple[str, ...] = ()
    resources: Mapping[str, int] = dataclasses.field(default_factory=lambda: {"cpu": 2, "gpu": 0, "memMB": 8192})
    model_name: str | None = None
    evaluates: str | None = None
    champion_metric: str | None = None
    key_metrics: tuple[str, ...] = ()
    ablation: bool = False
    dataset: bool = False
    optional: tuple[str, ...] = ()

    @property
    def needs(self) -> tuple[str, ...]:
        """Upstream stages, in input order."""
        return tuple(dict.fromkeys(up for _, up in self.inputs))

    @property
    def ident(self) -> str:
        """The name as a Python identifier (`align-lang` -> `align_lang`)."""
        return self.name.replace("-", "_")

    def load(self) -> Any:
        return importlib.import_module(self.module)

    @property
    def config_cls(self) -> type:
        return self.load().Config

    @property
    def run(self) -> Any:
        return self.load().run


_REGISTRY: dict[str, Stage] = {}


def register(stage: Stage) -> Stage:
    """Add a stage; its upstream stages must be registered already (the order is a valid run order)."""
    if stage.name in _REGISTRY:
        raise ValueError(f"stage {stage.name!r} is registered already")
    missing = [up for up in stage.needs if up not in _REGISTRY]
    if missing:
        raise ValueError(f"stage {stage.name!r} reads unregistered stage(s) {missing}")
    _REGISTRY[stage.name] = stage
    return stage


def unregister(name: str) -> None:
    del _REGISTRY[name]


@contextlib.contextmanager
def registered(stage: Stage) -> Iterator[Stage]:
    """A stage registered for the block (tests)."""
    register(stage)
    try:
        yield stage
    finally:
        unregister(stage.name)


def all_stages() -> tuple[Stage, ...]:
    """Every registered stage, in a valid run order."""
    return tuple(_REGISTRY.values())


def names() -> list[str]:
    return list(_REGISTRY)


def get(name: str) -> Stage:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown stage {name!r}; known: {names()}") from None


def downstream(roots: set[str]) -> list[str]:
    """`roots` and every stage that reads one of them, directly or not, in run order."""
    out: list[str] = []
    for s in all_stages():
        if s.name in roots or any(up in out for up in s.needs):
            out.append(s.name)
    return out


def stage_key(stage: str, name: str) -> str:
    """A stage metric's name prefixed by its stage: `evaluate/zeroshot/test/top1`."""
    return name if name.startswith(f"{stage}/") else f"{stage}/{name}"


def metric_key(summary: Mapping[str, Any], name: str) -> str:
    """A stage metric's name in the pipeline run: `evaluate/zeroshot/test/top1`, prefixed by the variant
    version of the task's output: `ablation/evaluate/...`, `ladder/lamb/evaluate/...`."""
    key = stage_key(summary["stage"], name)
    return f"{summary['variant']}/{key}" if summary.get("variant") else key


@dataclasses.dataclass(frozen=True, kw_only=True)
class Variant:
    """More versions of part of a pipeline run, next to the main one: for each member, the `roots` stages
    run again with `change` applied to their configs, and so does every stage that reads them (directly or
    not), each under OUT/<version>/<stage>/. One member named like the variant (the default) is the version
    `<name>`; several members are versions `<name>/<member>` (the ablation ladder's steps). In Airflow each
    of these stages is one task, `<stage>_<name>`, mapped over the members (dynamic task mapping). A run has
    the variant when its run-config boolean `param` is set; the report and `peflow compare` give each version
    a column (or a row) of its own.

    Attributes:
        name: folder, task-id suffix and metric prefix (`<name>/evaluate/...`).
        param: the `RunConfig` boolean (Airflow Param, `peflow run` option) that turns it on.
        summary: one line for the DAG tasks' docs and the Params form.
        roots: the stages whose configs change.
        change: (stage name, the stage's config in the main run, member) -> field changes, for each root.
        only: when set, the variant runs these of the downstream stages only; an input the variant does
            not remake although it derives from a root is left empty (it must be `optional`).
        members: the versions, in order (empty: one, named like the variant).
    """

    name: str
    param: str
    summary: str
    roots: tuple[str, ...]
    change: Callable[[str, Any, str], Mapping[str, Any]]
    only: tuple[str, ...] = ()
    members: tuple[str, ...] = ()

    def stages(self) -> list[str]:
        """The stages this variant runs again: its roots and the stages reading one (all, or `only`), in run order."""
        return [s for s in downstream(set(self.roots)) if not self.only or s in self.only]

    def stale(self) -> set[str]:
        """Stages whose main output derives from a root but that this variant does not remake."""
        return set(downstream(set(self.roots))) - set(self.stages())

    def versions(self) -> tuple[str, ...]:
        """The members' names (the variant's own name when it has one version)."""
        return self.members or (self.name,)

    def version(self, member: str) -> str:
        """Folder under OUT and metric prefix of a member's outputs: `ablation`, `ladder/lamb`."""
        if member not in self.versions():
            raise ValueError(f"variant {self.name!r} has no member {member!r}; known: {list(self.versions())}")
        return self.name if not self.members else f"{self.name}/{member}"


_VARIANTS: dict[str, Variant] = {}


def register_variant(variant: Variant) -> Variant:
    missing = [r for r in (*variant.roots, *variant.only) if r not in _REGISTRY]
    if variant.name in _VARIANTS or missing:
        raise ValueError(f"variant {variant.name!r}: registered already, or unknown stage(s) {missing}")
    for name in variant.stages():
        bad = [f for f, up in get(name).inputs if up in variant.stale() and f not in get(name).optional]
        if bad:
            raise ValueError(f"variant {variant.name!r}: {name}.{bad[0]} reads a stage the variant does not remake "
                             f"and is not optional")
    _VARIANTS[variant.name] = variant
    return variant


def variants() -> tuple[Variant, ...]:
    return tuple(_VARIANTS.values())


def get_variant(name: str) -> Variant:
    try:
        return _VARIANTS[name]
    except KeyError:
        raise ValueError(f"unknown variant {name!r}; known: {list(_VARIANTS)}") from None


register(Stage(
    name="synth",
    module="peflow.stages.synth",
    summary="Generate the built-in procedural corpus (image-text, shift splits, video, QA).",
    code=("src/peflow/data/synth",),
    dataset=True,
))
register(Stage(
    name="validate",
    module="peflow.stages.validate",
    summary="Great Expectations suites on the corpus: bad samples quarantined with reasons, clean copy, Data Docs.",
    inputs=(("data", "synth"),),
    code=("src/peflow/validation", "src/peflow/data/formats.py"),
    key_metrics=("failure_rate",),
    dataset=True,
))
register(Stage(
    name="pretrain",
    module="peflow.stages.pretrain",
    summary="PE-core robust contrastive image pretraining (LAMB, progressive resolution, mask regularization).",
    inputs=(("data", "validate"),),
    distributed=True,
    code=("src/peflow/train", "src/peflow/models", "src/peflow/data/formats.py"),
    resources={"cpu": 2, "gpu": 0, "memMB": 8192},
    model_name="peflow-core",
    key_metrics=("train/final_loss", "train/samples_per_s"),
    ablation=True,
))
register(Stage(
    name="train-captioner",
    module="peflow.stages.train_captioner",
    summary="The video data engine's captioner: frozen PE-core layer -> projector -> causal LM, trained on "
            "image captions and web video text, then refined on human video captions.",
    inputs=(("checkpoint", "pretrain"), ("data", "validate")),
    code=("src/peflow/engine", "src/peflow/models", "src/peflow/train", "src/peflow/data/formats.py"),
    model_name="peflow-captioner",
    key_metrics=("base/bleu4", "base/cider", "base/recall_*", "refined/bleu4", "refined/cider", "refined/recall_*"),
))
register(Stage(
    name="caption",
    module="peflow.stages.caption",
    summary="The video data engine: clip and key-frame captions fused with title and description by a "
            "summarizer into one caption per video (PVD-layout shards with model_caption).",
    inputs=(("captioner", "train-captioner"), ("data", "validate")),
    code=("src/peflow/engine", "src/peflow/models", "src/peflow/data/formats.py", "src/peflow/validation/shards.py"),
    key_metrics=("engine/bleu4", "engine/cider", "engine/recall_*", "clip/bleu4", "metadata/bleu4",
                 "speed/*_videos_per_s"),
    dataset=True,
))
register(Stage(
    name="validate-captions",
    module="peflow.stages.validate_captions",
    summary="Great Expectations suite on the engine's captions (present, UTF-8, length, no loops, no prompt "
            "echo); failing videos quarantined with reasons.",
    inputs=(("data", "caption"),),
    code=("src/peflow/validation", "src/peflow/stages/validate.py", "src/peflow/data/formats.py"),
    key_metrics=("failure_rate",),
    dataset=True,
))
register(Stage(
    name="finetune-video",
    module="peflow.stages.finetune_video",
    summary="Video finetuning of PE-core: frame-averaged clip embeddings, CLIP loss against the engine's captions.",
    inputs=(("checkpoint", "pretrain"), ("data", "validate-captions")),
    distributed=True,
    code=("src/peflow/train", "src/peflow/models", "src/peflow/engine/clips.py", "src/peflow/data/formats.py"),
    resources={"cpu": 2, "gpu": 0, "memMB": 8192},
    model_name="peflow-video",
    key_metrics=("train/final_loss", "train/clips_per_s"),
))
register(Stage(
    name="align-lang",
    module="peflow.stages.align_lang",
    summary="PE lang: PE-core cut at an intermediate layer (auto: a frozen QA probe picks it), LayerScale and "
            "DropPath, aligned to a causal LM on captions and image and video QA; encoder saved in the PE-Lang "
            "layout.",
    inputs=(("checkpoint", "pretrain"), ("data", "validate")),
    distributed=True,
    code=("src/peflow/models", "src/peflow/train", "src/peflow/engine/clips.py", "src/peflow/evaluate/qa.py",
          "src/peflow/evaluate/probes.py", "src/peflow/data/formats.py"),
    resources={"cpu": 2, "gpu": 0, "memMB": 8192},
    model_name="peflow-lang",
    key_metrics=("layer", "chosen/final_loss", "last/final_loss"),
))
register(Stage(
    name="align-spatial",
    module="peflow.stages.align_spatial",
    summary="PE spatial: PE-core's last layer aligned to its best dense layer (frozen teacher) and to mask-logit "
            "similarities (superpixels, or SAM 2), masked input, LayerScale, LAMB; saved in the PE-Spatial layout.",
    inputs=(("checkpoint", "pretrain"), ("data", "validate")),
    distributed=True,
    code=("src/peflow/models", "src/peflow/train", "src/peflow/engine/clips.py", "src/peflow/evaluate/probes.py",
          "src/peflow/data/formats.py"),
    resources={"cpu": 2, "gpu": 0, "memMB": 8192},
    model_name="peflow-spatial",
    key_metrics=("teacher_layer", "train/final_loss_core", "train/final_loss_loc"),
))
register(Stage(
    name="evaluate",
    module="peflow.stages.evaluate",
    summary="Zero-shot classification (clean and shift splits, robustness average), retrieval, layer probes; "
            "video zero-shot and retrieval of the image-only and the video-finetuned model; PE lang's QA per "
            "question type; dense probes and tracking of PE-core and PE spatial.",
    inputs=(("checkpoint", "pretrain"), ("data", "validate"), ("video_checkpoint", "finetune-video"),
            ("lang", "align-lang"), ("spatial", "align-spatial")),
    optional=("video_checkpoint", "lang", "spatial"),
    code=("src/peflow/evaluate", "src/peflow/models", "src/peflow/data/formats.py"),
    evaluates="peflow-core",
    champion_metric="zeroshot/test/top1",
    key_metrics=("zeroshot/test/top1", "zeroshot/test/top1_atypical_colour", "zeroshot_colour/test/top1",
                 "zeroshot/robustness_avg", "retrieval/i2t/R1", "retrieval/t2i/R1", "probe/*/best*",
                 "probe/*/last", "video/*/zeroshot/top1", "video/*/zeroshot_motion/top1",
                 "video/*/retrieval/t2v/R1", "video/*/retrieval/v2t/R1", "lang/*/qa/*/mean*",
                 "dense/*/*"),
))


def _other_recipe(stage: str, cfg: Any, member: str) -> dict[str, Any]:
    from peflow.train.recipe import other_recipe

    return {"recipe": other_recipe(cfg.recipe)} if hasattr(cfg, "recipe") else {}


def _ladder_step(stage: str, cfg: Any, member: str) -> Mapping[str, Any]:
    from peflow.models.presets import get_model_preset

    if stage == "evaluate":
        return ladder.EVALUATE_CHANGES
    p = get_model_preset(cfg.model)
    return ladder.pretrain_changes(member, cfg, p.patch_size, p.image_size)


#: The recipe ablation: pretraining with the other recipe (vanilla CLIP; pe for a vanilla run) at the same budget,
#: evaluated on images and (image-only, frame-averaged) on videos; the video chain is not remade.
ABLATION = "ablation"
register_variant(Variant(
    name=ABLATION, param="ablation",
    summary="the other pretraining recipe (vanilla CLIP; pe for a vanilla run) at the same budget",
    roots=tuple(s.name for s in all_stages() if s.ablation), change=_other_recipe, only=("pretrain", "evaluate")))
#: The engine ablation (paper Tab. 2): video finetuning on title + description instead of the engine's captions.
register_variant(Variant(
    name="metadata", param="engine_ablation",
    summary="video finetuning on the videos' title and description instead of the engine's captions",
    roots=("finetune-video",), change=lambda stage, cfg, member: {"captions": "metadata"}))
#: The paper's ablation ladder (Tab. 26): nine pretrainings, vanilla CLIP to the PE recipe one piece at a time
#: (peflow.ladder), each evaluated on images.
LADDER = "ladder"
register_variant(Variant(
    name=LADDER, param="ladder",
    summary="the paper's ablation ladder (Tab. 26): vanilla CLIP to the PE recipe one step at a time, each "
            "pretrained at the run's budget and evaluated",
    roots=("pretrain", "evaluate"), change=_ladder_step, only=("pretrain", "evaluate"),
    members=ladder.NAMES))


def load_plugins(spec: str | None = None) -> None:
    """Register stages from your own modules: `$PEFLOW_PLUGINS` (or `spec`) is a comma-separated
    list of `module` or `module:function`; each module is imported (and the function called),
    and registers its stages with `register`. Every face (CLI, DAG, TorchX, DVC) then has them."""
    for item in (x.strip() for x in (spec if spec is not None else os.environ.get("PEFLOW_PLUGINS", "")).split(",")):
        if not item:
            continue
        module, _, function = item.partition(":")
        loaded = importlib.import_module(module)
        if function:
            getattr(loaded, function)()


load_plugins()
