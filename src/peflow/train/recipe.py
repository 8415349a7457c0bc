"""The pretraining recipe (paper section 2.1): presets `vanilla` and `pe`, and any mix.

Every piece of the robust PE recipe is a field here, so vanilla CLIP and the
full PE recipe are each one name away, an ablation is one field changed, and
`vanilla+lamb+augment` names vanilla CLIP with two of PE's pieces (`PIECES`):

- optimizer: LAMB, betas (0.9, 0.95), weight decay 0.05 (vanilla: AdamW);
- schedule: linear warm-up, then cosine to zero;
- progressive resolution: a list of (resolution, fraction of steps);
- augmentation: RandomResizedCrop(scale (0.08, 1), ratio (0.75, 1.33),
  bilinear), ColorJitter(brightness 0.32, saturation 0.32), horizontal flip
  p=0.5. A flipped image's caption has "left" and "right" swapped, so that a
  caption never contradicts its image (`hflip_caption`);
- mask regularization: a fraction of the batch duplicated, 40% of the copy's
  patches masked, the copy's output tokens pulled to the clean image's
  (stop-gradient target) by 1 - cosine; the copies never enter the CLIP loss.

The step budget (steps, global batch, lr, resolutions, crop scale) is part of
the pretrain stage's config, set by the pipeline presets (peflow.presets): the
CPU presets are tuned to learn within minutes.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

#: Input normalisation of PE (mean = std = 0.5 per channel).
PE_MEAN = (0.5, 0.5, 0.5)
PE_STD = (0.5, 0.5, 0.5)


@dataclass(frozen=True, kw_only=True)
class Recipe:
    """One pretraining recipe: optimisation, resolution, augmentation, mask regularization."""

    name: str = "pe"
    optimizer: str = "lamb"  #: lamb | adamw
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.05
    lr: float = 2e-3
    #: lr of the parameters LAMB does not adapt (biases, norms, embeddings, logit scale: weight decay 0, so no
    #: trust ratio, a plain Adam step); None = lr. A short run raises lr, which sets the per-step change of the
    #: adapted matrices relative to their norm, without taking these to an Adam lr that diverges.
    plain_lr: float | None = None
    warmup_fraction: float = 0.05  #: warm-up steps as a fraction of the run, when not set explicitly
    max_logit_scale: float = 100.0
    progressive_resolution: bool = True
    augment: bool = True
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (0.75, 1.33)
    brightness: float = 0.32
    saturation: float = 0.32
    hflip: float = 0.5
    mask_reg_fraction: float = 1 / 16  #: share of each batch duplicated and masked (0 = off)
    mask_reg_min: int = 2  #: at least this many copies per micro-batch when on (tiny CPU batches)
    mask_ratio: float = 0.4
    #: not published; at weight 1 tiny CPU runs collapsed (constant tokens satisfy the cosine target), 0.1 did not
    mask_reg_weight: float = 0.1

    def validate(self) -> None:
        if self.optimizer not in ("lamb", "adamw"):
            raise ValueError(f"optimizer must be lamb or adamw, got {self.optimizer!r}")
        if not 0.0 <= self.mask_reg_fraction < 1.0:
            raise ValueError(f"mask_reg_fraction must be in [0, 1), got {self.mask_reg_fraction}")
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {self.mask_ratio}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.plain_lr is not None and (self.plain_lr <= 0 or self.optimizer != "lamb"):
            raise ValueError(f"plain_lr must be > 0 and needs the lamb optimizer, got {self.plain_lr} "
                             f"with {self.optimizer}")


def pe() -> Recipe:
    """The full robust PE-core recipe (paper Tab. 18)."""
    return Recipe()


def vanilla() -> Recipe:
    """The paper's baseline: AdamW, one resolution, no augmentation, no mask regularization."""
    return dataclasses.replace(pe(), name="vanilla", optimizer="adamw", betas=(0.9, 0.98), weight_decay=0.1,
                               lr=5e-4, progressive_resolution=False, augment=False, mask_reg_fraction=0.0)


def pe_adamw() -> Recipe:
    """The PE recipe with vanilla CLIP's optimizer (AdamW) instead of LAMB: the recipe for short runs.

    LAMB (a large-batch optimizer) changes each weight matrix by lr times its norm per step, so a run of N
    steps moves a matrix by at most about lr * N / 2 of its norm: the paper's 443K steps at batch 131K move
    its weights far, a 1200-step CPU run barely leaves the initialisation (docs/pretraining.md: at the nano
    budget LAMB took image-to-text R@1 from 19.4% to 2.6%, and this recipe beat vanilla CLIP on shape,
    robustness and atypical colours). Use LAMB where the batch is large enough to need it.
    """
    v = vanilla()
    return dataclasses.replace(pe(), name="pe-adamw", optimizer=v.optimizer, betas=v.betas,
                               weight_decay=v.weight_decay, lr=v.lr)


RECIPES = {"pe": pe, "vanilla": vanilla, "pe-adamw": pe_adamw}

#: The pieces of the PE recipe (paper section 2.1) a recipe name can add to another: each is the `pe`
#: recipe's values of these fields. `vanilla+lamb+augment` is vanilla CLIP with LAMB and the augmentation;
#: `vanilla` plus every piece is `pe`.
PIECES: dict[str, tuple[str, ...]] = {
    "progressive": ("progressive_resolution",),
    "lamb": ("optimizer", "betas", "weight_decay", "lr"),
    "augment": ("augment",),
    "mask_reg": ("mask_reg_fraction",),
}


def other_recipe(recipe: str) -> str:
    """The recipe an ablation compares against: pe for vanilla, vanilla for any other."""
    return "pe" if recipe == "vanilla" else "vanilla"


def get_recipe(name: str) -> Recipe:
    """A recipe by name: `pe`, `vanilla`, or one of them plus pieces of the PE recipe (`vanilla+lamb+augment`)."""
    base, *pieces = [p.strip() for p in name.split("+")]
    if base not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; known: {sorted(RECIPES)}, each optionally followed by "
                         f"+piece ({', '.join(PIECES)})")
    recipe = RECIPES[base]()
    bad = [p for p in pieces if p not in PIECES]
    if bad:
        raise ValueError(f"recipe {name!r}: unknown piece(s) {bad}; known: {list(PIECES)}")
    full = pe()
    changes = {f: getattr(full, f) for p in pieces for f in PIECES[p]}
    return dataclasses.replace(recipe, name=name, **changes)


def parse_resolutions(spec: str) -> list[tuple[int, float]]:
    """"32:0.4,48:0.35,64:0.25" -> [(32, 0.4), (48, 0.35), (64, 0.25)]; fractions normalised to sum 1."""
    out: list[tuple[int, float]] = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        try:
            res, _, frac = part.partition(":")
            out.append((int(res), float(frac) if frac else 1.0))
        except ValueError:
            raise ValueError(f"bad resolution entry {part!r} in {spec!r}; expected RES:FRACTION") from None
    if not out or any(r <= 0 or f <= 0 for r, f in out):
        raise ValueError(f"resolutions {spec!r}: need at least one RES:FRACTION with positive values")
    total = sum(f for _, f in out)
    return [(r, f / total) for r, f in out]


def resolution_schedule(spec: list[tuple[int, float]], steps: int) -> list[tuple[int, int]]:
    """(first step, resolution) per stage; stages cover [0, steps) in order."""
    starts, acc = [], 0.0
    for res, frac in spec:
        starts.append((round(acc * steps), res))
        acc += frac
    return starts


def resolution_at(schedule: list[tuple[int, int]], step: int) -> int:
    res = schedule[0][1]
    for start, r in schedule:
        if step >= start:
            res = r
    return res


_LR_WORDS = re.compile(r"\b(left|right)\b", flags=re.IGNORECASE)


def hflip_caption(caption: str) -> str:
    """The caption of a horizontally flipped image: "left" and "right" swapped (case kept).

    Spatial words are the only ones a mirror makes false in the built-in
    corpus; swapping keeps every caption true instead of dropping the flip
    for such captions (which would bias flips to captions without positions).
    """

    def swap(m: re.Match[str]) -> str:
        w = m.group(0)
        new = "right" if w.lower() == "left" else "left"
        return new.capitalize() if w[0].isupper() else new

    return _LR_WORDS.sub(swap, caption)
