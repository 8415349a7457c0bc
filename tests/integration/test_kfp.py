"""`make kfp`: the stage registry compiled to a Kubeflow Pipelines v2 file in the KFP environment
(.venv-kfp, installed from requirements/kfp.txt on first use, reused after), checked against the registry."""

import json
import os
import subprocess

import pytest
import yaml

from peflow import kfp_spec, stages
from tests.helpers import BIN, ROOT, offline_env

pytestmark = pytest.mark.slow

KFP_PYTHON = ROOT / os.environ.get("KFP_VENV", ".venv-kfp") / "bin" / "python"


def param(name):
    return "{{$.inputs.parameters['%s']}}" % name


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """`make kfp` into a temporary folder: (pipeline spec, platform spec, the JSON it compiled, the folder)."""
    out = tmp_path_factory.mktemp("kfp")
    r = subprocess.run(["make", "kfp", f"KFP_OUT={out}"], cwd=ROOT, env=offline_env(), capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, f"make kfp failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    docs = list(yaml.safe_load_all((out / "pe_pipeline.yaml").read_text()))
    assert len(docs) == 2, "expected the pipeline spec and the Kubernetes platform spec"
    return docs[0], docs[1], json.loads((out / "pe_pipeline.json").read_text()), out


def container(pipeline, name):
    return pipeline["deploymentSpec"]["executors"][f"exec-{name}"]["container"]


def test_one_task_per_stage_after_its_upstream_stages(compiled):
    pipeline, _, _, _ = compiled
    tasks = pipeline["root"]["dag"]["tasks"]
    assert sorted(tasks) == sorted(stages.names())
    for s in stages.all_stages():
        assert sorted(tasks[s.name].get("dependentTasks", [])) == sorted(s.needs), s.name
        assert tasks[s.name]["taskInfo"]["name"] == s.name
        assert not tasks[s.name]["cachingOptions"].get("enableCache"), "peflow's output store decides reuse"


def test_parameters_mirror_the_run_options(compiled):
    pipeline, _, spec, _ = compiled
    inputs = pipeline["root"]["inputDefinitions"]["parameters"]
    assert set(inputs) == set(spec["parameters"]) >= {"preset", "root", "image", "nodes"}
    assert inputs["preset"]["defaultValue"] == "nano" and inputs["image"]["defaultValue"] == kfp_spec.IMAGE
    for s in stages.all_stages():
        c = container(pipeline, s.name)
        assert c["image"] == param("pipelinechannel--image")
        args = c["args"]
        assert args[args.index("--out") + 1] == param("root") + "/" + s.name
        assert args[args.index("--preset") + 1] == param("preset")


def test_commands_in_process_and_through_torchx(compiled):
    pipeline, _, _, _ = compiled
    for s in stages.all_stages():
        c = container(pipeline, s.name)
        cmd = c["command"] + c["args"]
        if s.distributed:
            head = cmd[:cmd.index("--")]
            assert head[:3] == ["peflow", "launch", s.name]
            assert head[head.index("--scheduler") + 1] == "kubernetes"
            assert head[head.index("-j") + 1] == param("nodes")
            assert head[head.index("--image") + 1] == param("image")
        else:
            assert cmd[:2] == ["peflow", s.name] and "launch" not in cmd


def test_resources_on_every_task(compiled):
    pipeline, platform, _, _ = compiled
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    for s in stages.all_stages():
        res = container(pipeline, s.name)["resources"]
        want = kfp_spec.LAUNCHER_RESOURCES if s.distributed else s.resources
        assert res["resourceCpuLimit"] == res["resourceCpuRequest"] == str(want["cpu"])
        assert res["resourceMemoryLimit"] == res["resourceMemoryRequest"] == f"{want['memMB']}M"
        assert ("accelerator" in res) == (want["gpu"] > 0)
        if s.distributed:  # the torchrun pods get the registry's resources per node
            args = container(pipeline, s.name)["args"]
            assert args[args.index("--memMB") + 1] == str(s.resources["memMB"])
        k8s = executors[f"exec-{s.name}"]
        assert k8s["pvcMount"][0]["mountPath"] == "/mnt/peflow"
        assert ("secretAsVolume" in k8s) == s.distributed  # the kubeconfig TorchX submits with


def test_compile_options_gpu_image_and_no_platform_spec(compiled):
    _, _, spec, out = compiled
    evaluate = next(s for s in spec["stages"] if s["name"] == "evaluate")
    evaluate["resources"]["gpu"] = 1
    (out / "gpu.json").write_text(json.dumps(spec))
    r = subprocess.run([str(KFP_PYTHON), "kfp/compile.py", str(out / "gpu.json"), "--out", str(out / "gpu.yaml"),
                        "--image", "reg/peflow:1", "--pvc", "", "--kubeconfig-secret", "", "--env", "A=b"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    docs = list(yaml.safe_load_all((out / "gpu.yaml").read_text()))
    assert len(docs) == 1, "no Kubernetes settings asked for: no platform spec"
    pipeline = docs[0]
    assert pipeline["root"]["inputDefinitions"]["parameters"]["image"]["defaultValue"] == "reg/peflow:1"
    acc = container(pipeline, "evaluate")["resources"]["accelerator"]
    assert acc["resourceType"] == "nvidia.com/gpu" and acc["resourceCount"] == "1"
    assert container(pipeline, "synth")["env"] == [{"name": "A", "value": "b"}]
    bad = subprocess.run([str(KFP_PYTHON), "kfp/compile.py", str(out / "pe_pipeline.yaml")], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "kfp/compile.py" in bad.stderr


def resolved(pipeline, name, defaults):
    """A task's command with each pipeline parameter placeholder replaced by its default."""
    c = container(pipeline, name)
    out = []
    for arg in c["command"] + c["args"]:
        for key, value in defaults.items():
            arg = arg.replace(param(key), value)
        out.append(arg)
    return out


def test_compiled_commands_are_accepted_by_peflow(compiled, tmp_path):
    """Each in-process task's options parse (`--help` after them); each distributed task's launch prints its
    Volcano job (`--dryrun`): the commands the pods run are real peflow commands."""
    from peflow import cli

    pipeline, _, spec, _ = compiled
    defaults = {k: v["default"] for k, v in spec["parameters"].items()} | {"root": str(tmp_path)}
    for s in stages.all_stages():
        cmd = resolved(pipeline, s.name, defaults)
        if not s.distributed:
            with pytest.raises(SystemExit) as exit_:
                cli.main([*cmd[1:], "--help"])
            assert exit_.value.code in (0, None), cmd
            continue
        split = cmd.index("--")
        r = subprocess.run([str(BIN / "peflow"), *cmd[1:split], "--dryrun", *cmd[split:]],
                           cwd=ROOT, env=offline_env(), capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, f"{cmd}\n{r.stderr[-2000:]}"
        assert "batch.volcano.sh/v1alpha1" in r.stdout and f"{tmp_path}/{s.name}" in r.stdout
