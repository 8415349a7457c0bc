"""PE-core CLIP models: presets, construction, layer taps, official checkpoints.

Presets mirror the official PE-Core sizes (T/S/B/L/G: same widths, depths,
heads and patch sizes as `facebook/PE-Core-*`) plus CPU presets (`nano`,
`micro`) for the embedded default. Every preset is built by open_clip's
`CustomTextCLIP` around a timm `vit_pe_core_*` tower, without any download.

Shape legend: B batch, L tokens, D width, E embedding dim.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch


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

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    def vision_overrides(self) -> dict[str, Any]:
        """kwargs for `timm.create_model(timm_base, **kw)`."""
        kw: dict[str, Any] = dict(
            img_size=self.image_size,
            patch_size=self.patch_size,
            embed_dim=self.width,
            depth=self.depth,
            num_heads=self.heads,
            mlp_ratio=self.mlp_ratio,
            ref_feat_shape=(self.grid, self.grid),
            # Progressive resolution: the position embedding stays on the base
            # grid and is resampled on the fly at other input sizes.
            dynamic_img_size=True,
        )
        if not self.class_token:
            kw.update(class_token=False, rope_grid_offset=0.0)
        return kw


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


def build_model(preset: str | ModelPreset) -> torch.nn.Module:
    """A PE-core CLIP (`open_clip.CustomTextCLIP`) with a timm PE vision tower.

    Built from the architecture alone: nothing is downloaded.
    """
    import open_clip
    import timm

    p = get_model_preset(preset) if isinstance(preset, str) else preset
    model = open_clip.CustomTextCLIP(
        embed_dim=p.embed_dim,
        vision_cfg=dict(image_size=p.image_size, timm_model_name=p.timm_base, timm_model_pretrained=False,
                        timm_pool="map", timm_proj=None),
        text_cfg=dict(context_length=p.context_length, vocab_size=p.vocab_size, width=p.text_width,
                      heads=p.text_heads, layers=p.text_layers),
    )
    # open_clip builds the timm tower at the base model's size; rebuild it at
    # the preset's (same class, same head: the pooled output projects to E).
    model.visual.trunk = timm.create_model(
        p.timm_base, pretrained=False, num_classes=p.embed_dim, global_pool="map", **p.vision_overrides()
    )
    model.visual.image_size = (p.image_size, p.image_size)
    model.peflow_preset = p.name  # type: ignore[assignment]
    return model


def get_tokenizer(preset: str | ModelPreset) -> Any:
    """open_clip's CLIP BPE tokenizer at the preset's context length."""
    import open_clip

    p = get_model_preset(preset) if isinstance(preset, str) else preset
    return open_clip.SimpleTokenizer(context_length=p.context_length)


def num_layers(model: torch.nn.Module) -> int:
    return len(model.visual.trunk.blocks)


def encode_layers(
    model: torch.nn.Module, images_BCHW: torch.Tensor, layers: Sequence[int], *, norm: bool = False
) -> dict[int, torch.Tensor]:
    """Layer taps: the tokens (prefix + patches, [B, L, D]) after each block in `layers`.

    Layers count from 1 (block 1 is the first transformer block); negative
    values count from the end (-1 = last block).
    """
    trunk = model.visual.trunk
    n = len(trunk.blocks)
    want = sorted({(i if i > 0 else n + 1 + i) for i in layers})
    for i in want:
        if not 1 <= i <= n:
            raise ValueError(f"layer {i} out of range 1..{n}")
    feats = trunk.forward_intermediates(
        images_BCHW, indices=[i - 1 for i in want], return_prefix_tokens=True, norm=norm,
        output_fmt="NLC", stop_early=True, intermediates_only=True,
    )
    out = {}
    for i, f in zip(want, feats):
        if isinstance(f, tuple):  # (spatial, prefix)
            spatial, prefix = f
            f = torch.cat([prefix, spatial], dim=1)
        out[i] = f
    return out


def _unwrap(sd: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    for key in ("state_dict", "weights", "model", "module"):
        if key in sd and isinstance(sd[key], Mapping):
            sd = sd[key]
    return {k.removeprefix("module."): v for k, v in sd.items()}


def official_to_open_clip(sd: Mapping[str, Any], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Map a PE-Core state dict in the official layout to this model's keys.

    Vision keys (`visual.*`) go through timm's PE checkpoint filter; text keys
    (at the root in the official CLIP class) get the `text.` prefix.
    """
    from timm.models.eva import checkpoint_filter_fn

    sd = _unwrap(sd)
    vision = {k: v for k, v in sd.items() if k.startswith("visual.")}
    text = {k: v for k, v in sd.items() if not k.startswith("visual.") and k != "logit_scale"}
    out = {f"visual.trunk.{k}": v for k, v in checkpoint_filter_fn(vision, model.visual.trunk).items()}
    out.update({f"text.{k}": v for k, v in text.items()})
    if "logit_scale" in sd:
        out["logit_scale"] = sd["logit_scale"]
    return out


def load_official_checkpoint(model: torch.nn.Module, path: str | Path) -> None:
    """Load a PE-Core `.pt` in the official key layout, strictly.

    Raises ValueError naming the missing and unexpected keys when the file does
    not fit the model (wrong preset, or not a PE-Core checkpoint).
    """
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(sd, Mapping):
        raise ValueError(f"{path}: not a state dict (got {type(sd).__name__})")
    try:
        mapped = official_to_open_clip(sd, model)
    except Exception as e:  # timm's filter fails on foreign layouts
        raise ValueError(f"{path}: not a PE-Core checkpoint in the official layout ({e})") from e
    want = set(model.state_dict())
    missing, unexpected = sorted(want - set(mapped)), sorted(set(mapped) - want)
    if missing or unexpected:
        raise ValueError(
            f"{path}: does not fit preset {getattr(model, 'peflow_preset', '?')}: "
            f"{len(missing)} missing keys {missing[:8]}, {len(unexpected)} unexpected keys {unexpected[:8]}"
        )
    try:
        model.load_state_dict(mapped, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{path}: shapes do not fit preset {getattr(model, 'peflow_preset', '?')}: {e}") from e


MODEL_FILE = "model.safetensors"
MODEL_CARD = "model.json"


def save_model(model: torch.nn.Module, out_dir: str | Path, *, extra: Mapping[str, Any] | None = None) -> Path:
    """Write `model.safetensors` + `model.json` (preset and metadata) into `out_dir`.

    Both files are written under temporary names and renamed into place.
    """
    import json
    import os

    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tmp = out / f".{MODEL_FILE}.tmp"
    save_file(tensors, str(tmp))
    os.replace(tmp, out / MODEL_FILE)
    card = {"preset": getattr(model, "peflow_preset", None), "format": "peflow-open_clip", **dict(extra or {})}
    tmp = out / f".{MODEL_CARD}.tmp"
    tmp.write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, out / MODEL_CARD)
    return out / MODEL_FILE


def load_model(path: str | Path, *, preset: str | None = None) -> torch.nn.Module:
    """Load a model from a peflow checkpoint folder (or its `model.safetensors`),
    or from an official PE-Core `.pt` (then `preset` names the architecture)."""
    import json

    from safetensors.torch import load_file

    path = Path(path)
    if path.suffix in (".pt", ".pth", ".bin"):
        if preset is None:
            raise ValueError(f"{path}: an official checkpoint needs --preset (e.g. pe-core-b16)")
        model = build_model(preset)
        load_official_checkpoint(model, path)
        return model
    folder = path if path.is_dir() else path.parent
    if not (folder / MODEL_FILE).is_file():
        raise ValueError(f"{path}: no {MODEL_FILE} here (expected a peflow checkpoint folder)")
    card = json.loads((folder / MODEL_CARD).read_text()) if (folder / MODEL_CARD).is_file() else {}
    name = preset or card.get("preset")
    if name is None:
        raise ValueError(f"{folder}: {MODEL_CARD} names no preset; pass --preset")
    model = build_model(name)
    missing, unexpected = model.load_state_dict(load_file(str(folder / MODEL_FILE)), strict=False)
    if missing or unexpected:
        raise ValueError(f"{folder}: does not fit preset {name}: missing {missing[:8]}, unexpected {unexpected[:8]}")
    return model
