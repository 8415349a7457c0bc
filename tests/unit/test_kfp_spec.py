"""The stage graph exported for Kubeflow Pipelines (peflow.kfp_spec): main environment, no kfp."""

import json
import re
import sys

import pytest

from peflow import kfp_spec, presets, stages

PLACEHOLDER = re.compile(r"\{([a-z_]+)\}")


def after_dashdash(command):
    return command[command.index("--") + 1:]


def test_one_entry_per_registered_stage_in_run_order_with_its_upstreams():
    spec = kfp_spec.spec("test")
    assert spec["format"] == kfp_spec.FORMAT
    assert [s["name"] for s in spec["stages"]] == stages.names()
    for entry in spec["stages"]:
        stage = stages.get(entry["name"])
        assert entry["upstream"] == list(stage.needs)
        assert entry["distributed"] is stage.distributed
    json.loads(json.dumps(spec))  # plain JSON


def test_in_process_stage_runs_its_cli_on_the_run_root():
    entry = next(s for s in kfp_spec.spec()["stages"] if s["name"] == "train-captioner")
    assert entry["command"] == ["peflow", "train-captioner", "--preset", "{preset}", "--out", "{root}/train-captioner",
                                "--checkpoint", "{root}/pretrain", "--data", "{root}/validate"]
    assert entry["resources"] == dict(stages.get("train-captioner").resources)
    assert "node_resources" not in entry


def test_distributed_stage_launches_through_torchx_on_kubernetes():
    for entry in (s for s in kfp_spec.spec()["stages"] if s["distributed"]):
        stage, cmd = stages.get(entry["name"]), entry["command"]
        assert cmd[:3] == ["peflow", "launch", stage.name]
        head = cmd[:cmd.index("--")]
        assert head[head.index("--scheduler") + 1] == "kubernetes"
        assert head[head.index("-j") + 1] == "{nodes}" and head[head.index("--image") + 1] == "{image}"
        for flag, key in (("--cpu", "cpu"), ("--gpu", "gpu"), ("--memMB", "memMB")):
            assert head[head.index(flag) + 1] == str(stage.resources[key])
        assert after_dashdash(cmd)[:4] == ["--preset", "{preset}", "--out", "{root}/" + stage.name]
        assert entry["resources"] == dict(kfp_spec.LAUNCHER_RESOURCES)
        assert entry["node_resources"] == dict(stage.resources)


def test_commands_name_only_declared_parameters_and_defaults_follow_the_preset():
    spec = kfp_spec.spec("b16", root="s3://bucket/runs/r1", image="reg/peflow:1")
    used = {p for s in spec["stages"] for arg in s["command"] for p in PLACEHOLDER.findall(arg)}
    assert used <= set(spec["parameters"])
    defaults = {k: v["default"] for k, v in spec["parameters"].items()}
    assert defaults["preset"] == "b16" and defaults["nodes"] == presets.get("b16").nodes
    assert defaults["root"] == "s3://bucket/runs/r1" and defaults["image"] == "reg/peflow:1"


def test_gpu_option_sets_gpus_per_node_of_distributed_stages_only():
    spec = kfp_spec.spec(gpu=8)
    for entry in spec["stages"]:
        if entry["distributed"]:
            assert entry["node_resources"]["gpu"] == 8
            assert entry["command"][entry["command"].index("--gpu") + 1] == "8"
            assert entry["resources"]["gpu"] == 0  # the launcher needs none
        else:
            assert "--gpu" not in entry["command"]
    with pytest.raises(ValueError, match="gpu"):
        kfp_spec.spec(gpu=-1)


def test_a_plugin_stage_is_exported_too():
    toy = stages.Stage(name="toy-align", module="tests.unit.nowhere", summary="a toy stage",
                       inputs=(("checkpoint", "pretrain"),), distributed=True,
                       resources={"cpu": 16, "gpu": 8, "memMB": 64000})
    with stages.registered(toy):
        entry = kfp_spec.spec()["stages"][-1]
    assert entry["name"] == "toy-align" and entry["upstream"] == ["pretrain"]
    assert entry["node_resources"] == {"cpu": 16, "gpu": 8, "memMB": 64000}
    assert after_dashdash(entry["command"])[-2:] == ["--checkpoint", "{root}/pretrain"]


def test_cli_writes_the_json_and_refuses_an_unknown_preset(tmp_path, capsys):
    out = tmp_path / "spec" / "pe.json"
    assert kfp_spec.main(["test", "--out", str(out)]) == 0
    assert json.loads(out.read_text()) == kfp_spec.spec("test")
    assert kfp_spec.main(["nope"]) == 2
    assert "nope" in capsys.readouterr().err
    assert "kfp" not in sys.modules
