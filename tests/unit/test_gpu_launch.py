"""GPU launches: the named resources of 8-GPU nodes, the GPU presets' requests on Kubernetes by
default (peflow launch, peflow run and the DAG's launch callback), and the CPU presets unchanged."""

from __future__ import annotations

import importlib.metadata
import io
import subprocess
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import torchx.specs as specs
import yaml

from components import launch, resources
from components.stage import stage as stage_component
from peflow import orchestration, presets, stages

GPU_PRESETS = {"b16": "1x8", "l14": "4x8", "g14": "16x8"}
K8S_VERSION = "1.33"
ARGS = ["--data", "/mnt/corpus", "--out", "/mnt/runs/pretrain"]


def _job(preset: str, *, stage: str = "pretrain", **kw: Any) -> dict:
    """The Volcano Job of `peflow launch <stage> -j <preset's nodes> --scheduler kubernetes --dryrun`."""
    kw.setdefault("j", presets.get(preset).nodes)
    text = launch.dryrun(stage, ["--preset", preset, *ARGS], scheduler="kubernetes", queue="gpu",
                         image="registry.example/peflow:1", **kw)
    return yaml.safe_load(text)


def _container(task: dict) -> dict:
    (c,) = task["template"]["spec"]["containers"]
    return c


def _env(c: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in c["env"]}


def test_every_named_resource_is_an_entry_point_torchx_resolves() -> None:
    """Registered the TorchX way (pyproject's `torchx.named_resources`), the same resources as the module's."""
    eps = {ep.name: ep for ep in importlib.metadata.entry_points(group="torchx.named_resources")}
    assert set(resources.NAMED_RESOURCES) <= set(eps), "reinstall: pip install --no-deps -e ."
    for name, factory in resources.NAMED_RESOURCES.items():
        assert specs.named_resources[name] == factory() == resources.get(name)
        r = factory()
        assert r.gpu == 8 and r.cpu >= 88 and r.memMB >= 1000 * resources.GiB, name


def test_aws_nodes_keep_torchx_instance_type_and_efa_and_leave_the_system_its_share() -> None:
    for ours, theirs in (("peflow_aws_p4de.24xlarge", "aws_p4de.24xlarge"), ("peflow_aws_p5.48xlarge",
                                                                             "aws_p5.48xlarge")):
        r, t = resources.get(ours), specs.named_resources[theirs]
        assert r.capabilities == t.capabilities and r.devices == t.devices and r.gpu == t.gpu == 8
        assert r.cpu == t.cpu - resources.SYSTEM_CPUS and r.memMB < t.memMB
    assert resources.get("peflow_aws_p5.48xlarge").devices == {"vpc.amazonaws.com/efa": 32}
    assert resources.get("aws_g5.48xlarge").gpu == 8  # any TorchX name resolves too
    with pytest.raises(ValueError, match="unknown named resource 'dgx'"):
        resources.get("dgx")


@pytest.mark.parametrize("preset", sorted(GPU_PRESETS))
def test_gpu_presets_request_their_nodes_by_default(preset: str) -> None:
    """Without --gpu/--cpu/--memMB: 8 GPUs, 88 CPUs, most of the node's memory, /dev/shm in memory, NCCL,
    one Volcano task per node, torchrun over the preset's nodes x 8; every pod template valid."""
    nodes = GPU_PRESETS[preset]
    assert presets.get(preset).nodes == nodes
    job = _job(preset)
    n, per_node = (int(x) for x in nodes.split("x"))
    tasks = job["spec"]["tasks"]
    assert len(tasks) == n
    for i, t in enumerate(tasks):
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {**t["template"]["metadata"], "name": t["name"]},
               "spec": t["template"]["spec"]}
        kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
        c = _container(t)
        limits, requests = c["resources"]["limits"], c["resources"]["requests"]
        assert limits["nvidia.com/gpu"] == requests["nvidia.com/gpu"] == "8"
        assert limits["cpu"] == "88000m" and requests["cpu"] == "87900m"
        assert int(limits["memory"].rstrip("M")) >= 1_500_000  # MB
        (shm,) = [v for v in t["template"]["spec"]["volumes"] if v["name"] == "dshm"]
        assert shm["emptyDir"]["medium"] == "Memory"
        assert {"mountPath": "/dev/shm", "name": "dshm"} in c["volumeMounts"]
        env = _env(c)
        assert env["NCCL_DEBUG"] == "WARN" and env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
        assert env["OMP_NUM_THREADS"] == str(88 // per_node)
        cmd = c["command"][-1]
        assert f"--nnodes {n} --nproc_per_node {per_node}" in cmd and f"--preset {preset}" in cmd
        rank0 = "${TORCHX_RANK0_HOST:=localhost}:29500" if i == 0 else "${VC_PRETRAIN_0_HOSTS:=localhost}:29500"
        if n == 1:
            rank0 = "localhost:0"  # one node: torchrun's standalone rendezvous
        assert f"--rdzv_endpoint {rank0}" in cmd  # c10d on the rank-0 pod (Volcano's svc plugin)
        assert ("TORCHX_RANK0_HOST" in env) == (i == 0)


def test_gpu_preset_training_settings() -> None:
    b16, l14, g14 = (presets.get(p).config("pretrain") for p in ("b16", "l14", "g14"))
    assert (b16.parallelism, b16.recompute, b16.micro_batch) == ("ddp", True, 2048)
    assert (l14.parallelism, l14.recompute) == ("fsdp", True)
    assert (g14.model, g14.parallelism, g14.recompute) == ("pe-core-g14", "fsdp", True)
    for p, cfg in (("b16", b16), ("l14", l14), ("g14", g14)):
        n, per_node = (int(x) for x in presets.get(p).nodes.split("x"))
        assert cfg.micro_batch * n * per_node == 16_384, p  # the contrastive batch of every GPU preset
        assert cfg.global_batch == 131_072 and (cfg.global_batch // (n * per_node)) % cfg.micro_batch == 0


def test_hyphenated_stages_rendezvous_on_volcanos_variable() -> None:
    """TorchX 0.7 would read `${VC_TRAIN-CAPTIONER_0_HOSTS:=...}` (bash: a default for VC_TRAIN)."""
    job = _job("b16", stage="train-captioner", j="2x8")
    for i, t in enumerate(job["spec"]["tasks"]):
        cmd = _container(t)["command"][-1]
        assert "--rdzv_endpoint ${TORCHX_RANK0_HOST:-${VC_TRAIN_CAPTIONER_0_HOSTS:-localhost}}:29500" in cmd
    out = subprocess.run(["bash", "-c", "VC_TRAIN_CAPTIONER_0_HOSTS=train-captioner-0.job; "
                          "echo ${TORCHX_RANK0_HOST:-${VC_TRAIN_CAPTIONER_0_HOSTS:-localhost}}"],
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out == "train-captioner-0.job"


def test_a_named_resource_or_explicit_resources_override_the_preset() -> None:
    app = stage_component("--preset", "b16", *ARGS, name="pretrain", j="4x8", h="peflow_aws_p5.48xlarge")
    r = app.roles[0].resource
    assert (r.cpu, r.gpu, r.devices) == (184, 8, {"vpc.amazonaws.com/efa": 32})
    assert app.roles[0].env["FI_PROVIDER"] == "efa"
    pod = _job("b16", h="peflow_aws_p5.48xlarge")["spec"]["tasks"][0]["template"]
    assert pod["spec"]["nodeSelector"] == {"node.kubernetes.io/instance-type": "p5.48xlarge"}
    assert pod["spec"]["containers"][0]["resources"]["limits"]["vpc.amazonaws.com/efa"] == "32"
    explicit = stage_component("--preset", "b16", name="pretrain", j="4x8", gpu=8, cpu=64, memMB=400_000)
    assert (explicit.roles[0].resource.cpu, explicit.roles[0].resource.memMB) == (64, 400_000)
    with pytest.raises(ValueError, match="16 processes per node but 8 GPUs"):
        stage_component("--preset", "b16", name="pretrain", j="1x16")


def test_components_launch_takes_a_resource_option(capsys: pytest.CaptureFixture[str]) -> None:
    rc = launch.main(["pretrain", "-j", "2x8", "--scheduler", "kubernetes", "--dryrun", "--resource",
                      "peflow_8xa100_80gb", "--", "--preset", "l14", *ARGS])
    assert rc == 0
    (task, _) = yaml.safe_load(capsys.readouterr().out)["spec"]["tasks"]
    assert _container(task)["resources"]["limits"]["memory"] == f"{resources.gpu8_a100_80gb().memMB}M"


@pytest.mark.parametrize("preset", ["test", "nano", "small-cpu"])
def test_cpu_presets_keep_the_stages_cpu_resources(preset: str) -> None:
    for name in (s.name for s in stages.all_stages() if s.distributed):
        app = stage_component("--preset", preset, name=name, j="2x1")
        r, want = app.roles[0].resource, stages.get(name).resources
        assert (r.cpu, r.gpu, r.memMB) == (want["cpu"], want["gpu"], want["memMB"]) and not r.devices
        assert "NCCL_DEBUG" not in app.roles[0].env and app.roles[0].env["OMP_NUM_THREADS"] == "2"
    assert stage_component(name="pretrain", j="2x1").roles[0].resource.gpu == 0  # no --preset: nano's


class _Captured(Exception):
    """Stops `run_stage` once the launch callback has the stage's arguments."""


def _launch_args(tmp_path: Path, preset: str, monkeypatch: pytest.MonkeyPatch) -> tuple[str, list[str], Any]:
    """What `orchestration.run_stage` hands the launch callback for pretrain (the DAG's and peflow run's)."""
    monkeypatch.setattr(orchestration.runner, "reuse", lambda *a, **k: None)
    seen: dict[str, Any] = {}

    def capture(name: str, argv: list[str], cfg: orchestration.RunConfig) -> None:
        seen.update(name=name, argv=argv, cfg=cfg)
        raise _Captured

    cfg = orchestration.RunConfig(out=str(tmp_path / "run"), preset=preset, scheduler="kubernetes", stage="pretrain")
    with pytest.raises(_Captured):
        orchestration.run_stage("pretrain", cfg, launch=capture)
    return seen["name"], seen["argv"], seen["cfg"]


@pytest.mark.parametrize("preset", ["l14", "g14"])
def test_the_dags_launch_requests_the_presets_gpus(preset: str, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The DAG's callback builds `launch.run(name, argv, scheduler=, j=cfg.launch_nodes())`'s AppDef."""
    name, argv, cfg = _launch_args(tmp_path, preset, monkeypatch)
    app = launch.build_app(name, argv, j=cfg.launch_nodes(), rdzv_port=29500)
    (role,) = app.roles
    assert role.num_replicas == int(GPU_PRESETS[preset].split("x")[0]) and role.resource.gpu == 8
    assert "--parallelism fsdp" in " ".join(role.args) and "--recompute" in " ".join(role.args)


def test_peflow_runs_child_launch_requests_the_presets_gpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`peflow run`'s `launch_subprocess` command, replayed as a dry run of `components.launch`."""
    name, argv, cfg = _launch_args(tmp_path, "b16", monkeypatch)
    calls: list[list[str]] = []
    monkeypatch.setattr(orchestration.subprocess, "call", lambda cmd: calls.append(cmd) or 0)
    monkeypatch.setattr(orchestration.runner, "published", lambda *a, **k: None)
    orchestration.launch_subprocess(name, argv, cfg)
    (cmd,) = calls
    launch_argv = cmd[cmd.index("launch") + 1:]
    split = launch_argv.index("--")
    out = io.StringIO()
    with redirect_stdout(out):
        assert launch.main([*launch_argv[:split], "--dryrun", *launch_argv[split:]]) == 0
    tasks = yaml.safe_load(out.getvalue())["spec"]["tasks"]
    assert len(tasks) == 1  # b16: one node of 8 GPUs
    assert all(_container(t)["resources"]["limits"]["nvidia.com/gpu"] == "8" for t in tasks)


def test_the_deployments_cluster_settings_reach_the_volcano_job(monkeypatch: pytest.MonkeyPatch) -> None:
    """On kubernetes the launcher's environment (k8s/config.yaml's peflow-launch) gives namespace, queue,
    service account, image and volumes, and tracking variables are forwarded; credentials are not."""
    import yaml

    monkeypatch.setenv("PEFLOW_K8S_NAMESPACE", "peflow")
    monkeypatch.setenv("PEFLOW_K8S_QUEUE", "peflow-training")
    monkeypatch.setenv("PEFLOW_K8S_SERVICE_ACCOUNT", "peflow-training")
    monkeypatch.setenv("PEFLOW_IMAGE", "registry.example/peflow:7")
    monkeypatch.setenv("PEFLOW_K8S_MOUNTS", "type=volume,src=peflow-checkpoints,dst=/mnt/peflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "never-in-a-job-spec")
    job = yaml.safe_load(launch.dryrun("pretrain", ["--preset", "b16", *ARGS], scheduler="kubernetes"))
    assert job["spec"]["queue"] == "peflow-training"  # the namespace goes with the create call:
    assert launch.scheduler_cfg("kubernetes", queue=None, namespace=None, log_dir=None) == {
        "queue": "peflow-training", "namespace": "peflow", "service_account": "peflow-training"}
    pod = job["spec"]["tasks"][0]["template"]["spec"]
    assert pod["serviceAccountName"] == "peflow-training"
    c = pod["containers"][0]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert c["image"] == "registry.example/peflow:7" and env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert "AWS_SECRET_ACCESS_KEY" not in env
    assert {"mountPath": "/mnt/peflow", "name": "mount-0", "readOnly": False} in c["volumeMounts"]
    assert {"name": "mount-0", "persistentVolumeClaim": {"claimName": "peflow-checkpoints"}} in pod["volumes"]
