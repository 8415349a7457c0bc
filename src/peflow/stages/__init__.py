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
from collections.abc import Iterator, Mapping
from typing import Any


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
        ablation: repeated in an ablation run (with the other recipe), as are the stages that
            read its output.
        dataset: its output is a dataset (corpus, validated data, captions): pushed to DVC.
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


#: The variant of an ablation run: the other recipe at the same budget, under OUT/ablation/.
ABLATION = "ablation"


def stage_key(stage: str, name: str) -> str:
    """A stage metric's name prefixed by its stage: `evaluate/zeroshot/test/top1`."""
    return name if name.startswith(f"{stage}/") else f"{stage}/{name}"


def metric_key(summary: Mapping[str, Any], name: str) -> str:
    """A stage metric's name in the pipeline run: `evaluate/zeroshot/test/top1`,
    `ablation/evaluate/zeroshot/test/top1` for the ablation variant."""
    key = stage_key(summary["stage"], name)
    return f"{summary['variant']}/{key}" if summary.get("variant") else key


def ablation_stages() -> list[str]:
    """Stages an ablation runs a second time: those marked `ablation` and every stage reading one."""
    return downstream({s.name for s in all_stages() if s.ablation})


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
    name="evaluate",
    module="peflow.stages.evaluate",
    summary="Zero-shot classification (clean and shift splits, robustness average), retrieval, layer probes.",
    inputs=(("checkpoint", "pretrain"), ("data", "validate")),
    code=("src/peflow/evaluate", "src/peflow/models", "src/peflow/data/formats.py"),
    evaluates="peflow-core",
    champion_metric="zeroshot/test/top1",
    key_metrics=("zeroshot/test/top1", "zeroshot/test/top1_atypical_colour", "zeroshot_colour/test/top1",
                 "zeroshot/robustness_avg", "retrieval/i2t/R1", "retrieval/t2i/R1", "probe/*/best*",
                 "probe/*/last"),
))


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
