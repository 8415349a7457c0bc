"""Zero-shot classification: prompt-ensembled class embeddings, top-k accuracy,
and the robustness average over the clean and shifted splits.

Protocol (CLIP; open_clip's zero-shot classifier; PE App. B.1.2): every class
name is put into each template, the prompts are encoded, their embeddings
L2-normalised and averaged, and the mean normalised again. An image is
assigned the class whose embedding has the largest cosine with its own
normalised embedding. The temperature does not change the ranking, so none
is applied.

Shape legend: N images, C classes, T templates, E embedding dim.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

from peflow.evaluate.templates import prompts

TOPK: tuple[int, ...] = (1, 5)


@torch.no_grad()
def class_embeddings(
    encode_texts: Callable[[list[str]], torch.Tensor],
    classnames: Sequence[str],
    templates: Sequence[str],
) -> torch.Tensor:
    """[C, E] unit vectors: per class, the normalised mean of its normalised
    template embeddings. `encode_texts` maps a list of strings to [n, E]."""
    if not classnames:
        raise ValueError("zero-shot classification needs at least one class name")
    if not templates:
        raise ValueError("zero-shot classification needs at least one template")
    per_class = prompts(list(classnames), tuple(templates))
    flat = [p for ps in per_class for p in ps]
    emb_CTE = F.normalize(encode_texts(flat).float(), dim=-1).view(len(classnames), len(templates), -1)
    return F.normalize(emb_CTE.mean(dim=1), dim=-1)


def topk_correct(logits_NC: torch.Tensor, labels_N: torch.Tensor, ks: Sequence[int] = TOPK) -> dict[int, int]:
    """How many rows have their label among the k largest logits, for each k.

    The label's rank is the number of other classes scoring at least as high,
    so ties count against the model (a constant output cannot score above chance).
    """
    if logits_NC.shape[0] != labels_N.shape[0]:
        raise ValueError(f"{logits_NC.shape[0]} logit rows but {labels_N.shape[0]} labels")
    true_N1 = logits_NC.gather(1, labels_N.long()[:, None])
    rank_N = (logits_NC >= true_N1).sum(dim=1) - 1
    return {k: int((rank_N < k).sum()) for k in ks}


def zeroshot_accuracy(
    image_emb_NE: torch.Tensor, labels_N: torch.Tensor, classifier_CE: torch.Tensor, ks: Sequence[int] = TOPK
) -> dict[str, float]:
    """{"top1": ..., "top5": ...} fractions for one split."""
    n = image_emb_NE.shape[0]
    if n == 0:
        raise ValueError("zero-shot accuracy of an empty split")
    logits_NC = F.normalize(image_emb_NE.float(), dim=-1) @ classifier_CE.float().T
    correct = topk_correct(logits_NC, labels_N, ks)
    return {f"top{k}": correct[k] / n for k in ks}


def robustness_average(top1_by_split: Mapping[str, float]) -> float:
    """Mean top-1 over the clean split and every shift split (PE's "Avg class."
    over ImageNet and its robustness variants, in this corpus's terms)."""
    if not top1_by_split:
        raise ValueError("robustness average over no splits")
    return sum(top1_by_split.values()) / len(top1_by_split)


def zeroshot_metrics(
    features: Mapping[str, tuple[torch.Tensor, torch.Tensor]], classifier_CE: torch.Tensor
) -> dict[str, float]:
    """Flat metrics for every split in `features` ({split: (image_emb, labels)}).

    Keys: `zeroshot/<split>/top1`, `zeroshot/<split>/top5`,
    `zeroshot/robustness_avg`, `zeroshot/chance_top1`.
    """
    out: dict[str, float] = {}
    top1: dict[str, float] = {}
    for split, (emb, labels) in features.items():
        acc = zeroshot_accuracy(emb, labels, classifier_CE)
        for name, v in acc.items():
            out[f"zeroshot/{split}/{name}"] = v
        top1[split] = acc["top1"]
    out["zeroshot/robustness_avg"] = robustness_average(top1)
    out["zeroshot/chance_top1"] = 1.0 / classifier_CE.shape[0]
    return out
