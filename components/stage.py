"""The TorchX component of every stage: `torchrun -m peflow.cli <stage> ...`.

`torchx run components/stage.py:stage --name pretrain -j 2x1 -- --preset nano
--data D --out O` or, the same thing, `peflow launch pretrain -j 2x1 -- ...`.

Resources per node, first match: the named resource `h` (components/resources.py, or any
TorchX named resource); the explicit `cpu`/`gpu`/`memMB` (the rest from the stage's registry
entry, peflow.stages); the named resource of the pipeline preset the stage options name
(`--preset b16`: peflow.presets, e.g. 8 GPUs, 88 CPUs, 1.5 TiB); the stage's registry entry
(the CPU presets: 2 CPUs, 8 GB).
"""

# No `from __future__ import annotations`: `torchx run components/stage.py:stage` decodes the
# component's arguments from their annotations, which must be types, not strings.
import os
import sys
from collections.abc import Sequence
from typing import Dict, List, Optional

import torchx.specs as specs
from torchx.components import dist

from peflow import presets, stages
from peflow.cli import DEFAULT_PRESET

try:
    from components import resources
except ModuleNotFoundError:  # `torchx run components/stage.py:stage` execs this file: from the checkout root
    sys.path.insert(0, os.getcwd())
    from components import resources

# The image a cluster pulls (built from k8s/Dockerfile); local_cwd ignores it.
IMAGE = "peflow:latest"

# Collective settings for GPU nodes: fail fast on a hung collective, quiet logs.
NCCL_ENV = {
    "NCCL_DEBUG": "WARN",
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
    "TORCH_NCCL_BLOCKING_WAIT": "0",
}
# Nodes with EFA devices: NCCL over libfabric's EFA provider with GPUDirect RDMA (needs the
# aws-ofi-nccl plugin in the image; without it NCCL falls back to TCP sockets).
EFA_ENV = {"FI_PROVIDER": "efa", "FI_EFA_USE_DEVICE_RDMA": "1"}


def stage(
    *stage_args: str,
    name: str,
    image: str = IMAGE,
    j: str = "2x1",
    cpu: Optional[int] = None,
    gpu: Optional[int] = None,
    memMB: Optional[int] = None,
    h: Optional[str] = None,
    rdzv_port: int = 29500,
    max_retries: int = 0,
    env: Optional[Dict[str, str]] = None,
    mounts: Optional[List[str]] = None,
) -> specs.AppDef:
    """A peflow stage under torchrun: `peflow <name> <stage_args>` on every process.

    Args:
        stage_args: options of `peflow <name>` (e.g. --preset nano --data D --out O)
        name: a registered stage (`peflow --help` lists them)
        image: container image holding peflow (ignored by local_cwd)
        j: {nnodes}x{nproc_per_node}; on GPU hosts nproc_per_node <= GPUs per node
        cpu: CPUs per node (default: the preset's named resource, else the stage's registry resources)
        gpu: GPUs per node (0: CPU with gloo; default: the preset's, else the stage's)
        memMB: memory per node in MB (default: the preset's, else the stage's)
        h: a named resource (components/resources.py or TorchX's; overrides cpu, gpu, memMB)
        rdzv_port: c10d rendezvous port on the rank-0 node
        max_retries: scheduler-level retries (training resumes from its last checkpoint)
        env: extra environment variables
        mounts: volumes in TorchX's syntax, e.g. type=volume,src=peflow-checkpoints,dst=/mnt/peflow (a PVC)
    """
    resource = node_resource(name, stage_args, cpu=cpu, gpu=gpu, memMB=memMB, h=h)
    _, _, nproc, _ = dist.parse_nnodes(j)
    if resource.gpu > 0 and nproc > resource.gpu:
        raise ValueError(f"-j {j}: {nproc} processes per node but {resource.gpu} GPUs per node")
    run_env = {"PEFLOW_LAUNCHER": "torchx", "OMP_NUM_THREADS": str(max(1, resource.cpu // nproc))}
    if resource.gpu > 0:
        run_env.update(NCCL_ENV)
    if resources.EFA_DEVICE in resource.devices:
        run_env.update(EFA_ENV)
    run_env.update(env or {})
    app = dist.ddp(
        name,
        *stage_args,
        m="peflow.cli",
        image=image,
        name=f"peflow/{name}",
        cpu=resource.cpu,
        gpu=resource.gpu,
        memMB=resource.memMB,
        j=j,
        env=run_env,
        max_retries=max_retries,
        rdzv_port=rdzv_port,
        mounts=mounts,
    )
    role = app.roles[0]
    role.name = name
    role.resource = resource  # with its devices and node selector, which dist.ddp's cpu/gpu/memMB lack
    role.args = [_rank0_host(name, a) for a in role.args]
    return app


def node_resource(name: str, stage_args: Sequence[str], *, cpu: Optional[int] = None, gpu: Optional[int] = None,
                  memMB: Optional[int] = None, h: Optional[str] = None) -> specs.Resource:
    """The resources of one node of stage `name` (the order is the module docstring's)."""
    if h:
        return resources.get(h)
    if cpu is None and gpu is None and memMB is None:
        preset = presets.get(_preset(stage_args))
        if preset.resource:
            return resources.get(preset.resource)
    res = stages.get(name).resources
    return specs.Resource(cpu=res.get("cpu", 2) if cpu is None else cpu, gpu=res.get("gpu", 0) if gpu is None else gpu,
                          memMB=res.get("memMB", 8192) if memMB is None else memMB)


def _preset(stage_args: Sequence[str]) -> str:
    """The pipeline preset the stage options name (`--preset P` or `--preset=P`; the CLI's default otherwise)."""
    for i, a in enumerate(stage_args):
        if a == "--preset" and i + 1 < len(stage_args):
            return stage_args[i + 1]
        if a.startswith("--preset="):
            return a.split("=", 1)[1]
    return DEFAULT_PRESET


def _rank0_host(name: str, arg: str) -> str:
    """`arg` with a rendezvous host that also resolves for hyphenated stage names on Kubernetes.

    TorchX 0.7 names the rank-0 host variable of a non-zero Volcano replica `VC_<ROLE>_0_HOSTS`
    keeping the role's hyphens (`VC_TRAIN-CAPTIONER_0_HOSTS`, which bash reads as `${VC_TRAIN-...}`,
    a default value), while Volcano's svc plugin exports it with underscores
    (`VC_TRAIN_CAPTIONER_0_HOSTS`). For such names the endpoint reads TORCHX_RANK0_HOST where the
    scheduler sets it (local_cwd: every replica; kubernetes: replica 0), else Volcano's variable.
    """
    if "-" not in name:
        return arg
    volcano = "VC_" + name.upper().replace("-", "_") + "_0_HOSTS"
    return arg.replace(f"$${{{specs.macros.rank0_env}:=localhost}}",
                       f"$${{TORCHX_RANK0_HOST:-$${{{volcano}:-localhost}}}}")
