"""Video finetuning's objective (paper section 2.2, Tab. 19): a clip is N uniformly sampled
frames, each encoded by the image tower (attention pool and projection), averaged into one
embedding; the CLIP contrastive loss pairs it with the clip's caption.

The clips are decoded once (uint8 frames in memory: the frame sampling is fixed), batches
follow `EpochOrder`, and the one augmentation is a crop shared by all frames of a clip
(seeded by seed, step and row), so a resume continues exactly and motion stays intact.

Shape legend: B clips, F frames, S side, E embedding dim, T context length.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from peflow.train.data import EpochOrder
from peflow.train.losses import clamp_logit_scale, contrastive_loss
from peflow.train.objectives.base import Batch, Objective
from peflow.train.optim import build_optimizer

if TYPE_CHECKING:
    from peflow.train.recipe import Recipe
    from peflow.train.trainer import Dist, TrainSettings


def video_clip_loss(model: torch.nn.Module, frames_BFCSS: torch.Tensor, tokens_BT: torch.Tensor,
                    loss_fn: torch.nn.Module) -> torch.Tensor:
    """CLIP loss between frame-averaged clip embeddings and caption embeddings."""
    B, Fr = frames_BFCSS.shape[:2]
    frame_emb = model.encode_image(frames_BFCSS.flatten(0, 1), normalize=True).reshape(B, Fr, -1)
    clip_BE = F.normalize(frame_emb.mean(1), dim=-1)
    text_BE = model.encode_text(tokens_BT, normalize=True)
    return loss_fn(clip_BE, text_BE, model.logit_scale.exp())


class VideoClipObjective(Objective):
    """Frame-averaged CLIP finetuning of a PE-core model (`peflow finetune-video`)."""

    loss_columns = ("loss",)

    def __init__(self, *, init_from: str, frames: np.ndarray, captions: list[str], recipe: Recipe,
                 crop_scale: tuple[float, float] = (0.8, 1.0), name: str = "finetune-video") -> None:
        """`frames`: uint8 [V, F, H, W, 3]; `captions`: one per clip."""
        if len(frames) != len(captions):
            raise ValueError(f"{len(frames)} clips but {len(captions)} captions")
        self.init_from, self.frames, self.captions, self.recipe = init_from, frames, captions, recipe
        self.crop_scale, self.name = crop_scale, name

    def build_model(self, dist: Dist) -> torch.nn.Module:
        from peflow.models.pe import load_model

        return load_model(self.init_from)

    def setup(self, model: torch.nn.Module, settings: TrainSettings, dist: Dist) -> None:
        from peflow.models.pe import get_tokenizer

        self.order = EpochOrder(len(self.frames), global_batch=settings.global_batch, rank=dist.rank,
                                world_size=dist.world_size, seed=settings.seed)
        self.seed, self.size = settings.seed, int(model.visual.image_size[0])
        self.tokens = get_tokenizer(model.peflow_preset)(self.captions)
        self.loss_fn = contrastive_loss(dist.rank, dist.world_size)

    def build_optimizer(self, model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
        return build_optimizer(model, self.recipe, lr)

    def _crop(self, clip_FHW3: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
        """One random crop (area fraction in `crop_scale`, square) for every frame, resized back."""
        from peflow.models.vlm import frames_tensor

        h, w = clip_FHW3.shape[1:3]
        side = int(round(np.sqrt(rng.uniform(*self.crop_scale)) * min(h, w)))
        y0, x0 = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        return frames_tensor(clip_FHW3[:, y0:y0 + side, x0:x0 + side], self.size)

    def batch(self, step: int) -> Batch:
        """(frames [B, F, 3, S, S], tokens [B, T]) of this rank's rows."""
        rows = self.order.rows(step)
        clips = [self._crop(self.frames[i], np.random.default_rng([self.seed, step, row, 13])) for i, row in rows]
        return torch.stack(clips), self.tokens[[i for i, _ in rows]]

    def loss(self, model: torch.nn.Module, micro: Batch, *, step: int, row0: int
             ) -> Mapping[str, torch.Tensor | float]:
        frames, tokens = micro
        return {"loss": video_clip_loss(model, frames, tokens, self.loss_fn)}

    def after_step(self, model: torch.nn.Module) -> None:
        clamp_logit_scale(model, self.recipe.max_logit_scale)

    def data_position(self, step: int) -> dict[str, int]:
        return self.order.position(step)

    def step_metrics(self, model: torch.nn.Module, step: int) -> dict[str, Any]:
        return {"logit_scale": float(model.logit_scale.detach().exp())}

    def progress_text(self, row: Mapping[str, Any]) -> str:
        return f"loss {row['loss']:.3f} {row['samples_per_s']:.1f} clips/s"
