"""PE-core models built from open_clip (CLIP wrapper, text tower, tokenizer)
and timm (the PE vision tower `vit_pe_core_*`: 2D RoPE, attention pooling,
`forward_intermediates` for layer taps), with `PEVisionTower` resampling the
position embedding at non-native sizes as the official PE code does.

The names below load `peflow.models.pe` (torch, timm, open_clip) on first use;
`peflow.models.presets` is plain data.
"""

from __future__ import annotations

import importlib
from typing import Any

_FROM_PE = ("MODEL_PRESETS", "ModelPreset", "PEVisionTower", "build_model", "encode_layers", "get_model_preset",
            "get_tokenizer", "load_model", "load_official_checkpoint", "num_layers", "save_model")
__all__ = list(_FROM_PE)


def __getattr__(name: str) -> Any:
    if name in _FROM_PE:
        return getattr(importlib.import_module("peflow.models.pe"), name)
    raise AttributeError(f"module 'peflow.models' has no attribute {name!r}")
