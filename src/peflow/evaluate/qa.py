"""Question answering with a vision-language model (PE lang): accuracy per question type.

The corpus's QA pairs (json `qa`: question, one-word answer, type; `peflow.data.synth.qa`)
are asked of held-out images and videos: the model generates greedily after the question
and an answer counts when the generation, lower-cased and stripped of punctuation, equals
the answer. Next to each type's accuracy sits the majority baseline: always answering the
type's most common train answer (count "3", colour "red", ...), the score a model that
ignores the image would reach.

Metric names (docs/metrics.md, "PE lang"): `qa/<image|video>/<type>` and
`qa/<image|video>/<type>_majority`, `qa/<image|video>/mean` (over types) and its
`mean_majority`.
"""

from __future__ import annotations

import string
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

_STRIP = string.punctuation + string.whitespace


def normalise(text: str) -> str:
    """Lower case, outer punctuation and spaces removed, inner spaces collapsed."""
    return " ".join(text.lower().strip(_STRIP).split())


def qa_examples(clips: Iterable[Any]) -> list[tuple[Any, dict[str, str]]]:
    """(clip, qa pair) for every QA pair in the clips' json records."""
    return [(c, qa) for c in clips for qa in c.meta.get("qa") or []]


def majority_answers(pairs: Iterable[dict[str, str]]) -> dict[str, str]:
    """Type -> its most common answer (ties: the first seen)."""
    counts: dict[str, Counter[str]] = defaultdict(Counter)
    for qa in pairs:
        counts[qa["type"]][normalise(qa["answer"])] += 1
    return {t: c.most_common(1)[0][0] for t, c in counts.items()}


def answer_questions(model: Any, examples: Sequence[tuple[Any, dict[str, str]]], *, batch_size: int = 128,
                     max_new_tokens: int = 6) -> list[str]:
    """The model's greedy answer to each (clip, qa) example (batched per frame count)."""
    import torch

    from peflow.models.vlm import frames_tensor

    out = [""] * len(examples)
    by_frames: dict[int, list[int]] = defaultdict(list)
    for i, (clip, _) in enumerate(examples):
        by_frames[len(clip.frames)].append(i)
    model.eval()
    with torch.no_grad():
        for idx in by_frames.values():
            for s in range(0, len(idx), batch_size):
                chunk = idx[s:s + batch_size]
                frames = frames_tensor(np.stack([examples[i][0].frames for i in chunk]), model.image_size)
                answers = model.generate(frames=frames, prompts=[examples[i][1]["question"] for i in chunk],
                                         max_new_tokens=max_new_tokens)
                for i, a in zip(chunk, answers):
                    out[i] = a
    return out


def qa_accuracy(answers: Sequence[str], examples: Sequence[tuple[Any, dict[str, str]]],
                majority: dict[str, str], *, prefix: str) -> dict[str, float]:
    """`prefix/<type>` accuracy and `prefix/<type>_majority`, and both means over the types present."""
    right: dict[str, list[bool]] = defaultdict(list)
    base: dict[str, list[bool]] = defaultdict(list)
    for answer, (_, qa) in zip(answers, examples):
        truth = normalise(qa["answer"])
        right[qa["type"]].append(normalise(answer) == truth)
        base[qa["type"]].append(majority.get(qa["type"]) == truth)
    metrics: dict[str, float] = {}
    for t in sorted(right):
        metrics[f"{prefix}/{t}"] = float(np.mean(right[t]))
        metrics[f"{prefix}/{t}_majority"] = float(np.mean(base[t]))
    if right:
        metrics[f"{prefix}/mean"] = float(np.mean([metrics[f"{prefix}/{t}"] for t in right]))
        metrics[f"{prefix}/mean_majority"] = float(np.mean([metrics[f"{prefix}/{t}_majority"] for t in right]))
    return metrics


def evaluate_qa(model: Any, held_out: dict[str, Sequence[Any]], train: dict[str, Sequence[Any]], *,
                prefix: str = "qa", batch_size: int = 128) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """QA metrics of `model` on held-out clips per modality (`image`, `video`), majority answers from the
    modality's train clips; also the first examples (question, answer, model's answer) per modality."""
    metrics: dict[str, float] = {}
    shown: list[dict[str, Any]] = []
    for modality, clips in held_out.items():
        examples = qa_examples(clips)
        if not examples:
            continue
        majority = majority_answers(qa for _, qa in qa_examples(train.get(modality, ())))
        answers = answer_questions(model, examples, batch_size=batch_size)
        metrics.update(qa_accuracy(answers, examples, majority, prefix=f"{prefix}/{modality}"))
        shown += [{"modality": modality, "key": c.key, "type": qa["type"], "question": qa["question"],
                   "answer": qa["answer"], "prediction": a} for (c, qa), a in list(zip(examples, answers))[:20]]
    return metrics, shown


def qa_probe_layers(taps: Any, clips: Sequence[Any], *, holdout: float = 0.3, max_iter: int = 50,
                    batch_size: int = 128) -> dict[int, float]:
    """A quick frozen probe of which layer holds the answers: per layer, the class token and the 2x2-pooled
    patch grid of each image (one-frame clips) predict the answer of each image question type (the first
    question of the type per image) by logistic regression; the score is the held-out accuracy averaged
    over types. Layer -> score."""
    import torch
    import torch.nn.functional as F

    from peflow.evaluate.probes import cls_probe
    from peflow.models.vlm import frames_tensor

    feats: dict[int, list[torch.Tensor]] = defaultdict(list)
    h, w = taps.grid
    with torch.no_grad():
        for s in range(0, len(clips), batch_size):
            x = frames_tensor(np.stack([c.frames[0] for c in clips[s:s + batch_size]]), taps.image_size)
            for layer, tokens in taps.encode(x).items():
                prefix, patches = tokens[:, :taps.num_prefix], tokens[:, taps.num_prefix:]
                grid = F.adaptive_avg_pool2d(patches.transpose(1, 2).reshape(len(x), -1, h, w), 2).flatten(1)
                feats[layer].append(torch.cat([prefix.flatten(1), grid], 1))
    answers: dict[str, list[str | None]] = defaultdict(lambda: [None] * len(clips))
    for n, c in enumerate(clips):
        for qa in reversed(c.meta.get("qa") or []):
            answers[qa["type"]][n] = normalise(qa["answer"])
    cut = int(len(clips) * (1 - holdout))
    scores: dict[int, float] = {}
    for layer, parts in sorted(feats.items()):
        x = torch.cat(parts)
        accs = []
        for kind, ys in sorted(answers.items()):
            rows = [i for i, y in enumerate(ys) if y is not None]
            train, test = [i for i in rows if i < cut], [i for i in rows if i >= cut]
            if not train or not test:
                continue
            vocab = {y: k for k, y in enumerate(sorted({ys[i] for i in rows}))}
            y = torch.tensor([vocab[ys[i]] for i in rows])
            y_train, y_test = y[:len(train)], y[len(train):]
            accs.append(cls_probe(x[train], y_train, x[test], y_test, len(vocab), max_iter=max_iter))
        scores[layer] = float(np.mean(accs)) if accs else 0.0
    return scores
