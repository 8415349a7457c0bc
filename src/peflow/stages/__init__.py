"""The stage registry: the one list the CLI, TorchX components, the Airflow DAG
and dvc.yaml are generated from (or checked against).

Stage modules keep their top-level imports light (stdlib, numpy); torch and the
model libraries are imported inside `run`, so `peflow --help` stays fast.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from typing import Any


@dataclasses.dataclass(frozen=True, kw_only=True)
class Stage:
    """One pipeline stage.

    Attributes:
        name: command name (`peflow <name>`), DAG task id and DVC stage name.
        module: the module holding `Config` and `run(cfg) -> Path`.
        summary: one line for `--help`.
        inputs: (option, upstream stage) pairs: the stage reads the upstream
            stage's output folder through `--<option>`.
        distributed: launched through TorchX (torchrun) rather than in-process.
        code: source paths (beyond the stage module) whose change reruns it in DVC.
    """

    name: str
    module: str
    summary: str
    inputs: tuple[tuple[str, str], ...] = ()
    distributed: bool = False
    code: tuple[str, ...] = ()

    @property
    def needs(self) -> tuple[str, ...]:
        """Upstream stages, in input order."""
        return tuple(dict.fromkeys(up for _, up in self.inputs))

    def load(self) -> Any:
        return importlib.import_module(self.module)

    @property
    def config_cls(self) -> type:
        return self.load().Config

    @property
    def run(self) -> Callable[[Any], Any]:
        return self.load().run


STAGES: tuple[Stage, ...] = (
    Stage(
        name="synth",
        module="peflow.stages.synth",
        summary="Generate the built-in procedural corpus (image-text, shift splits, video, QA).",
        code=("src/peflow/data/synth",),
    ),
    Stage(
        name="validate",
        module="peflow.stages.validate",
        summary="Great Expectations suites on the corpus: bad samples quarantined with reasons, clean copy, Data Docs.",
        inputs=(("data", "synth"),),
        code=("src/peflow/validation",),
    ),
    Stage(
        name="pretrain",
        module="peflow.stages.pretrain",
        summary="PE-core robust contrastive image pretraining (LAMB, progressive resolution, mask regularization).",
        inputs=(("data", "validate"),),
        distributed=True,
        code=("src/peflow/train", "src/peflow/models"),
    ),
    Stage(
        name="evaluate",
        module="peflow.stages.evaluate",
        summary="Zero-shot classification (clean and shift splits, robustness average) and image-text retrieval.",
        inputs=(("checkpoint", "pretrain"), ("data", "validate")),
        code=("src/peflow/evaluate",),
    ),
)


def get(name: str) -> Stage:
    for s in STAGES:
        if s.name == name:
            return s
    raise ValueError(f"unknown stage {name!r}; known: {[s.name for s in STAGES]}")
