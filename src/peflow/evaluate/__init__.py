"""Evaluation of PE-core CLIP models (paper App. B.1.2 protocols, on the
built-in corpus or any image-text shards with labels):

- `zeroshot`: prompt-ensembled zero-shot classification, top-1/top-5 on the
  clean held-out split and each distribution-shift split, robustness average;
- `labelsets`: zero-shot on the primary object's colour and position, and
  shape top-1 on images with and without their shape's typical colour;
- `retrieval`: image-to-text and text-to-image Recall@1/5/10, optionally with
  PE's DSL re-weighting;
- `features`: batched, gradient-free embedding of splits and texts;
- `templates`: the prompt template sets;
- `report`: the metrics bar plot.

Metric names: docs/metrics.md. The `peflow evaluate` stage ties them together
(`peflow.stages.evaluate`).
"""

from peflow.evaluate.retrieval import retrieval_metrics  # noqa: F401
from peflow.evaluate.templates import get_templates  # noqa: F401
from peflow.evaluate.zeroshot import class_embeddings, zeroshot_metrics  # noqa: F401
