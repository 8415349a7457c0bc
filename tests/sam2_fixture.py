"""A tiny, randomly initialised SAM 2 checkpoint folder (Sam2Model + Sam2Processor), built offline."""

from __future__ import annotations

from pathlib import Path


def tiny_sam2(folder: str | Path, image_size: int = 64, seed: int = 0) -> Path:
    """Write a ~120k-parameter random `Sam2Model` and a matching `Sam2Processor` (input `image_size` px, low-res
    masks `image_size / 4`) into `folder`, loadable with `from_pretrained(folder)`; returns the folder. No hub
    download: the processor is built from `Sam2ImageProcessor` directly. `image_size` must be a multiple of 16."""
    import torch
    from transformers import Sam2Config, Sam2ImageProcessor, Sam2Model, Sam2Processor

    if image_size % 16:
        raise ValueError(f"image_size must be a multiple of 16, got {image_size}")
    s = image_size
    backbone = {"model_type": "sam2_hiera_det_model", "hidden_size": 8, "num_attention_heads": 1,
                "image_size": [s, s], "blocks_per_stage": [1, 1, 2, 1], "embed_dim_per_stage": [8, 16, 32, 64],
                "num_attention_heads_per_stage": [1, 1, 2, 2], "window_size_per_stage": [4, 4, 4, 2],
                # a global block must not open a stage (transformers' Hiera divides by its window there)
                "global_attention_blocks": [3], "window_positional_embedding_background_size": [2, 2]}
    vision = {"model_type": "sam2_vision_model", "backbone_config": backbone, "backbone_channel_list": [64, 32, 16, 8],
              "backbone_feature_sizes": [[s // 4, s // 4], [s // 8, s // 8], [s // 16, s // 16]],
              "fpn_hidden_size": 32}
    config = Sam2Config(vision_config=vision,
                        prompt_encoder_config={"hidden_size": 32, "image_size": s, "patch_size": 16,
                                               "mask_input_channels": 4},
                        mask_decoder_config={"hidden_size": 32, "mlp_dim": 64, "num_attention_heads": 2,
                                             "iou_head_hidden_dim": 32})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Sam2Model(config)
    folder = Path(folder)
    model.save_pretrained(folder)
    image_processor = Sam2ImageProcessor(size={"height": s, "width": s}, mask_size={"height": s // 4, "width": s // 4})
    Sam2Processor(image_processor=image_processor).save_pretrained(folder)
    return folder
