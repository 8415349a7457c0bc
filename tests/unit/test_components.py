"""TorchX components: built without launching, and the Kubernetes dry-run
request (a Volcano Job) validated offline against the vendored Volcano CRD
schema and its pod templates against the Kubernetes schemas."""

import kubernetes_validate
import pytest
import torchx.specs as specs
import yaml

from components import launch
from components.stage import stage as stage_component
from peflow import k8s, stages

DISTRIBUTED = [s.name for s in stages.all_stages() if s.distributed]
K8S_VERSION = "1.33"


@pytest.mark.parametrize("name", DISTRIBUTED)
def test_every_distributed_stage_builds_through_the_generic_component(name):
    from components.stage import stage

    app = stage("--preset", "nano", "--data", "D", "--out", "O", name=name, j="2x1")
    assert isinstance(app, specs.AppDef)
    (role,) = app.roles
    assert role.num_replicas == 2
    cmd = " ".join(role.args)
    assert "-m peflow.cli " + name in cmd and "--nproc_per_node 1" in cmd


def test_stage_app_resources_and_env():
    app = stage_component("--preset", "test", name="synth", j="4x8", gpu=8, cpu=64, memMB=400_000)
    (role,) = app.roles
    assert role.resource.gpu == 8 and role.resource.cpu == 64
    assert role.env["NCCL_DEBUG"] == "WARN" and role.env["OMP_NUM_THREADS"] == "8"
    cpu_only = stage_component(name="synth", j="2x1", cpu=2)
    assert "NCCL_DEBUG" not in cpu_only.roles[0].env


def _dryrun_job(**overrides) -> dict:
    """The Volcano Job of `peflow launch pretrain -j 4x8 --scheduler kubernetes --dryrun`."""
    args = dict(scheduler="kubernetes", queue="gpu-queue", namespace="peflow", j="4x8", gpu=8, cpu=64,
                memMB=400_000, image="registry.example/peflow:1")
    text = launch.dryrun(
        "pretrain", ["--preset", "nano", "--data", "s3://bucket/corpus", "--out", "s3://bucket/pe"],
        **{**args, **overrides},
    )
    return yaml.safe_load(text)


def test_kubernetes_dryrun_is_a_valid_volcano_job():
    job = _dryrun_job()
    # the whole Job against the vendored Volcano CRD schema (strict: unknown fields are errors)
    assert k8s.validate_object(job).startswith("CRD jobs.batch.volcano.sh v1alpha1")
    assert job["spec"]["schedulerName"] == "volcano" and job["spec"]["queue"] == "gpu-queue"
    tasks = job["spec"]["tasks"]
    assert len(tasks) == 4
    for t in tasks:
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": t["name"]}, **t["template"]}
        pod["metadata"] = {**t["template"].get("metadata", {}), "name": t["name"]}
        kubernetes_validate.validate(pod, K8S_VERSION, strict=True)  # raises on a schema error
        (c,) = pod["spec"]["containers"]
        assert c["image"] == "registry.example/peflow:1"
        assert c["resources"]["limits"]["nvidia.com/gpu"] == "8"
        assert any(m["mountPath"] == "/dev/shm" for m in c["volumeMounts"])
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert env["NCCL_DEBUG"] == "WARN"
        assert "--nnodes 4 --nproc_per_node 8" in c["command"][-1]


@pytest.mark.parametrize("field,value,error", [
    ("replicas", "four", r"'four' is not of type 'integer' at spec\.tasks\[0\]\.replicas"),
    ("maxRetries", 3, r"'maxRetries' was unexpected\) at spec\.tasks\[0\]"),  # a typo: maxRetry
])
def test_a_broken_volcano_job_fails_the_crd_schema(field, value, error):
    job = _dryrun_job()
    job["spec"]["tasks"][0][field] = value
    with pytest.raises(k8s.ManifestError, match=error):
        k8s.validate_object(job)


def test_schema_validation_can_fail():
    bad = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"},
           "spec": {"containers": [{"name": "c", "image": 3, "bogus": True}]}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


def test_unknown_stage_component_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown stage 'no_such_stage'"):
        launch.build_app("no_such_stage", [])
