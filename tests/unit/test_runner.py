"""The stage runner and the output store: keys, skips, reuse across folders, errors."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from peflow import runner, stages, store
from peflow.config import ConfigError, InputError, opt
from peflow.stages.base import Result

CALLS: list[str] = []
STAGE = stages.Stage(name="count-files", module=__name__, summary="Counts files.", inputs=(("data", "synth"),))


@dataclass(kw_only=True)
class Config:
    data: str = opt("", "Folder.")
    out: str = opt("", "Output.")
    factor: int = opt(1, "Multiplier.", min=1)
    threads: int = opt(1, "Threads (no effect on the output).", key=False)


def run(cfg: Config, out: Path | None) -> Result:
    CALLS.append(cfg.out)
    n = sum(1 for p in Path(cfg.data).rglob("*") if p.is_file()) * cfg.factor
    (out / "n.txt").write_text(str(n))
    return Result(metrics={"n": n})


@pytest.fixture
def stage(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    CALLS.clear()
    data = tmp_path / "data"
    data.mkdir()
    (data / "a").write_text("a")
    with stages.registered(STAGE) as s:
        yield s, data


def test_same_key_skips_then_reuses_in_a_fresh_folder(stage, tmp_path):
    s, data = stage
    first = runner.execute(s, Config(data=str(data), out=str(tmp_path / "r1" / "out")))
    assert first.ran and json.loads((tmp_path / "r1" / "out" / "metrics.json").read_text()) == {"n": 1}
    again = runner.execute(s, Config(data=str(data), out=str(tmp_path / "r1" / "out"), threads=4))
    assert (again.ran, again.reused, again.key) == (False, "up-to-date", first.key)  # threads: not in the key
    fresh = runner.execute(s, Config(data=str(data), out=str(tmp_path / "r2" / "out")))
    assert (fresh.ran, fresh.reused) == (False, "store")
    assert (tmp_path / "r2" / "out" / "n.txt").read_text() == "1"
    assert store.find(s.name, first.key) is not None
    forced = runner.execute(s, Config(data=str(data), out=str(tmp_path / "r2" / "out")), force=True)
    assert forced.ran and len(CALLS) == 2


def test_config_input_and_code_change_the_key(stage, tmp_path):
    s, data = stage
    base = runner.execute(s, Config(data=str(data), out=str(tmp_path / "o")))
    other = runner.execute(s, Config(data=str(data), out=str(tmp_path / "o"), factor=2))
    assert other.ran and other.key != base.key and other.metrics == {"n": 2}
    (data / "b").write_text("b")
    changed = runner.execute(s, Config(data=str(data), out=str(tmp_path / "o")))
    assert changed.ran and changed.key not in (base.key, other.key)
    runner._CODE[s.name] = "another code version"
    try:
        assert runner.execute(s, Config(data=str(data), out=str(tmp_path / "o"))).ran
    finally:
        runner._CODE.pop(s.name)


def test_errors_name_the_field_or_the_file(stage, tmp_path):
    s, data = stage
    with pytest.raises(ConfigError, match=r"count-files.factor: must be >= 1"):
        runner.execute(s, Config(data=str(data), out=str(tmp_path / "o"), factor=0))
    with pytest.raises(ConfigError, match=r"count-files.data: required"):
        runner.execute(s, Config(out=str(tmp_path / "o")))
    with pytest.raises(InputError, match=r"data .*nowhere: does not exist"):
        runner.execute(s, Config(data=str(tmp_path / "nowhere"), out=str(tmp_path / "o")))
    assert not (tmp_path / "o").exists() and CALLS == []


def test_a_failing_stage_publishes_nothing(stage, tmp_path, monkeypatch):
    s, data = stage

    def boom(cfg, out):
        (out / "half.txt").write_text("x")
        raise RuntimeError("killed")

    monkeypatch.setattr(__import__(__name__, fromlist=["run"]), "run", boom)
    with pytest.raises(RuntimeError, match="killed"):
        runner.execute(s, Config(data=str(data), out=str(tmp_path / "o")))
    assert not (tmp_path / "o").exists() and not (store.root() / s.name).exists()
