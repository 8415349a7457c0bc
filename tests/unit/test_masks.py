"""Mask-logit backends and the similarity target of PE spatial alignment (peflow.models.masks)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch

from peflow.models.masks import MaskBackend, Sam2Masks, SuperpixelMasks, get_mask_backend, point_grid, similarity_target
from tests.sam2_fixture import tiny_sam2


def _images(b: int = 2, size: int = 64, seed: int = 0) -> np.ndarray:
    """Smooth random colour fields plus noise, uint8 [b, size, size, 3]."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (b, 4, 4, 3)).astype(np.float64)
    smooth = np.repeat(np.repeat(coarse, size // 4, axis=1), size // 4, axis=2)
    return np.clip(smooth + rng.normal(0, 8, smooth.shape), 0, 255).astype(np.uint8)


def _two_regions() -> np.ndarray:
    """One 64 px image: red left 24 columns, blue right 40 (the boundary falls on token column 3 of 8)."""
    image = np.zeros((1, 64, 64, 3), np.uint8)
    image[0, :, :24] = (200, 40, 40)
    image[0, :, 24:] = (40, 60, 200)
    return image


def test_point_grid_row_major_cell_centres() -> None:
    pts = point_grid(2, 64, 32)
    assert pts.tolist() == [[8.0, 16.0], [24.0, 16.0], [8.0, 48.0], [24.0, 48.0]]  # (x, y), x fastest


@pytest.mark.parametrize("method", ["slic", "felzenszwalb"])
def test_superpixel_features_shape_and_determinism(method: str) -> None:
    images = _images(3)
    backend = SuperpixelMasks(points=4, method=method)
    feats = backend.features(images, (8, 8))
    assert isinstance(backend, MaskBackend) and backend.name == "superpixels"
    assert feats.shape == (3, 8, 8, 16) and feats.dtype == torch.float32
    assert torch.isfinite(feats).all() and feats.abs().max() <= 10.0
    assert torch.equal(feats, SuperpixelMasks(points=4, method=method).features(images, (8, 8)))
    assert torch.equal(feats[1:2], backend.features(images[1:2], (8, 8)))  # no cross-image state
    assert backend.features(images, (4, 2)).shape == (3, 4, 2, 16)


def test_superpixel_prompt_is_most_positive_at_its_point() -> None:
    """Unblurred, each prompt's map peaks (+10) at its own point's pixel: SAM's sign convention, logit > 0 inside."""
    image = _images(1)[0]
    maps_PHW = SuperpixelMasks(points=8, softness=0.0).logit_maps(image)
    pts = point_grid(8, 64, 64).astype(int)
    at_point = maps_PHW[np.arange(64), pts[:, 1], pts[:, 0]]
    assert (at_point == 10.0).all() and maps_PHW.max() == 10.0 and (maps_PHW < 0).any()


def test_similarity_target_range_and_diagonal() -> None:
    feats = torch.randn(2, 4, 4, 10)
    feats[0, 0, 0] = 0.0  # an all-zero vector still has self-similarity 1
    target = similarity_target(feats)
    assert target.shape == (2, 16, 16) and target.dtype == torch.float32
    assert (target > 0).all() and (target <= 1).all()
    assert torch.equal(target.diagonal(dim1=1, dim2=2), torch.ones(2, 16))
    assert torch.allclose(target, target.transpose(1, 2))
    cos = torch.nn.functional.cosine_similarity(feats[1, 0, 1], feats[1, 2, 3], dim=0)
    assert torch.isclose(target[1, 1, 11], torch.exp(20 * (cos - 1)), atol=1e-6)


@pytest.mark.parametrize("method", ["slic", "felzenszwalb"])
def test_two_flat_regions_separate(method: str) -> None:
    target = similarity_target(SuperpixelMasks(method=method).features(_two_regions(), (8, 8)))[0]
    region = (torch.arange(8) >= 3).long().repeat(8)  # token (row, col) -> right region iff col >= 3
    same = region[:, None] == region[None, :]
    assert target[same].min() > 0.99
    assert target[~same].max() < 0.1


def test_get_mask_backend_errors() -> None:
    assert get_mask_backend("superpixels", points=3, n_segments=10).points == 3
    with pytest.raises(ValueError, match="needs model") as info:
        get_mask_backend("sam2")
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="unknown mask backend 'sam3'"):
        get_mask_backend("sam3")


def test_bad_sam2_path_names_it(tmp_path: Path) -> None:
    for bad in (tmp_path / "missing", tmp_path):  # absent folder; a folder holding no checkpoint
        with pytest.raises(ValueError) as info:
            get_mask_backend("sam2", model=str(bad))
        assert str(bad) in str(info.value) and "\n" not in str(info.value)


def test_sam2_tiny_end_to_end(tmp_path: Path) -> None:
    folder = tiny_sam2(tmp_path / "sam2")
    backend = get_mask_backend("sam2", model=str(folder), points=4, batch_size=2, prompts_per_call=10)
    assert isinstance(backend, Sam2Masks) and isinstance(backend, MaskBackend) and backend.name == "sam2"
    images = _images(3)
    start = time.perf_counter()
    feats = backend.features(images, (8, 8))
    elapsed = time.perf_counter() - start
    assert feats.shape == (3, 8, 8, 16) and feats.dtype == torch.float32 and torch.isfinite(feats).all()
    assert feats.std() > 0
    # batching of images and of prompts does not change the logits
    alone = Sam2Masks(str(folder), points=4, batch_size=1, prompts_per_call=16).features(images[2:], (8, 8))
    assert torch.allclose(feats[2:], alone, atol=1e-5)
    target = similarity_target(feats)
    assert target.shape == (3, 64, 64) and (target > 0).all() and (target <= 1).all()
    assert elapsed < 10.0
