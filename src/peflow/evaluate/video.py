"""Video zero-shot classification and text-video retrieval (paper App. B.1.2: a clip is the
mean of its uniformly sampled frames' CLIP embeddings, as PE encodes video).

Zero-shot runs on the 10 actions and on the 7 motion types that frame averaging can
tell apart at all. An average over frames is the same for a clip played forwards or
backwards, and `move left`/`move right`, `move up`/`move down` and `grow`/`shrink` are
exactly such pairs (the same frames in reverse order), so no averaged-frame model can
separate them: their best is 50% within each pair. The 7 types merge each pair (a type
scores the best of its actions' logits). Retrieval ranks the held-out videos' human
captions (t2v, v2t: R@1/5/10).

Shape legend: V videos, F frames, E embedding dim, C classes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from peflow.data.synth import vocab

#: Order-free motion types: each merges the actions that are the same frames in reverse.
MOTION_TYPES: dict[str, tuple[str, ...]] = {
    "horizontal move": ("move left", "move right"),
    "vertical move": ("move up", "move down"),
    "size change": ("grow", "shrink"),
    "rotate": ("rotate",),
    "colour change": ("change colour",),
    "bounce": ("bounce",),
    "shake": ("shake",),
}
#: Pairs no frame-averaging model can tell apart (each is the other played backwards).
INDISTINGUISHABLE = (("move left", "move right"), ("move up", "move down"), ("grow", "shrink"))

def action_prompts(action: str) -> list[str]:
    """Prompts for one action class (averaged into its classifier row), in the corpus's own phrasing:
    the human captions' detail phrase (`peflow.data.synth.vtext`) and the action's verb and gerund."""
    from peflow.data.synth.vtext import DETAIL

    a = vocab.ACTION_BY_NAME[action]
    details = {"rotate": ["rotates clockwise about its center", "rotates counter-clockwise about its center"],
               "change colour": ["stays in place and gradually changes colour"]}.get(action, [DETAIL.get(action, a.verb)])
    out = [f"a video of a shape {a.gerund}.", f"a shape that {a.verb}."]
    for d in details:
        out += [f"A shape {d}.", f"A medium-sized shape {d}, on a plain background."]
    return out


@dataclass
class VideoFeatures:
    """Held-out videos' clip embeddings (mean of frame embeddings, unnormalised), labels, captions."""

    emb: torch.Tensor  # [V, E]
    labels: torch.Tensor  # [V] action ids
    captions: list[str | None]  # human captions
    keys: list[str]


@torch.no_grad()
def encode_videos(model: torch.nn.Module, shards: Sequence[str], *, num_frames: int, image_size: int,
                  batch_size: int = 32, max_videos: int | None = None) -> VideoFeatures:
    """Clip embeddings of the videos in `shards`: `num_frames` uniform frames, each through
    `encode_image`, averaged."""
    from peflow.data.formats import iter_video
    from peflow.models.vlm import frames_tensor

    embs, labels, captions, keys, batch = [], [], [], [], []

    def flush() -> None:
        x = frames_tensor(torch.stack([torch.from_numpy(v["frames"]) for v in batch]), image_size)
        V, Fr = x.shape[:2]
        embs.append(model.encode_image(x.flatten(0, 1)).float().reshape(V, Fr, -1).mean(1))
        batch.clear()

    for i, v in enumerate(iter_video(shards, num_frames=num_frames)):
        if max_videos is not None and i >= max_videos:
            break
        labels.append(vocab.ACTIONS.index(v["category"]) if v["category"] in vocab.ACTIONS else -1)
        captions.append(v["human_caption"])
        keys.append(v["key"])
        batch.append(v)
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    if not keys:
        raise ValueError(f"no videos in {len(shards)} shard(s)")
    return VideoFeatures(torch.cat(embs), torch.tensor(labels), captions, keys)


def action_classifier(encode_texts: Any) -> torch.Tensor:
    """[C, E] unit vectors: per action, the normalised mean of its normalised prompt embeddings."""
    rows = []
    for action in vocab.ACTIONS:
        e = F.normalize(encode_texts(action_prompts(action)).float(), dim=-1)
        rows.append(F.normalize(e.mean(0), dim=-1))
    return torch.stack(rows)


def confusion(pred_V: torch.Tensor, labels_V: torch.Tensor, n: int) -> torch.Tensor:
    """[n, n] counts: row = true class, column = predicted."""
    m = torch.zeros(n, n, dtype=torch.long)
    for t, p in zip(labels_V.tolist(), pred_V.tolist()):
        m[t, p] += 1
    return m


def video_zeroshot(feats: VideoFeatures, classifier_CE: torch.Tensor) -> tuple[dict[str, float], torch.Tensor]:
    """Top-1 on the 10 actions and the 7 motion types, per-pair confusion, and the action confusion matrix."""
    logits = F.normalize(feats.emb, dim=-1) @ classifier_CE.T
    labels = feats.labels
    pred = logits.argmax(1)
    metrics = {"zeroshot/top1": float((pred == labels).float().mean())}
    groups = list(MOTION_TYPES.values())
    group_of = torch.tensor([next(g for g, members in enumerate(groups) if a in members) for a in vocab.ACTIONS])
    group_logits = torch.stack([logits[:, [vocab.ACTIONS.index(a) for a in m]].max(1).values for m in groups], 1)
    metrics["zeroshot_motion/top1"] = float((group_logits.argmax(1) == group_of[labels]).float().mean())
    for a, b in INDISTINGUISHABLE:
        ia, ib = vocab.ACTIONS.index(a), vocab.ACTIONS.index(b)
        keep = (labels == ia) | (labels == ib)
        if keep.any():  # within the pair: how often the right one of the two wins
            two = logits[keep][:, [ia, ib]].argmax(1)
            metrics[f"zeroshot_pair/{a.replace(' ', '_')}__{b.replace(' ', '_')}"] = float(
                (two == (labels[keep] == ib).long()).float().mean())
    return metrics, confusion(pred, labels, len(vocab.ACTIONS))


def video_retrieval(feats: VideoFeatures, encode_texts: Any) -> dict[str, float]:
    """t2v and v2t R@1/5/10 over the videos that have a human caption."""
    from peflow.evaluate.retrieval import recall_at_k, similarity

    keep = [i for i, c in enumerate(feats.captions) if c]
    if len(keep) < 2:
        return {}
    scores = similarity(encode_texts([feats.captions[i] for i in keep]).float(), feats.emb[keep])
    r = recall_at_k(scores, torch.arange(len(keep)))
    return {f"retrieval/{k.replace('i2t', 'v2t').replace('t2i', 't2v')}": v for k, v in r.items()}


def plot_confusion(matrices: dict[str, torch.Tensor], path: str | Path) -> Path:
    """One panel per model: the action confusion matrix (rows true, columns predicted)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(matrices), figsize=(5.2 * len(matrices), 5), squeeze=False)
    for ax, (name, m) in zip(axes[0], matrices.items()):
        frac = m.float() / m.sum(1, keepdim=True).clamp(min=1)
        ax.imshow(frac, vmin=0, vmax=1, cmap="Blues")
        ax.set_xticks(range(len(vocab.ACTIONS)), vocab.ACTIONS, rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(len(vocab.ACTIONS)), vocab.ACTIONS, fontsize=7)
        for (i, j), n in ((ij, int(m[ij])) for ij in ((i, j) for i in range(len(m)) for j in range(len(m)))):
            if n:
                ax.text(j, i, str(n), ha="center", va="center", fontsize=6)
        ax.set_title(f"{name}: true (rows) vs predicted", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def evaluate_video(model: torch.nn.Module, tokenizer: Any, shards: Sequence[str], *, num_frames: int,
                   image_size: int, batch_size: int = 32, max_videos: int | None = None
                   ) -> tuple[dict[str, float], torch.Tensor, int]:
    """Zero-shot and retrieval metrics of one CLIP model on held-out videos; the confusion matrix; the count."""
    from peflow.evaluate.features import encode_texts

    feats = encode_videos(model, shards, num_frames=num_frames, image_size=image_size, batch_size=batch_size,
                          max_videos=max_videos)

    def texts(t: list[str]) -> torch.Tensor:
        return encode_texts(model, tokenizer, t)

    metrics, matrix = video_zeroshot(feats, action_classifier(texts))
    metrics.update(video_retrieval(feats, texts))
    return metrics, matrix, len(feats.keys)
