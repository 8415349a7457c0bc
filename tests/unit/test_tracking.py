"""Label-propagation tracking: J on hand-made masks; propagation recovers translating objects
from features that identify them and not from noise; `track_layers` ranks a layer that
sees the objects above a noise layer; a tiny PE model runs end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from peflow.evaluate.probes import LayerTaps, pe_layer_taps
from peflow.evaluate.tracking import TrackResult, j_score, object_ious, propagate, track_layers, track_videos

GRID = 8  # token grid of the synthetic videos
T = 5  # frames
BG, COLOURS = (30, 30, 200), {1: (220, 40, 40), 2: (40, 200, 40)}


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _token_masks() -> np.ndarray:
    """uint8 [T, GRID, GRID]: object 1 (3x3) moves right one token a frame, object 2 (2x2) left."""
    m = np.zeros((T, GRID, GRID), dtype=np.uint8)
    for t in range(T):
        m[t, 1:4, 1 + t:4 + t] = 1
        m[t, 5:7, 6 - t:8 - t] = 2
    return m


def _upsample(masks_THW: np.ndarray, cell: int) -> np.ndarray:
    return masks_THW.repeat(cell, axis=1).repeat(cell, axis=2)


def _video(key: str = "v0", cell: int = 6, empty: bool = False) -> dict:
    """A video as `iter_video(..., with_masks=True)` yields it: coloured squares on a blue
    background, masks at pixel resolution (GRID * cell pixels a side)."""
    masks = _upsample(_token_masks(), cell)
    if empty:
        masks[:] = 0
    lut = np.array([BG, COLOURS[1], COLOURS[2]], dtype=np.uint8)
    return {"key": key, "frames": lut[masks], "masks": masks, "meta": {}}


def test_j_score():
    true = _upsample(_token_masks(), 4)
    assert j_score(true, true) == 1.0
    assert j_score(np.zeros_like(true), true) == 0.0
    assert object_ious(np.zeros_like(true), true).tolist() == [0.0, 0.0]
    half = true.copy()
    half[half == 2] = 0  # object 2 missed everywhere
    assert j_score(half, true) == pytest.approx(0.5)
    # object 2 leaves the video in frames 3..4 and the prediction agrees: those frames count 1.0
    gone, pred = true.copy(), true.copy()
    gone[3:][gone[3:] == 2] = 0
    pred[pred == 2] = 0
    assert object_ious(pred, gone).tolist() == pytest.approx([1.0, 2 / 4])
    assert np.isnan(j_score(true * 0, true * 0))  # no object in frame 0
    assert np.isnan(j_score(true[:1], true[:1]))  # nothing after frame 0
    with pytest.raises(ValueError, match="must both be"):
        j_score(true[:2], true)


def _features(masks_Thw: np.ndarray, noise: float, seed: int = 0) -> torch.Tensor:
    """[T, h, w, 16]: one vector per label (background, object 1, object 2) plus noise."""
    g = torch.Generator().manual_seed(seed)
    protos = torch.randn(3, 16, generator=g)
    return protos[torch.from_numpy(masks_Thw.astype(np.int64))] + noise * torch.randn(*masks_Thw.shape, 16,
                                                                                       generator=g)


def test_propagate_follows_translating_objects():
    tokens = _token_masks()
    true = _upsample(tokens, 4)
    pred = propagate(_features(tokens, 0.1), true[0], out_size=true.shape[1:])
    assert pred.dtype == np.uint8 and pred.shape == true.shape
    assert (pred[0] == true[0]).all()
    assert j_score(pred, true) > 0.9
    # a larger output (the first mask nearest-resized) and only frame 0 as context still work
    big = _upsample(tokens, 8)
    pred_big = propagate(_features(tokens, 0.1), true[0], out_size=big.shape[1:], context=0, topk=3)
    assert (pred_big[0] == big[0]).all() and j_score(pred_big, big) > 0.9
    # random features carry no labels
    noise = torch.randn(T, GRID, GRID, 16, generator=torch.Generator().manual_seed(1))
    assert j_score(propagate(noise, true[0], out_size=true.shape[1:]), true) < 0.5
    with pytest.raises(ValueError, match="temperature"):
        propagate(noise, true[0], out_size=true.shape[1:], temperature=0.0)


def _fake_taps() -> LayerTaps:
    """Layer 1: noise; layer 2: each patch's mean colour (the objects' identity). A CLS token first."""
    g = torch.Generator().manual_seed(0)
    patch = 4

    def encode(x_B3SS: torch.Tensor) -> dict[int, torch.Tensor]:
        colour_BPD = F.avg_pool2d(x_B3SS, patch).flatten(2).transpose(1, 2)
        noise_BPD = torch.randn(colour_BPD.shape[0], GRID * GRID, 8, generator=g)
        return {k: torch.cat([p.mean(1, keepdim=True), p], 1) for k, p in ((1, noise_BPD), (2, colour_BPD))}

    return LayerTaps(encode=encode, layers=(1, 2), num_prefix=1, grid=(GRID, GRID), image_size=GRID * patch)


def test_track_layers_ranks_the_layer_that_sees_the_objects():
    videos = [_video("a"), _video("b", cell=5), _video("empty", empty=True)]
    result = track_layers(_fake_taps(), iter(videos), batch_size=4)  # forwards of 4 frames across videos
    assert isinstance(result, TrackResult)
    assert result.videos == 2 and result.skipped == 1 and result.objects == 4
    j1, j2 = result.per_layer[1], result.per_layer[2]
    assert j2 > 0.85 and j1 < 0.5
    assert result.best_layer == 2 and result.best == j2 and result.last == j2
    only1 = track_layers(_fake_taps(), videos[:1], layers=[1])
    assert only1.best_layer == 1 and only1.last == only1.best == only1.per_layer[1]
    table = json.loads(json.dumps(result.to_json()))
    assert table["layers"] == [1, 2] and table["scores"] == [j1, j2] and table["best_layer"] == 2
    assert result.metrics() == {"track/J/layer_1": j1, "track/J/layer_2": j2, "track/J/best_layer": 2.0,
                                "track/J/best": j2, "track/J/last": j2}
    with pytest.raises(ValueError, match="not tapped"):
        track_layers(_fake_taps(), videos, layers=[3])
    with pytest.raises(ValueError, match="no video to track"):
        track_layers(_fake_taps(), videos[2:])


@pytest.fixture(scope="module")
def tiny_model() -> torch.nn.Module:
    from peflow.models.pe import build_model

    torch.manual_seed(0)
    return build_model("test").eval()


@pytest.mark.parametrize("image_size", [None, 64])
def test_track_layers_with_a_tiny_pe_model(tiny_model, image_size):
    taps = pe_layer_taps(tiny_model, image_size)
    result = track_layers(taps, [_video("a"), _video("b", cell=5)])
    assert result.videos == 2 and sorted(result.per_layer) == list(taps.layers) == [1, 2, 3, 4]
    assert all(0.0 <= j <= 1.0 for j in result.per_layer.values())
    assert result.settings["grid"] == list(taps.grid) == [taps.image_size // 8] * 2


def test_track_videos_reads_the_corpus(tiny_corpus, tiny_model):
    result = track_videos(pe_layer_taps(tiny_model), tiny_corpus, num_videos=3, num_frames=4, layers=[2, 4])
    assert result.videos + result.skipped == 3 and sorted(result.per_layer) == [2, 4]
    assert all(0.0 <= j <= 1.0 for j in result.per_layer.values())
