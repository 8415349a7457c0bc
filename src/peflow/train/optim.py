"""Optimizer and learning-rate schedule of PE-core pretraining.

LAMB (timm) with betas (0.9, 0.95) and weight decay 0.05 on weight matrices
only: biases, norms, embeddings (token, position, class, attention-pool
probe) and the logit scale are not decayed. Linear warm-up, then cosine
annealing to zero.

`FusedLamb` is timm's `Lamb` whose step runs on PyTorch's fused AdamW kernel
(one pass over parameters, gradients and moments) plus three multi-tensor
passes for the trust ratios: the same update as timm's (to 1e-7 after 5
steps, tests/unit/test_train_recipe.py) at a third of the time on 2 CPU cores
(bench/README.md), with timm's state dict, so checkpoints load either way.
"""

from __future__ import annotations

import math

import torch
from timm.optim import Lamb

from peflow.train.recipe import Recipe

# Embeddings are lookup tables and positions, not the patch projection (a weight matrix, decayed).
_NO_DECAY_WORDS = ("bias", "norm", "ln_", "pos_embed", "positional_embedding", "token_embedding", "cls_token",
                   "reg_token", "latent", "logit_scale")


def no_weight_decay(name: str, param: torch.Tensor) -> bool:
    """True for parameters excluded from weight decay (vectors, scalars and embeddings)."""
    leaf = name.lower()
    return param.ndim < 2 or any(w in leaf for w in _NO_DECAY_WORDS)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two optimizer groups of the trainable parameters: decayed at `weight_decay`, and not decayed."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if no_weight_decay(name, p) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class FusedLamb(Lamb):
    """timm's LAMB, stepped by `torch._fused_adamw_` where it can be.

    LAMB's update of a tensor is `u + wd * p` (u = Adam's bias-corrected m / (sqrt(v) + eps), after the
    gradients are divided by the global-norm clip factor), scaled by the trust ratio ||p|| / ||u + wd p||
    for decayed tensors. The fused AdamW kernel at lr 1 and no weight decay, run on a zeroed buffer,
    leaves -u in the buffer and updates the moments in place; its `grad_scale` divides the gradients
    by the clip factor inside the same pass. Falls back to timm's step for what the kernel does not
    cover (sharded DTensor parameters, caution, decoupled decay, non-float32 tensors).
    """

    def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003  (timm's Lamb's arguments)
        super().__init__(*args, **kwargs)
        self._scratch: dict[int, list[torch.Tensor]] = {}  # per group: the update buffers (not state: not saved)

    def _fusable(self) -> bool:
        if not hasattr(torch, "_fused_adamw_"):
            return False
        for g in self.param_groups:
            if g.get("caution") or g.get("decoupled_decay") or not g.get("bias_correction", True) \
                    or not g.get("grad_averaging", True):
                return False
            for p in g["params"]:
                if p.grad is not None and (type(p.data) is not torch.Tensor or p.dtype != torch.float32
                                           or p.grad.is_sparse):
                    return False
        return True

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001, ANN202  (torch.optim's signature)
        if not self._fusable():
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        clip = self._get_clip_grad_norm()  # global-norm clip factor >= 1, or None
        buffers = self.__dict__.setdefault("_buffers", {})
        for i, g in enumerate(self.param_groups):
            if "step" not in g:
                g["step"] = torch.zeros((), dtype=torch.float32)
            g["step"].add_(1)
            ps = [p for p in g["params"] if p.grad is not None]
            if not ps:
                continue
            for p in ps:
                if not self.state[p]:
                    self.state[p].update(exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
            states = [self.state[p] for p in ps]
            wd, adapt = g["weight_decay"], g["weight_decay"] != 0 or g.get("always_adapt", False)
            beta1, beta2 = g["betas"]
            scale = None if clip is None else clip.to(device=ps[0].device, dtype=torch.float32)
            buf = self._scratch.get(i)
            if adapt and (buf is None or [b.shape for b in buf] != [p.shape for p in ps]):
                buf = self._scratch[i] = [torch.zeros_like(p) for p in ps]
            elif adapt:
                torch._foreach_zero_(buf)
            torch._fused_adamw_(
                buf if adapt else ps, [p.grad for p in ps], [s["exp_avg"] for s in states],
                [s["exp_avg_sq"] for s in states], [], [g["step"].to(ps[0].device)] * len(ps),
                lr=1.0 if adapt else g["lr"], beta1=beta1, beta2=beta2, weight_decay=0.0, eps=g["eps"],
                amsgrad=False, maximize=False, grad_scale=scale, found_inf=None)
            if not adapt:  # the kernel stepped the parameters themselves: Adam's update at lr
                continue
            if wd:
                torch._foreach_add_(buf, ps, alpha=-wd)  # buf = -(u + wd p)
            ratios = [torch.where(w > 0, torch.where(n > 0, w / n, 1.0), 1.0)
                      for w, n in zip(torch._foreach_norm(ps), torch._foreach_norm(buf))]
            if g.get("trust_clip"):
                ratios = [r.clamp(max=1.0) for r in ratios]
            torch._foreach_mul_(ratios, g["lr"])
            torch._foreach_mul_(buf, ratios)
            torch._foreach_add_(ps, buf)
        return loss


def lamb(groups: list[dict], *, lr: float, betas: tuple[float, float], weight_decay: float) -> torch.optim.Optimizer:
    """LAMB (`FusedLamb`: timm's, on the fused AdamW kernel); max_grad_norm clips the global gradient norm at 1.0
    (timm's default)."""
    return FusedLamb(groups, lr=lr, betas=betas, weight_decay=weight_decay, foreach=True)


def build_optimizer(model: torch.nn.Module, recipe: Recipe, lr: float) -> torch.optim.Optimizer:
    """LAMB (PE) or AdamW (vanilla) over decayed and non-decayed parameter groups."""
    groups = param_groups(model, recipe.weight_decay)
    if recipe.optimizer == "lamb":
        if recipe.plain_lr is not None:  # the non-decayed group: no trust ratio, Adam's step at its own lr
            groups[1]["lr"] = recipe.plain_lr * lr / recipe.lr
        return lamb(groups, lr=lr, betas=recipe.betas, weight_decay=recipe.weight_decay)
    # fused: one kernel over all parameters (CPU and CUDA); on CPU it is ~9x faster than the default
    # per-tensor loop for the dense 49408-row token-embedding update (bench/README.md).
    return torch.optim.AdamW(groups, lr=lr, betas=recipe.betas, weight_decay=recipe.weight_decay, eps=1e-6,
                             fused=True)


def warmup_cosine(step: int, *, warmup_steps: int, total_steps: int) -> float:
    """LR multiplier: linear from 1/(warmup+1) to 1 over `warmup_steps`, then cosine to 0 at `total_steps`."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(opt: torch.optim.Optimizer, *, warmup_steps: int, total_steps: int
                    ) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR stepping once per optimizer step; its state_dict resumes the schedule."""
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: warmup_cosine(s, warmup_steps=warmup_steps, total_steps=total_steps)
    )
