"""Zero-shot video object tracking by label propagation (the PE paper's dense video
evaluation, DAVIS protocol): the first frame's instance masks are carried through the
video by feature affinity alone, with no training.

Per video and tapped layer: the frames are encoded independently, the patch tokens
L2-normalised; the first frame's mask becomes soft labels on the token grid (the
one-hot mask area-averaged over each patch). Frame t's tokens then attend to the
tokens of its context, frame 0 (with its true labels) plus the previous `context`
frames (with their predicted soft labels): the `topk` most similar context tokens of
each query token, weighted by softmax(similarity / temperature), vote their labels.
Predicted soft labels are upsampled bilinearly to the mask size and argmaxed.

Score: region similarity J, the IoU of an object's predicted and true masks, averaged
over frames 1..T-1 (a frame where the object is absent from both counts as 1), then
over objects (those in the first frame's mask) pooled across videos, as DAVIS averages.

Shape legend: T frames, h x w token grid, P = h * w patches, Q context tokens, D width,
C labels (background included), K objects, H x W mask pixels, B batch, L tokens.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from peflow.evaluate.probes import LayerTaps


def soft_labels(mask_HW: np.ndarray | torch.Tensor, grid: tuple[int, int], num_labels: int) -> torch.Tensor:
    """[C, h, w] soft labels: the one-hot of `mask` (values < `num_labels`) area-averaged onto the grid."""
    mask = torch.as_tensor(np.asarray(mask_HW), dtype=torch.long)
    onehot_CHW = F.one_hot(mask, num_labels).permute(2, 0, 1).float()
    return F.adaptive_avg_pool2d(onehot_CHW, grid)


@torch.no_grad()
def propagate(feats_THWD: torch.Tensor, first_mask_HW: np.ndarray | torch.Tensor, *, out_size: tuple[int, int],
              context: int = 7, topk: int = 5, temperature: float = 0.07) -> np.ndarray:
    """Label maps uint8 [T, H_out, W_out] predicted from token features [T, h, w, D] and the
    first frame's mask (0 background, i object i; any size, squashed to the grid like the
    frames). Frame 0 is the given mask (nearest-resized to `out_size` if need be)."""
    if temperature <= 0 or topk < 1 or context < 0:
        raise ValueError(f"need temperature > 0, topk >= 1, context >= 0 (got {temperature}, {topk}, {context})")
    T, h, w, D = feats_THWD.shape
    first = torch.as_tensor(np.asarray(first_mask_HW), dtype=torch.long)
    if first.ndim != 2 or int(first.min()) < 0 or int(first.max()) > 255:
        raise ValueError(f"first mask must be [H, W] labels in 0..255, got shape {tuple(first.shape)}")
    C = int(first.max()) + 1
    device = feats_THWD.device
    feats_TPD = F.normalize(feats_THWD.float().reshape(T, h * w, D), dim=-1)
    labels_TPC = torch.zeros(T, h * w, C, device=device)
    labels_TPC[0] = soft_labels(first, (h, w), C).flatten(1).T.to(device)
    for t in range(1, T):
        ctx = [0, *range(max(1, t - context), t)]
        keys_QD, vals_QC = feats_TPD[ctx].flatten(0, 1), labels_TPC[ctx].flatten(0, 1)
        aff_PQ = feats_TPD[t] @ keys_QD.T
        top_PK, idx_PK = aff_PQ.topk(min(topk, aff_PQ.shape[1]), dim=1)
        weight_PK = torch.softmax(top_PK / temperature, dim=1)
        labels_TPC[t] = torch.einsum("pk,pkc->pc", weight_PK, vals_QC[idx_PK])
    out = torch.empty(T, *out_size, dtype=torch.uint8)
    if T > 1:
        soft_TCHW = labels_TPC[1:].permute(0, 2, 1).reshape(T - 1, C, h, w)
        up = F.interpolate(soft_TCHW, size=out_size, mode="bilinear", align_corners=False)
        out[1:] = up.argmax(1).to(torch.uint8).cpu()
    if tuple(first.shape) != tuple(out_size):
        first = F.interpolate(first[None, None].float(), size=out_size, mode="nearest")[0, 0].long()
    out[0] = first.to(torch.uint8)
    return out.numpy()


def object_ious(pred_THW: np.ndarray | torch.Tensor, true_THW: np.ndarray | torch.Tensor) -> np.ndarray:
    """[K] each object's J: IoU over frames 1..T-1, averaged (1.0 in a frame where the object
    is absent from both). Objects: the labels > 0 in the first true frame; empty when there
    are none, or a single frame."""
    pred, true = np.asarray(pred_THW), np.asarray(true_THW)
    if pred.shape != true.shape or pred.ndim != 3:
        raise ValueError(f"prediction {pred.shape} and truth {true.shape} must both be [T, H, W]")
    objs_K = np.unique(true[0])
    objs_K = objs_K[objs_K > 0]
    if len(objs_K) == 0 or len(true) < 2:  # nothing to score
        return np.zeros(0)
    p_KTHW = pred[None, 1:] == objs_K[:, None, None, None]
    g_KTHW = true[None, 1:] == objs_K[:, None, None, None]
    inter_KT = (p_KTHW & g_KTHW).sum((2, 3))
    union_KT = (p_KTHW | g_KTHW).sum((2, 3))
    iou_KT = np.where(union_KT > 0, inter_KT / np.maximum(union_KT, 1), 1.0)
    return iou_KT.mean(1)


def j_score(pred_THW: np.ndarray | torch.Tensor, true_THW: np.ndarray | torch.Tensor) -> float:
    """Region similarity J of one video: IoU averaged over the objects of the first true
    frame and frames 1..T-1 (DAVIS-style, 1.0 where an object is absent from both);
    NaN when there is nothing to score (no object, or a single frame)."""
    ious = object_ious(pred_THW, true_THW)
    return float(ious.mean()) if len(ious) else float("nan")


@dataclasses.dataclass
class TrackResult:
    """Tracking J per tapped layer, over `objects` objects in `videos` videos (`skipped`:
    videos with no object in their first frame, or a single frame)."""

    per_layer: dict[int, float]
    videos: int
    objects: int = 0
    skipped: int = 0
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def layers(self) -> list[int]:
        return sorted(self.per_layer)

    @property
    def best_layer(self) -> int:
        """The first layer with the highest J."""
        layers = self.layers
        return layers[int(np.argmax([self.per_layer[k] for k in layers]))]

    @property
    def best(self) -> float:
        return self.per_layer[self.best_layer]

    @property
    def last(self) -> float:
        """J at the last (deepest) tapped layer."""
        return self.per_layer[self.layers[-1]]

    def metrics(self) -> dict[str, float]:
        """Flat metrics: `track/J/layer_<i>`, `track/J/best_layer`, `track/J/best`, `track/J/last`."""
        out = {f"track/J/layer_{k}": float(self.per_layer[k]) for k in self.layers}
        out.update({"track/J/best_layer": float(self.best_layer), "track/J/best": float(self.best),
                    "track/J/last": float(self.last)})
        return out

    def to_json(self) -> dict[str, Any]:
        """The per-layer table."""
        return {"metric": "J", "layers": self.layers, "scores": [float(self.per_layer[k]) for k in self.layers],
                "best_layer": self.best_layer, "best": float(self.best), "last": float(self.last),
                "videos": self.videos, "objects": self.objects, "skipped": self.skipped, "settings": self.settings}


def _encoded(taps: LayerTaps, videos: Iterable[dict[str, Any]], layers: Sequence[int], batch_size: int,
             device: torch.device | str) -> Iterator[tuple[dict[str, Any], dict[int, torch.Tensor]]]:
    """(video, {layer: patch features [T, h, w, D]}) per video; frames of consecutive videos
    share forwards of up to `batch_size` frames."""
    from peflow.models.vlm import frames_tensor

    h, w = taps.grid

    def encode(buffer: list[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], dict[int, torch.Tensor]]]:
        x = torch.cat([frames_tensor(v["frames"], taps.image_size) for v in buffer])
        chunks: dict[int, list[torch.Tensor]] = {k: [] for k in layers}
        for x_B in x.split(batch_size):
            tokens = taps.encode(x_B.to(device))
            for k in layers:
                patch_BPD = tokens[k][:, taps.num_prefix:].float()
                if patch_BPD.shape[1] != h * w:
                    raise ValueError(f"layer {k}: {patch_BPD.shape[1]} patch tokens, expected {h * w} "
                                     f"({taps.grid} grid)")
                chunks[k].append(patch_BPD)
        feats = {k: torch.cat(v).unflatten(1, (h, w)) for k, v in chunks.items()}
        start = 0
        for v in buffer:
            T = len(v["frames"])
            yield v, {k: f[start:start + T] for k, f in feats.items()}
            start += T

    buffer: list[dict[str, Any]] = []
    for v in videos:
        buffer.append(v)
        if sum(len(b["frames"]) for b in buffer) >= batch_size:
            yield from encode(buffer)
            buffer = []
    if buffer:
        yield from encode(buffer)


@torch.no_grad()
def track_layers(taps: LayerTaps, videos: Iterable[dict[str, Any]], *, layers: Sequence[int] | None = None,
                 context: int = 7, topk: int = 5, temperature: float = 0.07, batch_size: int = 64,
                 device: torch.device | str = "cpu") -> TrackResult:
    """Label-propagation tracking J at each layer in `layers` (default: every tapped layer) over
    `videos` (as `iter_video(..., with_masks=True)` yields them: "frames" uint8 [T, H, W, 3],
    "masks" uint8 [T, H, W]). Videos with nothing to score are skipped and counted."""
    layers = list(taps.layers if layers is None else layers)
    unknown = sorted(set(layers) - set(taps.layers))
    if unknown or not layers:
        raise ValueError(f"layers {unknown or layers} not tapped; tapped: {list(taps.layers)}")
    ious: dict[int, list[np.ndarray]] = {k: [] for k in layers}
    scored = skipped = 0
    for v, feats in _encoded(taps, videos, layers, batch_size, device):
        masks = np.asarray(v["masks"])
        if len(masks) < 2 or not (masks[0] > 0).any():
            skipped += 1
            continue
        for k in layers:
            pred = propagate(feats[k], masks[0], out_size=masks.shape[1:], context=context, topk=topk,
                             temperature=temperature)
            ious[k].append(object_ious(pred, masks))
        scored += 1
    if not scored:
        raise ValueError(f"no video to track ({skipped} without an object in their first frame or a second frame)")
    pooled = {k: np.concatenate(v) for k, v in ious.items()}
    return TrackResult(per_layer={k: float(p.mean()) for k, p in pooled.items()}, videos=scored,
                       objects=len(pooled[layers[0]]), skipped=skipped,
                       settings={"context": context, "topk": topk, "temperature": temperature,
                                 "image_size": taps.image_size, "grid": list(taps.grid)})


def track_videos(taps: LayerTaps, data_root: str | Path, split: str = "test", *, num_videos: int | None = 40,
                 num_frames: int | None = 8, **kw: Any) -> TrackResult:
    """`track_layers` on the first `num_videos` videos of `split` of a corpus with per-frame masks
    (the built-in one), `num_frames` uniformly sampled frames each (None: all)."""
    from peflow.data.formats import iter_video, shard_paths

    videos = iter_video(shard_paths(data_root, split, kind="video"), num_frames=num_frames, with_masks=True)
    return track_layers(taps, itertools.islice(videos, num_videos), **kw)
