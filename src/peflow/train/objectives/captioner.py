"""Next-token objectives on the vision-language model (`peflow.models.vlm`): the captioner
(train-captioner) and, with an unfrozen tower, PE lang.

The examples are (frames, prompt, target text). Frames live once in a bank (pixels, or,
when the tower is frozen, their precomputed `vision_tokens`: the frozen tower gives the
same tokens every epoch) and each example lists its frames' rows in order; an example of
fewer frames than the widest (an image is one frame) is padded with -1, and its padded
frames are masked out of attention. The loss is the LM's cross-entropy on the
target tokens and the closing EOS; the BOS, the prompt and the visual tokens carry none.
Batches follow `EpochOrder` (a function of seed and step), so a resume continues exactly.

Shape legend: M bank frames, N examples, F frames, P patch tokens, D tower width, L text tokens.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from peflow.models.vlm import IGNORE
from peflow.train.data import EpochOrder
from peflow.train.objectives.base import Batch, Objective

if TYPE_CHECKING:
    from peflow.models.vlm import VisionLanguageModel
    from peflow.train.trainer import Dist, TrainSettings


def encode_text_targets(tokenizer: Any, targets: Sequence[str], prompts: Sequence[str] | None = None, *,
                        max_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """([BOS] prompt target [EOS], right-padded to `max_len`): input ids, attention mask and labels
    [N, max_len] (labels IGNORE on BOS, prompt and padding). Over-long targets are cut (EOS kept)."""
    pad, bos, eos = tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id
    ids = torch.full((len(targets), max_len), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, IGNORE)
    for i, target in enumerate(targets):
        head = [bos] + (tokenizer.encode(prompts[i], add_special_tokens=False) if prompts else [])
        body = tokenizer.encode(target, add_special_tokens=False)[: max(0, max_len - len(head) - 1)] + [eos]
        row = (head + body)[:max_len]
        ids[i, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = 1
        labels[i, len(head):len(row)] = torch.tensor(row[len(head):])
    return ids, mask, labels


class CaptionObjective(Objective):
    """Next-token training of a `VisionLanguageModel` on (visual, prompt, target) examples."""

    loss_columns = ("loss",)

    def __init__(self, model: VisionLanguageModel, bank: torch.Tensor, frame_ids: torch.Tensor,
                 targets: Sequence[str], *, prompts: Sequence[str] | None = None, frozen_tower: bool = True,
                 train_parts: str = "projector,lm", max_len: int = 96, weight_decay: float = 0.01,
                 tower_lr_scale: float = 1.0, name: str = "captioner") -> None:
        """`bank`: vision tokens [M, P, D] (frozen tower) or frames [M, 3, S, S]; `frame_ids` [N, F]:
        each example's bank rows in order, -1 = padding; `train_parts`: comma-separated parts that
        learn (tower, projector, lm); `tower_lr_scale`: the tower's learning rate as a fraction of the rest's."""
        if len(frame_ids) != len(targets):
            raise ValueError(f"{len(frame_ids)} examples' frames but {len(targets)} targets")
        self.model, self.bank, self.frame_ids = model, bank, frame_ids
        self.frozen_tower, self.weight_decay, self.name = frozen_tower, weight_decay, name
        self.tower_lr_scale = tower_lr_scale
        self.parts = {p.strip() for p in train_parts.split(",") if p.strip()}
        bad = self.parts - {"tower", "projector", "lm"}
        if bad or not self.parts:
            raise ValueError(f"train_parts: unknown part(s) {sorted(bad) or train_parts!r}; known: tower, projector, lm")
        self.ids, self.mask, self.labels = encode_text_targets(model.tokenizer, targets, prompts, max_len=max_len)

    def build_model(self, dist: Dist) -> torch.nn.Module:
        m = self.model
        m.tower.requires_grad_("tower" in self.parts and not self.frozen_tower)
        m.projector.requires_grad_("projector" in self.parts)
        m.frame_embed.requires_grad_("projector" in self.parts)
        m.lm.requires_grad_("lm" in self.parts)
        return m

    def setup(self, model: torch.nn.Module, settings: TrainSettings, dist: Dist) -> None:
        self.order = EpochOrder(len(self.ids), global_batch=settings.global_batch, rank=dist.rank,
                                world_size=dist.world_size, seed=settings.seed)

    def build_optimizer(self, model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
        """AdamW over the parts that learn (no decay on norms, biases and embeddings of one dimension;
        the tower at `tower_lr_scale` of `lr`)."""
        tower = {id(p) for p in model.tower.parameters()}
        groups = []
        for in_tower, scale in ((False, 1.0), (True, self.tower_lr_scale)):
            params = [p for p in model.parameters() if p.requires_grad and (id(p) in tower) == in_tower]
            for decay in (True, False):
                chosen = [p for p in params if (p.ndim >= 2) == decay]
                if chosen:
                    groups.append({"params": chosen, "weight_decay": self.weight_decay if decay else 0.0,
                                   "lr": lr * scale})
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))

    def batch(self, step: int) -> Batch:
        """(visual, frame mask, input ids, attention mask, labels) of this rank's rows."""
        idx = torch.tensor([i for i, _ in self.order.rows(step)])
        ids = self.frame_ids[idx]
        return (self.bank[ids.clamp(min=0)].float(), (ids >= 0).long(), self.ids[idx], self.mask[idx],
                self.labels[idx])

    def loss(self, model: torch.nn.Module, micro: Batch, *, step: int, row0: int
             ) -> Mapping[str, torch.Tensor | float]:
        visual, frame_mask, ids, mask, labels = micro
        width = int(mask.sum(1).max())  # drop the padding columns every row shares
        kw = {"tokens": visual} if self.frozen_tower else {"frames": visual}
        out = model(ids[:, :width], mask[:, :width], labels[:, :width], frame_mask=frame_mask, **kw)
        return {"loss": out.loss}

    def data_position(self, step: int) -> dict[str, int]:
        return self.order.position(step)

    def progress_text(self, row: Mapping[str, Any]) -> str:
        return f"loss {row['loss']:.3f} {row['samples_per_s']:.0f} clips/s"
