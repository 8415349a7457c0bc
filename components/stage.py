"""The TorchX component of every stage: `torchrun -m peflow.cli <stage> ...`.

`torchx run components/stage.py:stage --name pretrain -j 2x1 -- --preset nano
--data D --out O` or, the same thing, `peflow launch pretrain -j 2x1 -- ...`.
Resources default to the stage's registry entry (peflow.stages).
"""

from __future__ import annotations

from typing import Dict, Optional

import torchx.specs as specs
from torchx.components import dist

from peflow import stages

# The image a cluster pulls (built from k8s/Dockerfile); local_cwd ignores it.
IMAGE = "peflow:latest"

# Collective settings for GPU nodes: fail fast on a hung collective, quiet logs.
NCCL_ENV = {
    "NCCL_DEBUG": "WARN",
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
    "TORCH_NCCL_BLOCKING_WAIT": "0",
}


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
) -> specs.AppDef:
    """A peflow stage under torchrun: `peflow <name> <stage_args>` on every process.

    Args:
        stage_args: options of `peflow <name>` (e.g. --preset nano --data D --out O)
        name: a registered stage (`peflow --help` lists them)
        image: container image holding peflow (ignored by local_cwd)
        j: {nnodes}x{nproc_per_node}; on GPU hosts nproc_per_node <= GPUs per node
        cpu: CPUs per node (default: the stage's registry resources)
        gpu: GPUs per node (0: CPU with gloo; default: the stage's)
        memMB: memory per node in MB (default: the stage's)
        h: a registered named resource (overrides cpu, gpu, memMB)
        rdzv_port: c10d rendezvous port on the rank-0 node
        max_retries: scheduler-level retries (training resumes from its last checkpoint)
        env: extra environment variables
    """
    res = stages.get(name).resources
    cpu = res.get("cpu", 2) if cpu is None else cpu
    gpu = res.get("gpu", 0) if gpu is None else gpu
    memMB = res.get("memMB", 8192) if memMB is None else memMB
    _, _, nproc, _ = dist.parse_nnodes(j)
    run_env = {"PEFLOW_LAUNCHER": "torchx", "OMP_NUM_THREADS": str(max(1, cpu // nproc))}
    if gpu > 0:
        run_env.update(NCCL_ENV)
    run_env.update(env or {})
    app = dist.ddp(
        name,
        *stage_args,
        m="peflow.cli",
        image=image,
        name=f"peflow/{name}",
        h=h,
        cpu=cpu,
        gpu=gpu,
        memMB=memMB,
        j=j,
        env=run_env,
        max_retries=max_retries,
        rdzv_port=rdzv_port,
    )
    app.roles[0].name = name
    return app
