"""Model presets: the official PE-Core sizes (T/S/B/L/G) and the CPU presets.

Plain data, no torch: the command line, the Params form and config checks
read the names without loading a model library (`peflow.models.pe` builds them).
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelPreset:
    """Architecture of one PE-core CLIP model.

    The vision tower is timm's `timm_base` with the fields below overriding
    its width/depth/heads/patch; the text tower is open_clip's TextTransformer.
    """

    name: str
    timm_base: str = "vit_pe_core_tiny_patch16_384"
    image_size: int = 64
    patch_size: int = 8
    # nano: narrow and 6 blocks deep. Measured on the nano corpus (vanilla, batch 64, one
    # thread): width 64 took 0.27 s per step and reached zero-shot top-1 35% at 1000 steps;
    # the earlier width 128 (2 heads, 4 text layers) took 0.64 s and reached 27% at 800.
    width: int = 64
    depth: int = 6
    heads: int = 1
    mlp_ratio: float = 4.0
    embed_dim: int = 64
    text_width: int = 64
    text_heads: int = 1
    text_layers: int = 2
    context_length: int = 32
    vocab_size: int = 49408
    class_token: bool = True
    #: 2D RoPE in every attention block of the vision tower (the paper's Tab. 26 step 6; off: absolute
    #: position embedding only)
    rope: bool = True
    #: image embedding: `attn` (attention pooling, the CLS token kept as an input; Tab. 26 step 7) or `cls`
    #: (the CLS token's output)
    pool: str = "attn"

    #: the architecture switches a model card records when they differ from the preset (`arch`)
    ARCH = ("rope", "pool")

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    def vision_overrides(self) -> dict[str, Any]:
        """kwargs for timm's `timm_base` model function (see `build_vision_tower`)."""
        kw: dict[str, Any] = dict(
            img_size=self.image_size,
            patch_size=self.patch_size,
            embed_dim=self.width,
            depth=self.depth,
            num_heads=self.heads,
            mlp_ratio=self.mlp_ratio,
            # RoPE on integer patch positions of the actual grid, as the official
            # PE code does; timm's default for `vit_pe_*` rescales positions onto
            # the pretraining grid, which changes non-native sizes only (at the
            # native grid both give the same angles, bit for bit).
            ref_feat_shape=None,
            # Progressive resolution: the position embedding stays on the base
            # grid and is resampled on the fly at other input sizes
            # (`PEVisionTower`: bilinear, as the official code).
            dynamic_img_size=True,
        )
        if not self.class_token:
            kw.update(class_token=False, rope_grid_offset=0.0)
        if not self.rope:
            kw.update(use_rot_pos_emb=False)
        return kw

    @property
    def global_pool(self) -> str:
        """timm's `global_pool` of the tower: `map` (attention pooling) or `token` (CLS)."""
        return "map" if self.pool == "attn" else "token"

    def arch(self) -> dict[str, Any]:
        """The architecture switches that differ from the named preset's (what a model card records)."""
        base = MODEL_PRESETS.get(self.name)
        return {k: getattr(self, k) for k in self.ARCH if base is None or getattr(base, k) != getattr(self, k)}

    def with_arch(self, **arch: Any) -> ModelPreset:
        """This preset with architecture switches changed (`rope`, `pool`); unknown names or values raise."""
        bad = set(arch) - set(self.ARCH)
        if bad:
            raise ValueError(f"unknown architecture switch(es) {sorted(bad)}; known: {list(self.ARCH)}")
        if arch.get("pool", self.pool) not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {arch['pool']!r}")
        if arch.get("pool") == "cls" and not self.class_token:
            raise ValueError(f"pool cls needs a class token; model {self.name} has none")
        return dataclasses.replace(self, **arch)


#: image pooling choices (`ModelPreset.pool`)
POOLS = ("attn", "cls")


def _cpu(name: str, **kw: Any) -> ModelPreset:
    return ModelPreset(name=name, **kw)


def _official(name: str, timm_base: str, *, image_size: int, patch_size: int, width: int, depth: int,
              heads: int, embed_dim: int, text_width: int, text_heads: int, text_layers: int,
              context_length: int = 32, mlp_ratio: float = 4.0, class_token: bool = True) -> ModelPreset:
    return ModelPreset(
        name=name, timm_base=timm_base, image_size=image_size, patch_size=patch_size, width=width,
        depth=depth, heads=heads, mlp_ratio=mlp_ratio, embed_dim=embed_dim, text_width=text_width,
        text_heads=text_heads, text_layers=text_layers, context_length=context_length,
        class_token=class_token,
    )


# CPU presets: `nano` written out once (the ModelPreset defaults), others change a few fields.
_NANO = _cpu("nano")
MODEL_PRESETS: dict[str, ModelPreset] = {
    "nano": _NANO,
    "micro": dataclasses.replace(_NANO, name="micro", depth=4),
    "small-cpu": dataclasses.replace(_NANO, name="small-cpu", image_size=128, patch_size=16, width=192,
                                     depth=8, heads=3, embed_dim=256, text_width=256, text_heads=4, text_layers=4),
    # Official PE-Core sizes (research/perception-encoder.md section 1).
    "pe-core-t16": _official("pe-core-t16", "vit_pe_core_tiny_patch16_384", image_size=384, patch_size=16,
                             width=192, depth=12, heads=3, embed_dim=512, text_width=512, text_heads=8,
                             text_layers=12),
    "pe-core-s16": _official("pe-core-s16", "vit_pe_core_small_patch16_384", image_size=384, patch_size=16,
                             width=384, depth=12, heads=6, embed_dim=512, text_width=512, text_heads=8,
                             text_layers=12),
    "pe-core-b16": _official("pe-core-b16", "vit_pe_core_base_patch16_224", image_size=224, patch_size=16,
                             width=768, depth=12, heads=12, embed_dim=1024, text_width=1024, text_heads=16,
                             text_layers=24),
    "pe-core-l14": _official("pe-core-l14", "vit_pe_core_large_patch14_336", image_size=336, patch_size=14,
                             width=1024, depth=24, heads=16, embed_dim=1024, text_width=1024, text_heads=16,
                             text_layers=24),
    "pe-core-g14": _official("pe-core-g14", "vit_pe_core_gigantic_patch14_448", image_size=448,
                             patch_size=14, width=1536, depth=50, heads=16, mlp_ratio=8960 / 1536,
                             embed_dim=1280, text_width=1280, text_heads=20, text_layers=24,
                             context_length=72, class_token=False),
}
MODEL_PRESETS["test"] = dataclasses.replace(MODEL_PRESETS["micro"], name="test", image_size=32, patch_size=8)
MODEL_PRESETS["T"] = MODEL_PRESETS["pe-core-t16"]
MODEL_PRESETS["S"] = MODEL_PRESETS["pe-core-s16"]
MODEL_PRESETS["B"] = MODEL_PRESETS["pe-core-b16"]
MODEL_PRESETS["L"] = MODEL_PRESETS["pe-core-l14"]
MODEL_PRESETS["G"] = MODEL_PRESETS["pe-core-g14"]


def get_model_preset(name: str) -> ModelPreset:
    try:
        return MODEL_PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; known: {sorted(MODEL_PRESETS)}") from None
