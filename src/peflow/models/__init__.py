"""PE-core models built from open_clip (CLIP wrapper, text tower, tokenizer)
and timm (the PE vision tower `vit_pe_core_*`: 2D RoPE, attention pooling,
`forward_intermediates` for layer taps), with `PEVisionTower` resampling the
position embedding at non-native sizes as the official PE code does."""

from peflow.models.pe import (  # noqa: F401
    MODEL_PRESETS,
    ModelPreset,
    PEVisionTower,
    build_model,
    encode_layers,
    get_model_preset,
    get_tokenizer,
    load_model,
    load_official_checkpoint,
    num_layers,
    save_model,
)
