"""TorchX named resources of common 8-GPU nodes, for the distributed stages on Kubernetes.

Registered the TorchX way, as `torchx.named_resources` entry points (pyproject.toml): TorchX
resolves them lazily by name (`torchx.specs.named_resources[NAME]`, `-h NAME` of its builtin
components). `components/stage.py` also looks them up here, so they work without the entry
points installed (a checkout run from its root).

Sizing: a training pod gets the whole node less what the system needs: all 8 GPUs, the node's
vCPUs less `SYSTEM_CPUS` and `MEMORY_SHARE` of its memory, so that kubelet's reservations, the
eviction threshold and the node daemons (NVIDIA and EFA device plugins, CNI, log and metrics
agents) still fit beside it. TorchX's kubernetes scheduler sets these numbers as the limits and
requests 100 millicores and 1 GiB less.

- Generic nodes (`peflow_8x...`) carry no node selector: a pod lands on any node with 8 free
  GPUs (TorchX 0.7 selects nodes only by `node.kubernetes.io/instance-type`; pick the GPU type
  with the Volcano queue or the cluster). They are sized to fit the smallest common shape of
  their kind: 96 vCPUs with 1,152 GiB (8x A100 80GB, AWS p4de) or 1.7 TiB (8x H100/H200, e.g.
  Azure ND H100 v5 1,900 GiB, GCP a3-highgpu-8g 1,872 GB).
- AWS nodes (`peflow_aws_...`) are TorchX's own `aws_p4de.24xlarge` (8x A100 80GB) and
  `aws_p5.48xlarge` (8x H100 80GB) with the system's share left free (TorchX's request the whole
  machine, which no node can schedule): their instance-type selector and EFA devices
  (`vpc.amazonaws.com/efa`) as TorchX models them. TorchX has no H200 instance (p5en).

/dev/shm: TorchX 0.7's kubernetes scheduler mounts a memory-backed emptyDir at /dev/shm in every
pod, without a size limit (it has no option to set one): DataLoader workers may fill it up to the
pod's memory limit, and what they put there counts against that limit.
"""

from __future__ import annotations

import dataclasses

import torchx.specs as specs
from torchx.specs import named_resources_aws as aws

GiB = 1024  # TorchX's memMB unit is MiB
SYSTEM_CPUS = 8  #: vCPUs of a node left to the system
MEMORY_SHARE = 0.9  #: share of a node's memory a pod may use
EFA_DEVICE = aws.EFA_DEVICE


def node(*, gpus: int, vcpus: int, memory_gib: int) -> specs.Resource:
    """A pod's share of a node with `gpus` GPUs, `vcpus` vCPUs and `memory_gib` GiB."""
    return specs.Resource(cpu=vcpus - SYSTEM_CPUS, gpu=gpus, memMB=int(MEMORY_SHARE * memory_gib * GiB))


def gpu8_a100_80gb() -> specs.Resource:
    """8x A100 80GB on a node of at least 96 vCPUs and 1,152 GiB."""
    return node(gpus=8, vcpus=96, memory_gib=1152)


def gpu8_h100_80gb() -> specs.Resource:
    """8x H100 80GB on a node of at least 96 vCPUs and 1.7 TiB."""
    return node(gpus=8, vcpus=96, memory_gib=1740)


def gpu8_h200() -> specs.Resource:
    """8x H200 141GB on a node of at least 96 vCPUs and 1.7 TiB (H200 nodes are H100 nodes' hosts)."""
    return node(gpus=8, vcpus=96, memory_gib=1740)


def _aws(torchx_resource: specs.Resource, *, vcpus: int, memory_gib: int) -> specs.Resource:
    """TorchX's AWS resource (instance type, EFA devices) with the system's share left free."""
    share = node(gpus=torchx_resource.gpu, vcpus=vcpus, memory_gib=memory_gib)
    return dataclasses.replace(torchx_resource, cpu=share.cpu, memMB=share.memMB,
                               devices=dict(torchx_resource.devices),
                               capabilities=dict(torchx_resource.capabilities))


def aws_p4de_24xlarge() -> specs.Resource:
    """AWS p4de.24xlarge: 8x A100 80GB, 96 vCPUs, 1,152 GiB, 4 EFA devices."""
    return _aws(aws.aws_p4de_24xlarge(), vcpus=96, memory_gib=1152)


def aws_p5_48xlarge() -> specs.Resource:
    """AWS p5.48xlarge: 8x H100 80GB, 192 vCPUs, 2,048 GiB, 32 EFA devices."""
    return _aws(aws.aws_p5_48xlarge(), vcpus=192, memory_gib=2048)


#: name -> resource, as registered in pyproject.toml's `torchx.named_resources` entry points
NAMED_RESOURCES = {
    "peflow_8xa100_80gb": gpu8_a100_80gb,
    "peflow_8xh100_80gb": gpu8_h100_80gb,
    "peflow_8xh200": gpu8_h200,
    "peflow_aws_p4de.24xlarge": aws_p4de_24xlarge,
    "peflow_aws_p5.48xlarge": aws_p5_48xlarge,
}


def get(name: str) -> specs.Resource:
    """The named resource `name`: one of peflow's, else any TorchX knows (its own and other entry points)."""
    if name in NAMED_RESOURCES:
        return NAMED_RESOURCES[name]()
    try:
        return specs.named_resources[name]
    except KeyError:
        raise ValueError(f"unknown named resource {name!r}; peflow's: {sorted(NAMED_RESOURCES)} "
                         f"(or any TorchX named resource, e.g. aws_p5.48xlarge)") from None
