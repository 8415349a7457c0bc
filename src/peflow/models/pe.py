"""PE-core CLIP models: presets, construction, layer taps, official checkpoints.

Presets mirror the official PE-Core sizes (T/S/B/L/G: same widths, depths,
heads and patch sizes as `facebook/PE-Core-*`) plus CPU presets (`nano`,
`micro`) for the embedded default. Every preset is built by open_clip's
`CustomTextCLIP` around a timm `vit_pe_core_*` tower, without any download.
At input sizes other than the native one the tower follows the official PE
code, not timm's defaults: RoPE on the integer positions of the actual patch
grid, and the position embedding resampled bilinearly (`PEVisionTower`).
Loading reports every bad file as a one-line ValueError that names it.

Shape legend: B batch, L tokens, D width, E embedding dim.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from timm.models.eva import Eva

from peflow.models.presets import MODEL_PRESETS, ModelPreset, get_model_preset  # noqa: F401  (re-exported)


class PEVisionTower(Eva):
    """timm's `Eva` (the `vit_pe_core_*` tower) with the official PE position-embedding
    resampling at input sizes other than the native one.

    The official code resamples the grid part of the absolute position embedding
    bilinearly (align_corners=False, no antialias) and keeps the class-token entry;
    timm's `Eva._pos_embed` resamples bicubically with antialias and has no option
    to change that, so this subclass overrides that one method and nothing else
    (no parameters or buffers of its own: state dicts are timm's). At the native
    grid, and without `dynamic_img_size`, it is timm's own `_pos_embed`.
    """

    def _pos_embed(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self.dynamic_img_size or self.pos_embed is None or getattr(self, "rope_mixed", False):
            return super()._pos_embed(x)
        B, H, W, C = x.shape  # dynamic_img_size: patch_embed gives NHWC
        if (H, W) == tuple(self.patch_embed.grid_size):
            return super()._pos_embed(x)
        from timm.layers import resample_abs_pos_embed
        from timm.models.eva import apply_keep_indices_nlc

        pos_embed = resample_abs_pos_embed(
            self.pos_embed, new_size=(H, W), old_size=self.patch_embed.grid_size,
            num_prefix_tokens=0 if self.no_embed_class else self.num_prefix_tokens,
            interpolation="bilinear", antialias=False, align_corners=False,
        )
        x = x.reshape(B, H * W, C)
        rot_pos_embed = self.rope.get_embed(shape=(H, W)) if self.rope is not None else None
        prefix = [t.expand(B, -1, -1) for t in (self.cls_token, self.reg_token) if t is not None]
        if self.no_embed_class:
            x = torch.cat([*prefix, x + pos_embed], dim=1)
        else:
            x = torch.cat([*prefix, x], dim=1) + pos_embed
        x = self.pos_drop(x)
        if self.patch_drop is not None:  # as timm: drop patches, and their RoPE rows
            x, keep_indices = self.patch_drop(x)
            if rot_pos_embed is not None and keep_indices is not None:
                rot_pos_embed = apply_keep_indices_nlc(x, rot_pos_embed, keep_indices).unsqueeze(1)
        return x, rot_pos_embed


def build_vision_tower(p: ModelPreset, num_classes: int) -> PEVisionTower:
    """The timm PE vision tower of preset `p` (attention- or CLS-pooled, projecting to `num_classes`).

    Built through timm's model function for `p.timm_base` rather than
    `timm.create_model`, which drops None-valued kwargs (and so would keep
    timm's `ref_feat_shape`); then given the `PEVisionTower` class (same
    module, one overridden method).
    """
    from timm.models import model_entrypoint

    trunk = model_entrypoint(p.timm_base)(
        pretrained=False, num_classes=num_classes, global_pool=p.global_pool, **p.vision_overrides()
    )
    if type(trunk) is not Eva:
        raise TypeError(f"{p.timm_base}: expected a timm Eva model, got {type(trunk).__name__}")
    trunk.__class__ = PEVisionTower
    return trunk


def build_model(preset: str | ModelPreset) -> torch.nn.Module:
    """A PE-core CLIP (`open_clip.CustomTextCLIP`) with a timm PE vision tower.

    Built from the architecture alone: nothing is downloaded.
    """
    import open_clip

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
    model.visual.trunk = build_vision_tower(p, p.embed_dim)
    model.visual.image_size = (p.image_size, p.image_size)
    model.peflow_preset = p.name  # type: ignore[assignment]
    model.peflow_arch = p.arch()  # type: ignore[assignment]  (switches off the preset's: in the model card)
    return model


def get_tokenizer(preset: str | ModelPreset) -> Any:
    """open_clip's CLIP BPE tokenizer at the preset's context length."""
    import open_clip

    p = get_model_preset(preset) if isinstance(preset, str) else preset
    return open_clip.SimpleTokenizer(context_length=p.context_length)


def num_layers(model: torch.nn.Module) -> int:
    return len(model.visual.trunk.blocks)


def block_index(layer: int, depth: int) -> int:
    """Block `layer` (1-based; negative counts from the end) of a `depth`-block tower; ValueError when out of range."""
    n = layer if layer > 0 else depth + 1 + layer
    if not 1 <= n <= depth:
        raise ValueError(f"layer {layer} out of range for a {depth}-block model")
    return n


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


def _brief(e: BaseException, limit: int = 160) -> str:
    """The first line of an exception's message, shortened: for one-line errors."""
    lines = str(e).strip().splitlines()
    text = lines[0].strip() if lines else ""
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _check_fits(model: torch.nn.Module, sd: Mapping[str, Any], path: str | Path, preset: str) -> None:
    """Raise a one-line ValueError unless `sd` has exactly the model's keys, as tensors of its shapes."""
    want = model.state_dict()
    missing, unexpected = sorted(set(want) - set(sd)), sorted(set(sd) - set(want))
    if missing or unexpected:
        raise ValueError(
            f"{path}: does not fit preset {preset}: "
            f"{len(missing)} missing keys {missing[:8]}, {len(unexpected)} unexpected keys {unexpected[:8]}"
        )
    bad = [k for k, v in want.items() if not isinstance(sd[k], torch.Tensor) or sd[k].shape != v.shape]
    if bad:
        k = bad[0]
        got = list(sd[k].shape) if isinstance(sd[k], torch.Tensor) else type(sd[k]).__name__
        raise ValueError(
            f"{path}: shapes do not fit preset {preset}: {len(bad)} tensors differ, "
            f"e.g. {k} is {got} in the file, {list(want[k].shape)} in the model"
        )


def _torch_load(path: Path) -> Any:
    """`torch.load(weights_only=True)`, any failure as a one-line ValueError naming `path`."""
    import pickle
    import warnings
    import zipfile

    if not path.exists():
        raise ValueError(f"{path}: no such file")
    if not path.is_file():
        raise ValueError(f"{path}: not a file (an official checkpoint is one .pt file)")
    try:
        with warnings.catch_warnings():  # garbage bytes read as an odd pickle protocol: say so below instead
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # on garbage, the weights-only unpickler fails with many exception types
        err = e
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise ValueError(f"{path}: cannot be read ({_brief(e)})") from None
    if not head:
        raise ValueError(f"{path}: empty file, not a PyTorch checkpoint")
    if zipfile.is_zipfile(path):  # a complete torch.save archive that did not load
        if isinstance(err, pickle.UnpicklingError) and "Unsupported global" in str(err):
            raise ValueError(f"{path}: holds Python objects other than tensors, which are not loaded "
                             f"(weights_only); save only the state dict")
        if isinstance(err, pickle.UnpicklingError):
            raise ValueError(f"{path}: a PyTorch archive whose contents do not unpickle (corrupt)")
        raise ValueError(f"{path}: not a readable PyTorch checkpoint ({_brief(err)})")
    if head == b"PK\x03\x04":
        raise ValueError(f"{path}: a PyTorch checkpoint cut short or corrupt (incomplete zip archive)")
    raise ValueError(f"{path}: not a PyTorch checkpoint (corrupt, or another format)")


def load_official_checkpoint(model: torch.nn.Module, path: str | Path) -> None:
    """Load a PE-Core `.pt` in the official key layout, strictly.

    Every problem with the file is a one-line ValueError naming it: missing or
    unreadable, not a state dict, missing/unexpected keys (wrong preset, or not
    a PE-Core checkpoint), or tensors of other shapes.
    """
    path = Path(path)
    preset = getattr(model, "peflow_preset", "?")
    sd = _torch_load(path)
    if not isinstance(sd, Mapping):
        raise ValueError(f"{path}: not a state dict (got {type(sd).__name__})")
    try:
        mapped = official_to_open_clip(sd, model)
    except Exception as e:  # timm's filter fails on foreign layouts
        raise ValueError(f"{path}: not a PE-Core checkpoint in the official layout ({_brief(e)})") from None
    _check_fits(model, mapped, path, preset)
    try:
        model.load_state_dict(mapped, strict=True)
    except RuntimeError as e:  # e.g. a dtype torch cannot copy from
        raise ValueError(f"{path}: does not load into preset {preset} ({_brief(e)})") from None


def unshared(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict safetensors can write: contiguous CPU tensors, those sharing memory with an earlier
    one (tied LM embeddings) copied, so each key loads back on its own."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for k, v in state.items():
        t = v.detach().contiguous().cpu()
        where = (t.untyped_storage().data_ptr(), t.storage_offset())
        out[k] = t.clone() if where in seen else t
        seen.add(where)
    return out


# -- alignment regularisers and the official vision-only layouts (PE-Lang, PE-Spatial) ---------------

def add_layer_scale(trunk: torch.nn.Module, *, init: float, drop_path: float = 0.0) -> None:
    """Give every block of a timm PE trunk LayerScale (new gammas at `init`; paper: 0.1 on a core checkpoint
    that has none) and DropPath at rate `drop_path` (constant over depth), in place. Kept gammas are left."""
    from timm.layers import DropPath

    for block in trunk.blocks:
        for i in (1, 2):
            if getattr(block, f"gamma_{i}") is None and init > 0:
                setattr(block, f"gamma_{i}", torch.nn.Parameter(torch.full((trunk.embed_dim,), float(init))))
            setattr(block, f"drop_path{i}", DropPath(drop_path) if drop_path > 0 else torch.nn.Identity())


@torch.no_grad()
def fold_layer_scale(trunk: torch.nn.Module) -> None:
    """Fold each block's LayerScale into the matrix before it (attention out-projection, MLP fc2) and drop
    DropPath, in place: the same function in the plain architecture, so `save_model`/`load_model` and
    the layer taps work on an aligned trunk unchanged."""
    for block in trunk.blocks:
        for i, layer in ((1, block.attn.proj), (2, block.mlp.fc2)):
            gamma = getattr(block, f"gamma_{i}")
            if gamma is not None:
                layer.weight.mul_(gamma[:, None])
                if layer.bias is not None:
                    layer.bias.mul_(gamma)
                setattr(block, f"gamma_{i}", None)
            setattr(block, f"drop_path{i}", torch.nn.Identity())


#: timm PE trunk name -> official PE name (the inverse of timm's `_convert_pe` for the keys it renames)
_TO_OFFICIAL = (("patch_embed.proj", "conv1"), ("blocks.", "transformer.resblocks."), ("norm_pre", "ln_pre"),
                (".norm1", ".ln_1"), (".norm2", ".ln_2"), ("attn.qkv.", "attn.in_proj_"),
                ("attn.proj", "attn.out_proj"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj"),
                ("gamma_1", "ls_1.gamma"), ("gamma_2", "ls_2.gamma"))


def official_vision_state(trunk: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A PE trunk's state in the official vision-only layout of `facebook/PE-Lang-*` and `PE-Spatial-*`:
    no `visual.` prefix, no `ln_post`, attention pool or projection (research/perception-encoder.md 1.6);
    LayerScale as `ls_{1,2}.gamma`. timm's `checkpoint_filter_fn` loads it back into the trunk."""
    out: dict[str, torch.Tensor] = {}
    for key, value in trunk.state_dict().items():
        if key.startswith(("norm.", "attn_pool.", "head.", "fc_norm.")) or "rope" in key:
            continue
        if key == "cls_token":
            out["class_embedding"] = value.reshape(-1)
            continue
        if key == "pos_embed":
            out["positional_embedding"] = value[0]
            continue
        for old, new in _TO_OFFICIAL:
            key = key.replace(old, new)
        out[key] = value
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def save_official_vision(trunk: torch.nn.Module, path: str | Path) -> Path:
    """Write `official_vision_state(trunk)` as a `.pt` state dict (the official checkpoints' format), atomically."""
    import os

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(official_vision_state(trunk), tmp)
    os.replace(tmp, path)
    return path


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
    tensors = unshared(model.state_dict())
    tmp = out / f".{MODEL_FILE}.tmp"
    save_file(tensors, str(tmp))
    os.replace(tmp, out / MODEL_FILE)
    card = {"preset": getattr(model, "peflow_preset", None), "format": "peflow-open_clip", **dict(extra or {})}
    if getattr(model, "peflow_arch", None):
        card["arch"] = model.peflow_arch
    # the input size a PE-core model was trained at last, when not its preset's
    size = getattr(getattr(model, "visual", None), "image_size", None)
    native = MODEL_PRESETS.get(card["preset"]) if isinstance(card["preset"], str) else None
    if native is not None and isinstance(size, tuple) and size[0] != native.image_size:
        card["image_size"] = int(size[0])
    tmp = out / f".{MODEL_CARD}.tmp"
    tmp.write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, out / MODEL_CARD)
    return out / MODEL_FILE


def _read_card(card: Path) -> dict[str, Any]:
    import json

    try:
        data = json.loads(card.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{card}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except UnicodeDecodeError:
        raise ValueError(f"{card}: not a text file (expected the JSON model card)") from None
    except OSError as e:
        raise ValueError(f"{card}: cannot be read ({_brief(e)})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{card}: not a JSON object (got {type(data).__name__})")
    return data


def _read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(file))
    except SafetensorError as e:
        raise ValueError(f"{file}: not a readable safetensors file, truncated or corrupt ({_brief(e)})") from None
    except OSError as e:
        raise ValueError(f"{file}: cannot be read ({_brief(e)})") from None


def resolve_checkpoint(path: str | Path) -> Path:
    """The model file or folder inside `path`: an official .pt as is; a folder
    holding model.safetensors; or a stage output with exactly one such folder below it."""
    from peflow.config import InputError

    path = Path(path)
    if path.is_file() or (path / MODEL_FILE).is_file():
        return path
    found = sorted(p.parent for p in path.rglob(MODEL_FILE))
    if len(found) == 1:
        return found[0]
    if not found:
        raise InputError(f"checkpoint {path}: no {MODEL_FILE} in this folder or below it, and not a .pt file")
    raise InputError(f"{path}: several checkpoints below it ({[str(p) for p in found]}); name one")


def load_model(path: str | Path, *, preset: str | None = None) -> torch.nn.Module:
    """Load a model, in eval mode, from a peflow checkpoint folder (or its
    `model.safetensors`), or from an official PE-Core `.pt` (then `preset`
    names the architecture).

    A file that is missing, unreadable, cut short, or does not fit the preset
    raises a one-line ValueError that names it.
    """
    path = Path(path)
    if path.suffix in (".pt", ".pth", ".bin"):
        if preset is None:
            raise ValueError(f"{path}: an official checkpoint needs --preset (e.g. pe-core-b16)")
        model = build_model(preset)
        load_official_checkpoint(model, path)
        return model.eval()
    if not path.exists():
        raise ValueError(f"{path}: no such file or folder")
    folder = path if path.is_dir() else path.parent
    weights = path if path.is_file() and path.suffix == ".safetensors" else folder / MODEL_FILE
    if not weights.is_file():
        raise ValueError(f"{path}: no {MODEL_FILE} here (expected a peflow checkpoint folder)")
    card_path = folder / MODEL_CARD
    card = _read_card(card_path) if card_path.is_file() else {}
    name = preset or card.get("preset")
    if name is None:
        raise ValueError(f"{folder}: {MODEL_CARD} names no preset; pass --preset")
    if not isinstance(name, str) or name not in MODEL_PRESETS:
        raise ValueError(f"{card_path if preset is None else folder}: unknown model preset {name!r}; "
                         f"known: {sorted(MODEL_PRESETS)}")
    try:
        p = get_model_preset(name).with_arch(**card.get("arch", {}))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{card_path}: bad arch ({e})") from None
    sd = _read_safetensors(weights)
    model = build_model(p)
    _check_fits(model, sd, weights, name)
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{weights}: does not load into preset {name} ({_brief(e)})") from None
    if isinstance(card.get("image_size"), int):
        model.visual.image_size = (card["image_size"], card["image_size"])
    return model.eval()
