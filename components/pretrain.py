"""TorchX component for PE-core robust image pretraining (paper section 2.1)."""

from __future__ import annotations

from typing import Dict, Optional

import torchx.specs as specs

from components.stage import IMAGE, stage_app


def pretrain(
    *stage_args: str,
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
    """PE-core pretraining under torchrun: `peflow pretrain <stage_args>`.

    Args:
        stage_args: options of `peflow pretrain` (e.g. --preset nano --data D --out O)
        image: container image holding peflow (ignored by local_cwd)
        j: {nnodes}x{nproc_per_node}; on GPU hosts nproc_per_node <= GPUs per node
        cpu: CPUs per node
        gpu: GPUs per node (0: CPU with gloo)
        memMB: memory per node in MB
        h: a registered named resource (overrides cpu, gpu, memMB)
        rdzv_port: c10d rendezvous port on the rank-0 node
        max_retries: scheduler-level retries (training resumes from its last checkpoint)
        env: extra environment variables
    """
    return stage_app(
        "pretrain", list(stage_args), image=image, j=j, cpu=cpu, gpu=gpu, memMB=memMB, h=h,
        rdzv_port=rdzv_port, max_retries=max_retries, env=env,
    )
