"""The interface between the generic trainer and one training stage's objective.

The trainer owns processes, accumulation, autocast, optimizer and schedule steps,
checkpoints, resume, history and progress; the objective owns the model, the data and the
loss. Per optimizer step the trainer calls, in order:

    batch(step)                              this rank's rows (tensors, batch dimension first)
    loss(model, micro, step=, row0=)          per micro-batch, under autocast; backward on column 0
    after_step(model)                         after optimizer.step() (e.g. clamp a temperature)
    data_position(step + 1)                   at a checkpoint, stored under "data_position"
    flops_per_sample(model, step), step_metrics(model, step), progress_text(row)   rank 0, per row

For an exact resume, `batch` and any randomness in `loss` must be functions of
(seed, step, row), never of state carried from step to step.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from peflow.train.trainer import Dist, TrainSettings

#: One rank's rows for a step: tensors sharing the leading (batch) dimension; micro-batches are slices.
Batch = tuple[torch.Tensor, ...]


class Objective(abc.ABC):
    """What one training stage optimises; subclass it and pass an instance to `trainer.fit`."""

    #: the stage's name: the progress bar's label
    name: str = "train"
    #: history columns of the loss terms; the first is the total that is back-propagated
    loss_columns: tuple[str, ...] = ("loss",)

    @abc.abstractmethod
    def build_model(self, dist: Dist) -> torch.nn.Module:
        """The model to train (built, loaded, or the one given to the objective); the trainer has seeded torch
        with the run's seed, moves it to `dist.device`, sets train mode and broadcasts rank 0's weights."""

    def setup(self, model: torch.nn.Module, settings: TrainSettings, dist: Dist) -> None:
        """Build what the steps need (loader, loss modules, compiled functions); called once, before resume."""

    @abc.abstractmethod
    def build_optimizer(self, model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
        """The optimizer at peak learning rate `lr` (the trainer adds warm-up + cosine)."""

    @abc.abstractmethod
    def batch(self, step: int) -> Batch:
        """This rank's `global_batch / world_size` rows of step `step` (the trainer moves them to the device)."""

    @abc.abstractmethod
    def loss(self, model: torch.nn.Module, micro: Batch, *, step: int, row0: int
             ) -> Mapping[str, torch.Tensor | float]:
        """The loss terms of one micro-batch, keyed by `loss_columns` (the first is back-propagated).

        `row0` is the global index of the micro-batch's first row in the step's global batch
        (rank * local batch + offset): seed per-row randomness with (seed, step, row0) to be
        independent of the process count and of resumes.
        """

    def after_step(self, model: torch.nn.Module) -> None:
        """Work after each optimizer step (e.g. clamping the logit scale)."""

    def data_position(self, step: int) -> dict[str, int]:
        """Where the data stands before step `step` (recorded in checkpoints)."""
        return {"step": step}

    def step_metrics(self, model: torch.nn.Module, step: int) -> dict[str, Any]:
        """Extra history columns of `step`, after its optimizer step (rank 0)."""
        return {}

    def flops_per_sample(self, model: torch.nn.Module, step: int) -> float:
        """Training FLOPs per sample at `step` (for model FLOP/s; 0 when unknown)."""
        return 0.0

    def progress_text(self, row: Mapping[str, Any]) -> str:
        """The progress bar's text for a history row."""
        return f"loss {row[self.loss_columns[0]]:.3f} {row['samples_per_s']:.0f} samples/s"
