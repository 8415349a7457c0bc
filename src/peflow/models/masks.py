"""Mask-logit teachers for PE spatial alignment (Perception Encoder paper, section 5).

The spatially aligned student matches its pairwise token-similarity matrix to that of SAM mask-logit features:
SAM is prompted with a grid of points, the raw mask logit of every prompt (no thresholding, no NMS) is stacked into
an H x W x P feature map, and that map is area-averaged to the student's token grid. `similarity_target` turns the
per-token P-vectors into the target matrix, exp(t * (cos - 1)).

Two backends give the [B, h, w, P] features (`MaskBackend.features`):

- `SuperpixelMasks` ("superpixels"): a label-free, CPU stand-in for SAM. Each image is over-segmented (SLIC or
  Felzenszwalb, scikit-image); a point prompt selects the region that grows from its superpixel through adjacent
  superpixels of similar colour (geodesic CIELAB distance on the superpixel adjacency graph), so, like SAM, one
  click answers with the whole coherent region it lands in, not only its superpixel. The region's logits are
  +10 at the clicked superpixel, fall by 1 per Delta-E of accumulated colour change (0 at 10 Delta-E), are clipped
  to [-10, 10], and are Gaussian-blurred with sigma `softness` pixels, so every map is smooth and has SAM's sign
  convention (logit 0 = mask boundary). Deterministic: SLIC starts from a regular grid and Felzenszwalb is a
  greedy graph merge, neither draws random numbers.
- `Sam2Masks` ("sam2"): SAM 2 through transformers (`Sam2Model` + `Sam2Processor`), one positive point per
  prompt, `multimask_output=False`, raw `pred_masks` logits.

Shape legend: B images, H x W pixels, P prompts (points x points, row-major: prompt p = row * points + col),
h x w the token grid, N = h * w tokens, K superpixels.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from torch.nn import functional as F

BACKENDS = ("superpixels", "sam2")
LOGIT_MAX = 10.0  #: superpixel logits are clipped to [-LOGIT_MAX, LOGIT_MAX] (SAM's raw logits are of this order)
HALF_DELTA_E = 10.0  #: accumulated CIELAB colour distance at which a superpixel's logit crosses 0


@runtime_checkable
class MaskBackend(Protocol):
    """A teacher of per-prompt mask logits."""

    name: str

    def features(self, images_BHW3: np.ndarray, grid: tuple[int, int]) -> torch.Tensor:
        """uint8 images [B, H, W, 3] -> float32 [B, h, w, P]: each prompt's mask logits, area-averaged to `grid`."""
        ...


def _check_images(images_BHW3: np.ndarray) -> np.ndarray:
    images_BHW3 = np.asarray(images_BHW3)
    if images_BHW3.ndim != 4 or images_BHW3.shape[-1] != 3:
        raise ValueError(f"images must be [B, H, W, 3], got shape {tuple(images_BHW3.shape)}")
    return images_BHW3


def point_grid(points: int, height: int, width: int) -> np.ndarray:
    """[points * points, 2] prompt points (x, y) in pixels at the cell centres of a points x points grid, row-major
    (SAM's automatic-mask-generator layout)."""
    centres = (np.arange(points, dtype=np.float64) + 0.5) / points
    ys, xs = np.meshgrid(centres * height, centres * width, indexing="ij")
    return np.stack([xs.ravel(), ys.ravel()], axis=-1)


def area_downsample(maps_BPHW: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """[B, P, H, W] -> [B, h, w, P], each token the mean of the pixels it covers (adaptive average pooling)."""
    pooled_BPhw = F.adaptive_avg_pool2d(maps_BPHW.float(), tuple(int(g) for g in grid))
    return pooled_BPhw.permute(0, 2, 3, 1).contiguous()


class SuperpixelMasks:
    """Label-free, deterministic superpixel mask logits (see the module docstring for the construction).

    `method`: "slic" (`n_segments`, `compactness`) or "felzenszwalb" (`n_segments` sets its minimum segment size,
    H * W / (2 * n_segments); scale 100, sigma 0.5). `softness`: sigma in pixels of the Gaussian blur of the
    logit maps (0: piecewise constant per superpixel). `seed` is kept for the run's configuration record: both
    segmenters are deterministic, so the features do not depend on it.
    """

    name = "superpixels"

    def __init__(self, points: int = 8, method: str = "slic", n_segments: int = 24, compactness: float = 10.0,
                 softness: float = 2.0, seed: int = 0):
        if method not in ("slic", "felzenszwalb"):
            raise ValueError(f"superpixel method must be 'slic' or 'felzenszwalb', got {method!r}")
        if points < 1 or n_segments < 1:
            raise ValueError(f"points and n_segments must be >= 1, got {points} and {n_segments}")
        self.points, self.method, self.n_segments = int(points), method, int(n_segments)
        self.compactness, self.softness, self.seed = float(compactness), float(softness), int(seed)

    def segment(self, image_HW3: np.ndarray) -> np.ndarray:
        """int [H, W] superpixel labels 0..K-1."""
        from skimage import segmentation

        height, width = image_HW3.shape[:2]
        if self.method == "slic":
            labels_HW = segmentation.slic(image_HW3, n_segments=self.n_segments, compactness=self.compactness,
                                          start_label=0, channel_axis=-1)
        else:
            labels_HW = segmentation.felzenszwalb(image_HW3, scale=100.0, sigma=0.5,
                                                  min_size=max(1, height * width // (2 * self.n_segments)))
        return np.unique(labels_HW, return_inverse=True)[1].reshape(height, width)

    def logit_maps(self, image_HW3: np.ndarray) -> np.ndarray:
        """float32 [P, H, W] mask logits of one uint8 image, one map per grid point."""
        from scipy import ndimage, sparse
        from scipy.sparse import csgraph
        from skimage import color

        height, width = image_HW3.shape[:2]
        labels_HW = self.segment(image_HW3)
        k = int(labels_HW.max()) + 1
        lab_HW3 = color.rgb2lab(image_HW3)
        count_K = np.bincount(labels_HW.ravel(), minlength=k).astype(np.float64)
        mean_K3 = np.stack([np.bincount(labels_HW.ravel(), lab_HW3[..., c].ravel(), minlength=k) for c in range(3)],
                           axis=-1) / count_K[:, None]
        # superpixel adjacency (4-neighbourhood), weighted by the colour step between neighbours; the tiny floor
        # keeps equal-colour neighbours connected (a sparse graph drops zero weights)
        a = np.concatenate([labels_HW[:, :-1].ravel(), labels_HW[:-1, :].ravel()])
        b = np.concatenate([labels_HW[:, 1:].ravel(), labels_HW[1:, :].ravel()])
        pairs = np.unique(np.stack([np.minimum(a, b), np.maximum(a, b)], axis=-1)[a != b], axis=0)
        step = np.linalg.norm(mean_K3[pairs[:, 0]] - mean_K3[pairs[:, 1]], axis=-1) + 1e-3
        graph = sparse.coo_matrix((step, (pairs[:, 0], pairs[:, 1])), shape=(k, k)).tocsr()
        pts_P2 = point_grid(self.points, height, width)
        rows = np.minimum(pts_P2[:, 1].astype(int), height - 1)
        cols = np.minimum(pts_P2[:, 0].astype(int), width - 1)
        clicked_U, prompt_to_U = np.unique(labels_HW[rows, cols], return_inverse=True)
        dist_UK = csgraph.dijkstra(graph, directed=False, indices=clicked_U)
        logit_UK = np.clip(HALF_DELTA_E - dist_UK, -LOGIT_MAX, LOGIT_MAX).astype(np.float32)
        maps_UHW = logit_UK[:, labels_HW]
        if self.softness > 0:
            maps_UHW = ndimage.gaussian_filter(maps_UHW, sigma=(0.0, self.softness, self.softness), mode="nearest")
        return maps_UHW[prompt_to_U.ravel()]

    def features(self, images_BHW3: np.ndarray, grid: tuple[int, int]) -> torch.Tensor:
        """uint8 [B, H, W, 3] -> float32 [B, h, w, P] (P = points ** 2)."""
        images_BHW3 = _check_images(images_BHW3)
        maps_BPHW = torch.from_numpy(np.stack([self.logit_maps(image) for image in images_BHW3]))
        return area_downsample(maps_BPHW, grid)


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    if not text:
        return type(error).__name__
    return f"{type(error).__name__}: {text[0] if len(text[0]) <= 160 else text[0][:157] + '...'}"


class Sam2Masks:
    """SAM 2 mask logits through transformers, prompted with a points x points grid of single positive points.

    Each prompt gives one mask (`multimask_output=False`): SAM 2's own answer to "one mask for this click" (its
    single-mask token, which SAM 2 itself swaps for the best-IoU multimask output when that token is unstable).
    One channel per prompt keeps P = points ** 2, as in the paper's H x W x P map; taking one fixed slot of the
    three multimask outputs would pick an arbitrary granularity instead. The logits are used raw: no sigmoid,
    no binarisation, no IoU or stability filtering of prompts, no NMS. Images go through `Sam2Processor`
    (resized to the checkpoint's input size, e.g. 1024, and normalised); the low-resolution logits
    (input size / 4, covering the whole resized image) are area-averaged straight to the token grid.

    `batch_size` images share one vision-encoder pass; their prompts are decoded `prompts_per_call` at a time
    (decoder memory grows with batch_size * prompts_per_call).
    """

    name = "sam2"

    def __init__(self, model: str, points: int = 8, batch_size: int = 8, device: str = "cpu",
                 prompts_per_call: int = 64):
        local = Path(model).expanduser()
        if not local.exists() and model.startswith(("/", ".", "~")):
            raise ValueError(f"sam2 model folder {model!r} does not exist")
        source = str(local) if local.exists() else model  # else a hub id
        from transformers import Sam2Model, Sam2Processor

        if points < 1 or batch_size < 1 or prompts_per_call < 1:
            raise ValueError(f"points, batch_size and prompts_per_call must be >= 1, got {points}, {batch_size}, "
                             f"{prompts_per_call}")
        try:
            self.processor = Sam2Processor.from_pretrained(source)
            self.model = Sam2Model.from_pretrained(source)
        except Exception as error:  # any load failure becomes one clear line naming the path
            raise ValueError(f"sam2 model {model!r} did not load as Sam2Model + Sam2Processor "
                             f"({_one_line(error)})") from error
        self.model.to(device).eval()
        self.model_id, self.points, self.batch_size = model, int(points), int(batch_size)
        self.device, self.prompts_per_call = torch.device(device), int(prompts_per_call)

    def features(self, images_BHW3: np.ndarray, grid: tuple[int, int]) -> torch.Tensor:
        """uint8 [B, H, W, 3] -> float32 [B, h, w, P] (P = points ** 2), on the CPU."""
        images_BHW3 = _check_images(images_BHW3)
        height, width = images_BHW3.shape[1:3]
        pts_P2 = point_grid(self.points, height, width).tolist()
        n_prompts = len(pts_P2)
        dtype = next(self.model.parameters()).dtype
        out = []
        for start in range(0, len(images_BHW3), self.batch_size):
            chunk = list(images_BHW3[start:start + self.batch_size])
            inputs = self.processor(images=chunk, input_points=[[[p] for p in pts_P2]] * len(chunk),
                                    input_labels=[[[1]] * n_prompts] * len(chunk), return_tensors="pt")
            pixels = inputs["pixel_values"].to(self.device, dtype)
            points_bP12 = inputs["input_points"].to(self.device)  # float32 pixels: kept exact under a bf16 model
            labels_bP1 = inputs["input_labels"].to(self.device)
            with torch.no_grad():
                embeddings = self.model.get_image_embeddings(pixels)
                pooled = []
                for q in range(0, n_prompts, self.prompts_per_call):
                    sl = slice(q, q + self.prompts_per_call)
                    result = self.model(image_embeddings=embeddings, input_points=points_bP12[:, sl],
                                        input_labels=labels_bP1[:, sl], multimask_output=False)
                    pooled.append(area_downsample(result.pred_masks[:, :, 0], grid))  # [b, h, w, p]
            out.append(torch.cat(pooled, dim=-1).cpu())
        return torch.cat(out)


def get_mask_backend(name: str, *, model: str = "", points: int = 8, **kw) -> MaskBackend:
    """The mask backend `name` ("superpixels" | "sam2"; "sam2" needs `model`, a hub id or a local folder)."""
    if name == "superpixels":
        return SuperpixelMasks(points=points, **kw)
    if name == "sam2":
        if not model:
            raise ValueError("mask backend 'sam2' needs model= (a SAM 2 hub id or a local Sam2Model folder)")
        return Sam2Masks(model, points=points, **kw)
    raise ValueError(f"unknown mask backend {name!r}; choose one of {', '.join(BACKENDS)}")


def similarity_target(feats_BhwP: torch.Tensor, temperature: float = 20.0) -> torch.Tensor:
    """[B, h, w, P] per-token mask-logit vectors -> float32 [B, N, N] (N = h * w): exp(t * (cos - 1)) of their
    pairwise cosine similarity (paper: t = 20), in (0, 1] with a diagonal of exactly 1 (also for all-zero
    vectors)."""
    b, h, w, p = feats_BhwP.shape
    unit_BNP = F.normalize(feats_BhwP.reshape(b, h * w, p).float(), dim=-1, eps=1e-8)
    cos_BNN = (unit_BNP @ unit_BNP.transpose(1, 2)).clamp(-1.0, 1.0)
    eye_NN = torch.eye(h * w, dtype=torch.bool, device=cos_BNN.device)
    cos_BNN = torch.where(eye_NN, torch.ones_like(cos_BNN), cos_BNN)
    return torch.exp(float(temperature) * (cos_BNN - 1.0))
