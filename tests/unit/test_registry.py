"""Contract tests over every registered stage."""

import dataclasses
from pathlib import Path

import pytest

from peflow import config, pipeline, stages

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("stage", stages.STAGES, ids=lambda s: s.name)
def test_config_round_trip_and_help(stage):
    cls = stage.config_cls
    assert dataclasses.is_dataclass(cls)
    for f in dataclasses.fields(cls):
        assert config.field_help(f), f"{cls.__name__}.{f.name} has no help text"
    required = {
        f.name: "x"
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    }
    cfg = cls(**required)
    assert config.from_dict(cls, config.to_dict(cfg)) == cfg
    with pytest.raises(ValueError, match="nope"):
        config.from_dict(cls, {**required, "nope": 1})


def test_stage_names_unique_and_inputs_known():
    names = [s.name for s in stages.STAGES]
    assert len(names) == len(set(names))
    for s in stages.STAGES:
        for _, up in s.inputs:
            assert names.index(up) < names.index(s.name), f"{s.name} reads {up} before it exists"


def test_committed_dvc_yaml_is_generated_from_registry():
    want = pipeline.render_dvc_yaml(ROOT / "params.yaml")
    have = (ROOT / "dvc.yaml").read_text()
    assert have == want, "dvc.yaml is stale: run `make dvc-yaml`"


def test_library_does_not_import_orchestration():
    """One-way layers: src/peflow never imports airflow or torchx."""
    for path in (ROOT / "src" / "peflow").rglob("*.py"):
        text = path.read_text()
        for banned in ("import airflow", "from airflow", "import torchx", "from torchx"):
            assert banned not in text, f"{path} contains {banned!r}"
