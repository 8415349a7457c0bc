"""The stage contract: a stage registered at test time appears on every face.

This module is itself the toy stage's module (its `Config` and `run`); the
test registers it (`register_toy`, also loadable in a child process through
`PEFLOW_PLUGINS`) and finds it in the CLI help, a real run through the stage
runner, the TorchX AppDef, the Airflow DAG, `params.yaml`/`dvc.yaml`, the
Params form, `peflow run`'s resolved configs and the run report, with no
other file touched.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from peflow import cli, orchestration, pipeline, stages
from peflow.config import ConfigError, opt
from peflow.stages.base import Result
from tests.dags.airflow_home import run_py

TOY = stages.Stage(
    name="toy-stage",
    module=__name__,
    summary="A toy stage that scales a number (contract test).",
    inputs=(("data", "synth"),),
    resources={"cpu": 3, "gpu": 0, "memMB": 1024},
    key_metrics=("toy/score",),
)


@dataclass(kw_only=True)
class Config:
    """Options of the toy stage."""

    data: str = opt("", "Corpus folder.")
    out: str = opt("", "Output folder.")
    scale: float = opt(1.0, "How much to scale the score by.", min=0.0)


def run(cfg: Config, out: Path | None) -> Result | None:
    """Write the scaled number of corpus files; its metric is the scale."""
    n = sum(1 for p in Path(cfg.data).rglob("*") if p.is_file())
    (out / "toy.json").write_text(json.dumps({"files": n, "scaled": n * cfg.scale}))
    return Result(metrics={"toy/score": cfg.scale}, counts={"files": n})


def register_toy() -> None:
    """The plugin hook: `PEFLOW_PLUGINS=test_stage_contract:register_toy` (this folder on the path)."""
    stages.register(TOY)


@pytest.fixture
def toy():
    with stages.registered(TOY) as stage:
        yield stage


def _peflow(*argv: str) -> int:
    with pytest.raises(SystemExit) as e:
        cli.main(list(argv))
    return e.value.code


def test_cli_help_and_a_real_run_through_the_runner(toy, tiny_corpus, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert _peflow("--help") == 0
    assert "toy-stage" in capsys.readouterr().out
    assert _peflow("toy-stage", "--help") == 0
    assert "--scale" in capsys.readouterr().out
    out = tmp_path / "toy"
    assert _peflow("toy-stage", "--data", str(tiny_corpus), "--out", str(out), "--scale", "2") == 0
    assert json.loads((out / "metrics.json").read_text()) == {"toy/score": 2.0}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "toy-stage" and manifest["key"] and "toy.json" in manifest["outputs"]
    # the same key in a fresh folder: reused from the store, not run
    again = tmp_path / "again"
    assert _peflow("toy-stage", "--data", str(tiny_corpus), "--out", str(again), "--scale", "2") == 0
    assert "reused from the store" in capsys.readouterr().out
    assert (again / "toy.json").read_bytes() == (out / "toy.json").read_bytes()
    assert _peflow("toy-stage", "--data", str(tiny_corpus), "--out", str(out), "--scale", "-1") == 2
    assert "toy-stage.scale: must be >= 0.0" in capsys.readouterr().err


def test_torchx_appdef_uses_the_registry_resources(toy):
    from components.launch import build_app

    app = build_app("toy-stage", ["--out", "O"], j="1x1")
    (role,) = app.roles
    assert role.name == "toy-stage" and role.resource.cpu == 3 and role.resource.memMB == 1024
    assert "-m peflow.cli toy-stage --out O" in " ".join(role.args)


def test_dvc_params_form_run_configs_and_report(toy, tmp_path):
    params = pipeline.params("nano")
    assert params["toy-stage"] == {"scale": 1.0}
    entry = pipeline.dvc_yaml(params)["stages"]["toy-stage"]
    assert entry["cmd"] == "peflow toy-stage --preset ${preset} --out data/toy-stage --data data/synth ${toy-stage}"
    assert "data/synth" in entry["deps"] and entry["outs"] == ["data/toy-stage"]
    assert "toy-stage" in orchestration.params_spec()["stage"]["examples"]
    cfgs = orchestration.resolve(orchestration.RunConfig(out=str(tmp_path), overrides="toy-stage.scale=3"))
    assert cfgs["toy-stage"].scale == 3.0 and cfgs["toy-stage"].data == str(tmp_path / "synth")
    with pytest.raises(ConfigError, match="toy-stage.scale"):
        orchestration.resolve(orchestration.RunConfig(out=str(tmp_path), overrides="toy-stage.scale=-3"))

    from peflow.run_report import build_report

    summary = {"stage": "toy-stage", "task": "toy-stage", "variant": None, "recipe": None, "out": str(tmp_path),
               "ran": True, "seconds": 1.0, "metrics": {"toy/score": 3.0}}
    assert "<td>toy-stage/toy/score</td>" in build_report(orchestration.RunConfig(out=str(tmp_path)), "r", [summary])


def test_dag_has_the_task_after_its_upstream(airflow_env):
    code = r"""
import json
from airflow.dag_processing.dagbag import DagBag
bag = DagBag()
out = {"errors": {k: str(v)[-2000:] for k, v in bag.import_errors.items()}}
if "pe_pipeline" in bag.dags:
    t = bag.dags["pe_pipeline"].get_task("toy-stage")
    out.update(upstream=sorted(t.upstream_task_ids), doc=t.doc_md, outlets=[a.uri for a in t.outlets])
print("RESULT" + json.dumps(out))
"""
    env = {**airflow_env, "PEFLOW_PLUGINS": f"{__name__}:register_toy", "PYTHONPATH": str(Path(__file__).parent)}
    r = run_py(code, env)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads([x for x in r.stdout.splitlines() if x.startswith("RESULT")][-1][len("RESULT"):])
    assert got["errors"] == {}
    assert got["upstream"] == ["start_run", "synth"] and got["doc"] == TOY.summary
    assert got["outlets"] == ["x-peflow://stages/toy-stage"]
