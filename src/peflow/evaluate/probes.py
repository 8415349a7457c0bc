"""Layer-by-layer frozen probes: where in the network does each kind of
information sit? (The PE paper's finding: the best features for many tasks
are inside the network, not at its last layer.)

Features are extracted once per split with every layer tapped, then four
linear probes are fitted per layer on the frozen features (protocols and
metric names: docs/metrics.md, "Layer-by-layer probes"):

- `cls`   pooled features -> primary shape label; top-1 on the test split
- `seg`   each patch token -> class of the patch (background or category); mIoU
- `depth` each patch token -> mean depth of the patch (ridge regression); R^2
- `lang`  pooled features -> frozen caption embeddings (InfoNCE); i2t R@1

Any encoder with layer taps plugs in through `LayerTaps` (`pe_layer_taps`
builds one for a PE model); `run_probes` is the PE entry point.

Shape legend: N images, B batch, L tokens (prefix + patches), P patches per
image (the token grid), K patches kept per image, R patch rows, D width, F
pooled feature dim, C classes (background included for `seg`), E text
embedding dim, M texts, G pairs per InfoNCE group, H x W mask pixels.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

TASKS: tuple[str, ...] = ("cls", "seg", "depth", "lang")
DENSE_TASKS: tuple[str, ...] = ("seg", "depth")
METRIC_NAMES = {"cls": "top-1", "seg": "mIoU", "depth": "R^2", "lang": "i2t R@1"}


@dataclasses.dataclass(frozen=True)
class LayerTaps:
    """An encoder with layer taps: `encode(images [B, 3, S, S]) -> {layer: tokens [B, L, D]}` for
    every layer in `layers` (1-based), the first `num_prefix` tokens being prefix tokens (the CLS
    token first) and the rest the `grid` of patch tokens in row-major order."""

    encode: Callable[[torch.Tensor], Mapping[int, torch.Tensor]]
    layers: tuple[int, ...]
    num_prefix: int
    grid: tuple[int, int]
    image_size: int


def pe_layer_taps(model: torch.nn.Module, image_size: int | None = None) -> LayerTaps:
    """Every block of a PE model's vision trunk, at `image_size` (default: the native size)."""
    from peflow.models.pe import encode_layers, num_layers

    trunk = model.visual.trunk
    size = image_size or int(model.visual.image_size[0])
    patch = trunk.patch_embed.patch_size
    layers = tuple(range(1, num_layers(model) + 1))
    return LayerTaps(encode=lambda x: encode_layers(model, x, layers), layers=layers,
                     num_prefix=int(trunk.num_prefix_tokens), grid=(size // patch[0], size // patch[1]),
                     image_size=size)


@dataclasses.dataclass
class ProbeFeatures:
    """One split's frozen features at every layer, with the probe targets."""

    pooled: dict[int, torch.Tensor]  # layer -> [N, F]: CLS ++ mean patch token (F = 2D), mean only without CLS
    patches: dict[int, torch.Tensor]  # layer -> [R, D] patch tokens (empty without dense targets)
    labels: torch.Tensor  # [N] label_id, -1 when the sample has none
    captions: list[str]
    seg: torch.Tensor | None = None  # [R] patch class: 0 background, 1 + label_id of the object covering most of it
    depth: torch.Tensor | None = None  # [R] mean depth of the patch
    text_emb: torch.Tensor | None = None  # [N, E] frozen caption embeddings (for `lang`)

    def __len__(self) -> int:
        return len(self.captions)


def patch_targets(mask_HW: np.ndarray, depth_HW: np.ndarray, categories: Sequence[int], grid: tuple[int, int],
                  num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense targets on the token grid: ([P] class of the majority of each patch's pixels,
    0 = background, 1 + c = category c; [P] mean depth of the patch). `categories[i]` is the
    label id of mask value i + 1; non-square images are squashed like the image itself."""
    lut = torch.tensor([0, *(1 + c for c in categories)])
    pixel_class = lut[torch.from_numpy(mask_HW.astype(np.int64))]
    onehot_CHW = F.one_hot(pixel_class, num_classes + 1).permute(2, 0, 1).float()
    seg = F.adaptive_avg_pool2d(onehot_CHW, grid).flatten(1).argmax(0)
    depth = F.adaptive_avg_pool2d(torch.from_numpy(depth_HW.astype(np.float32))[None], grid).flatten()
    return seg, depth


@torch.no_grad()
def extract_features(taps: LayerTaps, samples: Iterable[dict[str, Any]], *, classnames: Sequence[str],
                     dense: bool, patches_per_image: int | None = None, batch_size: int = 64,
                     seed: int = 0, device: torch.device | str = "cpu") -> ProbeFeatures:
    """Encode `samples` (as `iter_image_text` yields them; with "mask"/"depth" when `dense`)
    with every layer tapped in one forward per batch. Dense rows keep `patches_per_image`
    random patches per image (all when None), drawn with `seed`."""
    from peflow.evaluate.features import _batched, _label_id, preprocess

    gen = torch.Generator().manual_seed(seed)
    P = taps.grid[0] * taps.grid[1]
    index = {name: i for i, name in enumerate(classnames)}
    pooled: dict[int, list[torch.Tensor]] = {k: [] for k in taps.layers}
    patches: dict[int, list[torch.Tensor]] = {k: [] for k in taps.layers}
    labels: list[int] = []
    captions: list[str] = []
    seg: list[torch.Tensor] = []
    depth: list[torch.Tensor] = []
    for batch in _batched(samples, batch_size):
        x = torch.stack([preprocess(s["image"], taps.image_size) for s in batch]).to(device)
        tokens = taps.encode(x)
        keep_BK = None
        if dense:
            k = P if patches_per_image is None else min(P, patches_per_image)
            keep_BK = torch.stack([torch.randperm(P, generator=gen)[:k].sort().values for _ in batch])
            for s, keep in zip(batch, keep_BK):
                cats = [index[o["category"]] for o in s["meta"].get("objects", [])]
                s_seg, s_depth = patch_targets(s["mask"], s["depth"], cats, taps.grid, len(classnames))
                seg.append(s_seg[keep])
                depth.append(s_depth[keep])
        for layer in taps.layers:
            t_BLD = tokens[layer].float().cpu()
            patch_BPD = t_BLD[:, taps.num_prefix:]
            if patch_BPD.shape[1] != P:
                raise ValueError(f"layer {layer}: {patch_BPD.shape[1]} patch tokens, expected {P} ({taps.grid} grid)")
            mean_BD = patch_BPD.mean(1)
            pooled[layer].append(torch.cat([t_BLD[:, 0], mean_BD], 1) if taps.num_prefix else mean_BD)
            if keep_BK is not None:
                patches[layer].append(patch_BPD.gather(1, keep_BK[..., None].expand(-1, -1, patch_BPD.shape[2]))
                                      .flatten(0, 1))
        labels += [_label_id(s["meta"], classnames) for s in batch]
        captions += [s["caption"] for s in batch]
    if not captions:
        raise ValueError("no samples to probe")
    return ProbeFeatures(pooled={k: torch.cat(v) for k, v in pooled.items()},
                         patches={k: torch.cat(v) for k, v in patches.items()} if dense else {},
                         labels=torch.tensor(labels, dtype=torch.long), captions=captions,
                         seg=torch.cat(seg) if dense else None, depth=torch.cat(depth) if dense else None)


def _standardise(train: torch.Tensor, test: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both sides standardised with the train mean and std (per feature)."""
    mean, std = train.mean(0), train.std(0).clamp_min(1e-6)
    return (train - mean) / std, (test - mean) / std


def _lbfgs(loss_fn: Callable[[], torch.Tensor], params: list[torch.Tensor], max_iter: int) -> None:
    """Full-batch L-BFGS (strong Wolfe line search) from the given (zero) start: deterministic."""
    opt = torch.optim.LBFGS(params, lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-7, tolerance_change=1e-10)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss

    opt.step(closure)


def fit_logistic(x_NF: torch.Tensor, y_N: torch.Tensor, num_classes: int, *, weight_decay: float = 1e-4,
                 max_iter: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression (cross-entropy + weight_decay * |W|^2) from zero:
    (W [C, F], b [C])."""
    W = torch.zeros(num_classes, x_NF.shape[1], requires_grad=True)
    b = torch.zeros(num_classes, requires_grad=True)
    with torch.enable_grad():
        _lbfgs(lambda: F.cross_entropy(F.linear(x_NF, W, b), y_N) + weight_decay * W.square().sum(), [W, b],
               max_iter)
    return W.detach(), b.detach()


def cls_probe(x_train_NF: torch.Tensor, y_train_N: torch.Tensor, x_test_NF: torch.Tensor, y_test_N: torch.Tensor,
              num_classes: int, *, max_iter: int = 50) -> float:
    """Linear classification probe: top-1 accuracy on the test rows."""
    x_train, x_test = _standardise(x_train_NF, x_test_NF)
    W, b = fit_logistic(x_train, y_train_N, num_classes, max_iter=max_iter)
    return float(F.linear(x_test, W, b).argmax(1).eq(y_test_N).float().mean())


def mean_iou(pred_R: torch.Tensor, target_R: torch.Tensor, num_classes: int) -> float:
    """Mean IoU over the classes present in `target` (classes absent from it are skipped;
    wrong predictions of them still count as misses of the true class)."""
    conf_CC = torch.bincount(target_R * num_classes + pred_R, minlength=num_classes ** 2).view(num_classes, -1)
    tp, gt, pr = conf_CC.diag().float(), conf_CC.sum(1).float(), conf_CC.sum(0).float()
    present = gt > 0
    return float((tp[present] / (gt + pr - tp)[present]).mean())


def seg_probe(x_train_RD: torch.Tensor, y_train_R: torch.Tensor, x_test_RD: torch.Tensor, y_test_R: torch.Tensor,
              num_classes: int, *, max_iter: int = 50) -> float:
    """Linear per-patch segmentation probe over `num_classes` classes (background included): mIoU."""
    x_train, x_test = _standardise(x_train_RD, x_test_RD)
    W, b = fit_logistic(x_train, y_train_R, num_classes, max_iter=max_iter)
    return mean_iou(F.linear(x_test, W, b).argmax(1), y_test_R, num_classes)


def depth_probe(x_train_RD: torch.Tensor, d_train_R: torch.Tensor, x_test_RD: torch.Tensor, d_test_R: torch.Tensor,
                *, ridge: float = 1e-3) -> float:
    """Linear (ridge) regression of patch depth, features and targets standardised with train
    statistics, solved in closed form: R^2 = 1 - MSE / Var(depth) on the test rows."""
    x_train, x_test = (x.double() for x in _standardise(x_train_RD, x_test_RD))
    mu, sd = d_train_R.double().mean(), d_train_R.double().std().clamp_min(1e-6)
    y_train = (d_train_R.double() - mu) / sd
    gram_FF = x_train.T @ x_train + ridge * len(x_train) * torch.eye(x_train.shape[1], dtype=torch.float64)
    w_F = torch.linalg.solve(gram_FF, x_train.T @ y_train)
    pred = x_test @ w_F * sd + mu
    d = d_test_R.double()
    return float(1 - F.mse_loss(pred, d) / d.var(unbiased=False).clamp_min(1e-12))


def lang_probe(x_train_NF: torch.Tensor, text_train_NE: torch.Tensor, x_test_NF: torch.Tensor,
               text_test_NE: torch.Tensor, *, weight_decay: float = 1e-3, group: int = 512,
               max_iter: int = 50) -> float:
    """Language probe: a linear map W [E, F] (no bias) of the standardised features, trained with
    the symmetric InfoNCE loss against the L2-normalised frozen caption embeddings (logits
    x W t^T; W's scale plays the temperature, so the loss is convex). Image i's caption is
    text i; negatives are the other pairs of its group (consecutive groups of `group` pairs,
    like CLIP batches, which keeps the cost linear in N). Returns image-to-text R@1 over the
    test captions (ties count as misses)."""
    from peflow.evaluate.retrieval import recall_at_k, similarity

    x_train, x_test = _standardise(x_train_NF, x_test_NF)
    t_train = F.normalize(text_train_NE.float(), dim=-1)
    W = torch.zeros(t_train.shape[1], x_train.shape[1], requires_grad=True)
    groups = list(zip(x_train.split(group), t_train.split(group)))

    def loss() -> torch.Tensor:
        total = torch.zeros(())
        for x_GF, t_GE in groups:
            logits_GG, target = F.linear(x_GF, W) @ t_GE.T, torch.arange(len(x_GF))
            total = total + F.cross_entropy(logits_GG, target, reduction="sum") \
                + F.cross_entropy(logits_GG.T, target, reduction="sum")
        return total / (2 * len(x_train)) + weight_decay * W.square().sum()

    with torch.enable_grad():
        _lbfgs(loss, [W], max_iter)
    scores_MN = similarity(text_test_NE, F.linear(x_test, W.detach()))
    return recall_at_k(scores_MN, torch.arange(len(x_test)), ks=(1,))["i2t/R1"]


def score_layers(train: ProbeFeatures, test: ProbeFeatures, *, tasks: Sequence[str], num_classes: int,
                 max_iter: int = 50) -> dict[str, list[float]]:
    """{task: [test score at each layer, in layer order]}."""
    layers = sorted(train.pooled)
    out: dict[str, list[float]] = {}
    for task in tasks:
        scores = []
        for k in layers:
            if task == "cls":
                s = cls_probe(train.pooled[k], train.labels, test.pooled[k], test.labels, num_classes,
                              max_iter=max_iter)
            elif task == "seg":
                s = seg_probe(train.patches[k], train.seg, test.patches[k], test.seg, num_classes + 1,
                              max_iter=max_iter)
            elif task == "depth":
                s = depth_probe(train.patches[k], train.depth, test.patches[k], test.depth)
            elif task == "lang":
                s = lang_probe(train.pooled[k], train.text_emb, test.pooled[k], test.text_emb, max_iter=max_iter)
            else:
                raise ValueError(f"unknown probe task {task!r}; known: {', '.join(TASKS)}")
            scores.append(s)
        out[task] = scores
    return out


def summarise(per_layer: Mapping[str, Sequence[float]], layers: Sequence[int]) -> dict[str, float]:
    """Flat metrics: `probe/<task>/layer_<i>`, `best_layer` (the first layer with the highest
    test score), `best` and `last` (the score at the last layer)."""
    out: dict[str, float] = {}
    for task, scores in per_layer.items():
        out.update({f"probe/{task}/layer_{k}": float(s) for k, s in zip(layers, scores)})
        best = int(np.argmax(scores))
        out.update({f"probe/{task}/best_layer": float(layers[best]), f"probe/{task}/best": float(scores[best]),
                    f"probe/{task}/last": float(scores[-1])})
    return out


@dataclasses.dataclass
class ProbeResult:
    """Per-layer probe scores and the flat metrics derived from them."""

    layers: list[int]
    per_layer: dict[str, list[float]]  # task -> score per layer
    metrics: dict[str, float]  # probe/<task>/{layer_<i>,best_layer,best,last}
    chance: dict[str, float]  # task -> score of a guess, where there is one
    counts: dict[str, int]
    notes: list[str]
    depth_var: float | None = None  # variance of the test patches' depth: RMSE = sqrt((1 - R^2) * depth_var)

    def depth_rmse(self, r2: float) -> float | None:
        """The depth probe's test RMSE from its R^2."""
        return None if self.depth_var is None else float(np.sqrt(max(0.0, 1.0 - r2) * self.depth_var))

    def to_json(self) -> dict[str, Any]:
        """The per-layer table written as `layers.json`."""
        tasks = {t: {"metric": METRIC_NAMES[t], "scores": s, "chance": self.chance.get(t),
                     **{k: self.metrics[f"probe/{t}/{k}"] for k in ("best_layer", "best", "last")}}
                 for t, s in self.per_layer.items()}
        return {"layers": self.layers, "tasks": tasks, "counts": self.counts, "notes": self.notes}


def has_dense_targets(root: str | Path, split: str) -> bool:
    """Whether the first sample of `split` carries mask.png and depth.png (the built-in corpus)."""
    from peflow.data.formats import CorruptSampleError, iter_image_text, shard_paths

    try:
        next(iter_image_text(shard_paths(root, split), with_dense=True), None)
    except CorruptSampleError as e:
        if "dense targets" in str(e):
            return False
        raise
    return True


def probe_layers(taps: LayerTaps, data_root: str | Path, *, text_encoder: Callable[[list[str]], torch.Tensor]
                 | None, classnames: Sequence[str], train_split: str = "train", test_split: str = "test",
                 probe_train: int = 2000, probe_test: int = 500, tasks: Sequence[str] = TASKS, seed: int = 0,
                 train_patches_per_image: int | None = 16, batch_size: int = 64, max_iter: int = 50,
                 device: torch.device | str = "cpu") -> ProbeResult:
    """Fit every probe in `tasks` at every tapped layer: the first `probe_train` samples of
    `train_split` train the probes, the first `probe_test` of `test_split` score them.
    `text_encoder(captions) -> [M, E]` is the frozen language model of the `lang` probe.
    Tasks the data cannot support (no dense targets, no labels, no text encoder) are
    dropped with a note."""
    from peflow.data.formats import iter_image_text, shard_paths

    unknown = sorted(set(tasks) - set(TASKS))
    if unknown or not tasks:
        raise ValueError(f"unknown probe tasks {unknown or list(tasks)}; known: {', '.join(TASKS)}")
    tasks, notes = list(dict.fromkeys(tasks)), []
    dense = any(t in DENSE_TASKS for t in tasks)
    if dense and not (has_dense_targets(data_root, train_split) and has_dense_targets(data_root, test_split)):
        notes.append(f"{data_root}: no dense targets (mask.png, depth.png); skipped the seg and depth probes")
        tasks, dense = [t for t in tasks if t not in DENSE_TASKS], False
    if "lang" in tasks and text_encoder is None:
        notes.append("no text encoder; skipped the lang probe")
        tasks.remove("lang")

    def features(split: str, n: int, per_image: int | None) -> ProbeFeatures:
        samples = itertools.islice(iter_image_text(shard_paths(data_root, split), with_dense=dense), n)
        return extract_features(taps, samples, classnames=classnames, dense=dense, patches_per_image=per_image,
                                batch_size=batch_size, seed=seed, device=device)

    train = features(train_split, probe_train, train_patches_per_image)
    test = features(test_split, probe_test, None)
    if "cls" in tasks and bool((train.labels < 0).any() or (test.labels < 0).any()):
        notes.append("samples without a label (json label_id); skipped the cls probe")
        tasks.remove("cls")
    if "lang" in tasks:
        assert text_encoder is not None
        train.text_emb, test.text_emb = text_encoder(train.captions), text_encoder(test.captions)
    if not tasks:
        raise ValueError(f"{data_root}: none of the probe tasks can run here ({'; '.join(notes)})")
    per_layer = score_layers(train, test, tasks=tasks, num_classes=len(classnames), max_iter=max_iter)
    layers = sorted(train.pooled)
    chance = {"cls": 1 / len(classnames), "lang": 1 / len(test)}
    counts = {"probe_images/train": len(train), "probe_images/test": len(test),
              "probe_patches/train": len(train.seg) if train.seg is not None else 0,
              "probe_patches/test": len(test.seg) if test.seg is not None else 0}
    depth_var = float(test.depth.double().var(unbiased=False)) if "depth" in per_layer else None
    return ProbeResult(layers=layers, per_layer=per_layer, metrics=summarise(per_layer, layers),
                       chance={t: c for t, c in chance.items() if t in per_layer}, counts=counts, notes=notes,
                       depth_var=depth_var)


def run_probes(model: torch.nn.Module, data_root: str | Path, *, tokenizer: Any, train_split: str = "train",
               test_split: str = "test", probe_train: int = 2000, probe_test: int = 500,
               image_size: int | None = None, seed: int = 0, tasks: Sequence[str] = TASKS,
               classnames: Sequence[str] | None = None, batch_size: int = 64,
               device: torch.device | str = "cpu") -> ProbeResult:
    """Layer-by-layer probes of a PE CLIP model (every vision block tapped; the `lang` probe's
    frozen language model is the model's own text tower). `classnames` default to the corpus's."""
    from peflow.data.formats import label_names
    from peflow.evaluate.features import encode_texts

    model.eval()
    return probe_layers(
        pe_layer_taps(model, image_size), data_root,
        text_encoder=lambda texts: encode_texts(model, tokenizer, texts, batch_size=batch_size, device=device),
        classnames=classnames if classnames is not None else label_names(data_root),
        train_split=train_split, test_split=test_split, probe_train=probe_train, probe_test=probe_test,
        tasks=tasks, seed=seed, batch_size=batch_size, device=device,
    )


def plot_layers(result: ProbeResult, path: str | Path, *, title: str = "",
                others: Mapping[str, ProbeResult] | None = None) -> Path:
    """Score against layer, one panel per task: the best layer starred, the last layer
    boxed, chance dashed; `others` (name -> result, e.g. an aligned model) drawn beside it in
    the panels of the tasks they have. Written without a timestamp (same scores, same bytes)."""
    from peflow.plots import pyplot, save

    plt = pyplot()

    tasks = list(result.per_layer)
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.2 * len(tasks), 3.2), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        scores, m = result.per_layer[task], result.metrics
        best = int(m[f"probe/{task}/best_layer"])
        ax.plot(result.layers, scores, "o-", ms=3, color="tab:blue")
        ax.plot([result.layers[-1]], [scores[-1]], "s", ms=9, mfc="none", mec="black",
                label=f"last: layer {result.layers[-1]} ({scores[-1]:.3f})")
        ax.plot([best], [m[f"probe/{task}/best"]], "*", ms=13, color="tab:red",
                label=f"best: layer {best} ({m[f'probe/{task}/best']:.3f})")
        for (name, other), colour in zip((others or {}).items(), ("tab:green", "tab:purple", "tab:orange")):
            if task in other.per_layer:
                ax.plot(other.layers, other.per_layer[task], "^--", ms=3, color=colour,
                        label=f"{name}: last {other.per_layer[task][-1]:.3f}")
        if task in result.chance:
            ax.axhline(result.chance[task], color="grey", ls="--", lw=1, label=f"chance ({result.chance[task]:.3f})")
        ax.set_xlabel("layer")
        ax.set_ylabel(METRIC_NAMES[task])
        ax.set_xticks(result.layers[::max(1, len(result.layers) // 12)])
        ax.margins(x=0.08, y=0.25)
        ax.set_title(task)
        ax.legend(fontsize=7, loc="best")
    return save(fig, path, title=title)


def write_layers_json(result: ProbeResult, path: str | Path) -> Path:
    """`layers.json`: the per-layer table (`ProbeResult.to_json`)."""
    path = Path(path)
    path.write_text(json.dumps(result.to_json(), indent=2) + "\n")
    return path
