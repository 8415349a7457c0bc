"""Training objectives: what a training stage optimises, run by `peflow.train.trainer`.

- `Objective` (base): the interface every stage's objective implements;
- `ClipObjective` (clip): PE-core pretraining, the CLIP loss plus mask regularization.
"""

from peflow.train.objectives.base import Batch, Objective
from peflow.train.objectives.clip import ClipObjective

__all__ = ["Batch", "ClipObjective", "Objective"]
