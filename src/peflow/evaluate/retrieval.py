"""Zero-shot image-text retrieval: Recall@K in both directions.

Protocol (CLIP_benchmark, as the PE evaluation uses it): raw captions are
encoded, both sides L2-normalised, scores are cosines `S[t, i]` (texts x
images).
- image-to-text: an image is a hit at K when any of its own captions is
  among the K highest-scoring texts of its column;
- text-to-image: a caption is a hit at K when its image is among the K
  highest-scoring images of its row.

DSL re-weighting (PE App. B.1.2, `--reweight-retrieval` in the PE repo):
`S = S * softmax(scale * S, dim=0)`, the softmax taken over the texts of
each image. Scores are cosines in [-1, 1], and s * exp(scale * s) increases
with s there for scale <= 1, so the re-weighting leaves each image's ranking of texts
(image-to-text) unchanged; it changes text-to-image.

Shape legend: N images, M texts, E embedding dim.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

RECALL_AT: tuple[int, ...] = (1, 5, 10)


def similarity(text_emb_ME: torch.Tensor, image_emb_NE: torch.Tensor) -> torch.Tensor:
    """[M, N] cosine scores."""
    return F.normalize(text_emb_ME.float(), dim=-1) @ F.normalize(image_emb_NE.float(), dim=-1).T


def dsl_reweight(scores_MN: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """`S * softmax(scale * S, dim=0)`: each score weighted by how strongly its
    image prefers this text over the other texts."""
    return scores_MN * torch.softmax(scale * scores_MN, dim=0)


def recall_at_k(
    scores_MN: torch.Tensor, text_to_image_M: torch.Tensor, ks: Sequence[int] = RECALL_AT
) -> dict[str, float]:
    """Recall@K fractions from a texts x images score matrix, keyed `i2t/R<K>`
    and `t2i/R<K>` (R1, R5, R10: MLflow metric names allow no "@").

    `text_to_image_M[t]` is the index of the image caption t describes; every
    image needs at least one caption.
    """
    M, N = scores_MN.shape
    if text_to_image_M.shape != (M,):
        raise ValueError(f"text_to_image has shape {tuple(text_to_image_M.shape)}, expected ({M},)")
    if M == 0 or N == 0:
        raise ValueError("retrieval needs at least one image and one caption")
    owner = text_to_image_M.long()
    if int(owner.min()) < 0 or int(owner.max()) >= N:
        raise ValueError(f"text_to_image holds image indices outside [0, {N})")
    if torch.bincount(owner, minlength=N).eq(0).any():
        raise ValueError("every image needs at least one caption for image-to-text retrieval")

    out: dict[str, float] = {}
    # Rank = how many other candidates score at least as high: ties count
    # against the model, so a collapsed (constant) embedding cannot look perfect.
    true_M = scores_MN.gather(1, owner[:, None])
    rank_t2i_M = (scores_MN >= true_M).sum(dim=1) - 1
    # image-to-text: best rank over the image's own captions, per column
    mine_MN = owner[:, None].eq(torch.arange(N)[None, :])
    best_true_N = scores_MN.masked_fill(~mine_MN, float("-inf")).max(dim=0).values
    rank_i2t_N = (scores_MN >= best_true_N[None, :]).sum(dim=0) - 1
    for k in ks:
        out[f"i2t/R{k}"] = float((rank_i2t_N < k).float().mean())
        out[f"t2i/R{k}"] = float((rank_t2i_M < k).float().mean())
    return out


def retrieval_metrics(
    image_emb_NE: torch.Tensor,
    text_emb_ME: torch.Tensor,
    text_to_image_M: torch.Tensor,
    *,
    dsl: bool = False,
    dsl_scale: float = 1.0,
    ks: Sequence[int] = RECALL_AT,
) -> dict[str, float]:
    """Flat metrics `retrieval/{i2t,t2i}/R<K>` and `retrieval/mean_recall`;
    with `dsl`, also the same under `retrieval_dsl/`."""
    scores = similarity(text_emb_ME, image_emb_NE)
    out: dict[str, float] = {}
    variants = [("retrieval", scores)] + ([("retrieval_dsl", dsl_reweight(scores, dsl_scale))] if dsl else [])
    for prefix, s in variants:
        r = recall_at_k(s, text_to_image_M, ks)
        out.update({f"{prefix}/{k}": v for k, v in r.items()})
        out[f"{prefix}/mean_recall"] = sum(r.values()) / len(r)
    return out
