"""How the trainer spreads a model over its ranks: DDP-style replicas or FSDP2 shards, and activation checkpointing.

`parallelism="ddp"` (the default): every rank holds the whole model and the trainer averages the
gradients with one flat all-reduce per step. `parallelism="fsdp"`: PyTorch FSDP2
(`torch.distributed.fsdp.fully_shard`). Each transformer block is one unit whose parameters,
gradients and optimizer state are sharded over the ranks, all-gathered around its forward and its
backward and reduce-scattered after it; the rest of the model (patch and token embeddings, norms,
attention pool) is the root unit, around the objective's loss (`LossModule`). On CUDA the units
compute in bf16 and reduce gradients in fp32 (`MixedPrecisionPolicy(param_dtype=bfloat16,
reduce_dtype=float32)`); the sharded master weights and optimizer state stay fp32.

Why the root is the loss and not the model: objectives call submodules and parameters directly
(`model.visual.trunk.forward_features`, `model.encode_text`, `model.logit_scale`), never
`model(...)`, so a root around the model would never gather its parameters. Scalar parameters
(the CLIP logit scale) cannot be sharded by FSDP2 ("fully_shard doesn't support scalar
parameters"): they stay whole on every rank and the trainer averages their gradients as DDP does.

Checkpoints hold full (unsharded) state either way: `full_model_state` / `full_optimizer_state`
gather it onto rank 0 (`torch.distributed.checkpoint.state_dict`, `full_state_dict=True,
cpu_offload=True`), and the `load_*` functions shard it back, broadcast from rank 0.

Activation checkpointing (`torch.distributed._composable.checkpoint` on every transformer block)
keeps only each block's input for backward and recomputes the rest: the same gradients for about
one more forward of compute. It leaves module names and state dicts unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from peflow.train.objectives.base import Batch, Objective

PARALLELISMS = ("ddp", "fsdp")


def transformer_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's repeated blocks: every child of a ModuleList/Sequential whose (two or more) children are
    all of one class and hold parameters; the outermost such lists only (a block's insides are not searched).

    For a PE-core CLIP these are the vision trunk's `blocks` and the text tower's `resblocks`.
    """
    found: list[torch.nn.Module] = []

    def visit(module: torch.nn.Module) -> None:
        children = list(module.children())
        repeated = (isinstance(module, (torch.nn.ModuleList, torch.nn.Sequential)) and len(children) >= 2
                    and len({type(c) for c in children}) == 1 and any(True for _ in children[0].parameters()))
        if repeated:
            found.extend(children)
            return
        for child in children:
            visit(child)

    visit(model)
    return found


def apply_activation_checkpointing(model: torch.nn.Module) -> int:
    """Recompute every transformer block's activations in backward, in place; returns the number of blocks."""
    from torch.distributed._composable import checkpoint

    blocks = transformer_blocks(model)
    for block in blocks:
        checkpoint(block)
    return len(blocks)


class LossModule(torch.nn.Module):
    """The objective's loss as a module over the model: under FSDP, the root unit, whose forward gathers the
    parameters outside the blocks and whose backward reduces their gradients."""

    def __init__(self, objective: Objective, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.objective = objective  # not a module: not part of the state

    def forward(self, micro: Batch, *, step: int, row0: int) -> Mapping[str, torch.Tensor | float]:
        return self.objective.loss(self.model, micro, step=step, row0=row0)


def shard(objective: Objective, model: torch.nn.Module, device: torch.device) -> LossModule:
    """FSDP2 over the ranks of the default process group: one unit per transformer block, the rest in the root
    (the returned `LossModule`); scalar parameters left whole. bf16 compute on CUDA, fp32 on CPU."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
          if device.type == "cuda" else MixedPrecisionPolicy())
    blocks = transformer_blocks(model)
    if not blocks:
        raise ValueError(f"parallelism 'fsdp': {type(model).__name__} has no repeated transformer blocks to shard")
    for block in blocks:
        fully_shard(block, mp_policy=mp)
    scalars = {p for p in model.parameters() if p.ndim == 0}
    root = LossModule(objective, model)
    fully_shard(root, mp_policy=mp, ignored_params=scalars or None)
    return root


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether any parameter of `model` is an FSDP shard (a DTensor)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def replicated(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The trainable parameters every rank holds whole (all of them under DDP; the scalars under FSDP)."""
    from torch.distributed.tensor import DTensor

    return [p for p in model.parameters() if p.requires_grad and not isinstance(p, DTensor)]


def use_foreach(optimizer: torch.optim.Optimizer) -> None:
    """Switch an optimizer that has a `foreach` option (and is not fused) to its multi-tensor path, in place.

    Under FSDP this is required: timm's per-tensor LAMB loop fails on a mix of sharded (DTensor) and whole
    parameters, its multi-tensor path does not. On CUDA it is also the fast one (one launch per tensor list).
    """
    for group in optimizer.param_groups:
        if "foreach" in group and not group.get("fused"):
            group["foreach"] = True


def _options() -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The sharded model's full state dict on rank 0, on CPU ({} on the other ranks); every rank calls it."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_options())


def full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's full state keyed by parameter name, on rank 0 ({} elsewhere); every rank calls it."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=_options())


def load_full_model_state(model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Shard a full model state dict (given on rank 0, {} elsewhere) into the sharded model; every rank calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, dict(state), options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


def load_full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                              state: Mapping[str, Any]) -> None:
    """Shard a full optimizer state (`full_optimizer_state`'s, on rank 0; {} elsewhere) into `optimizer`."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, dict(state),
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
