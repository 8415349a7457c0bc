"""The one AppDef factory every stage component builds on."""

from __future__ import annotations

from typing import Dict, List, Optional

import torchx.specs as specs
from torchx.components import dist

# The image a cluster pulls (built from k8s/Dockerfile); local_cwd ignores it.
IMAGE = "peflow:latest"

# Collective settings for GPU nodes: fail fast on a hung collective, quiet logs.
NCCL_ENV = {
    "NCCL_DEBUG": "WARN",
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
    "TORCH_NCCL_BLOCKING_WAIT": "0",
}


def stage_app(
    stage: str,
    stage_args: List[str],
    *,
    image: str = IMAGE,
    j: str = "2x1",
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 8192,
    h: Optional[str] = None,
    rdzv_port: int = 29500,
    max_retries: int = 0,
    env: Optional[Dict[str, str]] = None,
) -> specs.AppDef:
    """`torchrun -m peflow.cli <stage> <stage_args>` on `j` = NODESxPROCS."""
    _, _, nproc, _ = dist.parse_nnodes(j)
    run_env = {"PEFLOW_LAUNCHER": "torchx", "OMP_NUM_THREADS": str(max(1, cpu // nproc))}
    if gpu > 0:
        run_env.update(NCCL_ENV)
    run_env.update(env or {})
    app = dist.ddp(
        stage,
        *stage_args,
        m="peflow.cli",
        image=image,
        name=f"peflow/{stage}",
        h=h,
        cpu=cpu,
        gpu=gpu,
        memMB=memMB,
        j=j,
        env=run_env,
        max_retries=max_retries,
        rdzv_port=rdzv_port,
    )
    app.roles[0].name = stage
    return app
