"""The captioner's and PE lang's model: PE encoder layer -> projector -> causal LM.

PLM's architecture (paper section 2.2 and 4), as `transformers`'
`PerceptionLMForConditionalGeneration` builds it, on peflow's own PE-core tower:

- the vision tower is the PE-core model's timm trunk cut after block `layer`
  (`prune_intermediate_layers`: the later blocks, the final norm and the
  attention-pool head dropped), read at its patch tokens (the class token
  stripped);
- the projector is transformers' `PerceptionLMMultiModalProjector`
  (Linear-GELU-Linear, then 2x2 average pooling of the token grid);
- frames go in in order, each frame's tokens plus a learned frame-index
  embedding, so the LM can tell which came first (a direction of motion);
- the LM is any transformers causal LM (`peflow.models.lm`): the visual
  tokens are its first input embeddings, the text follows.

`PerceptionLMForConditionalGeneration` itself is not used because its vision
tower is a `TimmWrapperModel` built by timm model name and read at its last
layer; peflow's tower carries the official position-embedding resampling
(`PEVisionTower`) and is cut at an intermediate layer.

Saved as a folder: `vlm.json` (architecture), `vlm.safetensors` (tower,
projector, frame embedding) and `lm/` (the LM and its tokenizer,
`save_pretrained`). Shape legend: B batch, F frames, C channels, S side,
N patch tokens, D tower width, T visual tokens per frame, H LM width, L text.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

VLM_CARD, VLM_FILE, LM_DIR = "vlm.json", "vlm.safetensors", "lm"
#: PE lang's last-layer comparison model, inside an align-lang output (read by evaluate).
LAST_LAYER_DIR = "last"
IGNORE = -100  #: label of positions that carry no loss (visual tokens, prompt, padding)


def frames_tensor(frames: Any, size: int) -> torch.Tensor:
    """uint8 frames [..., H, W, 3] (numpy or torch) -> normalised float [..., 3, size, size] (PE's
    preprocessing: bilinear squash-resize, mean 0.5, std 0.5)."""
    x = torch.as_tensor(frames)
    lead = x.shape[:-3]
    x = x.reshape(-1, *x.shape[-3:]).permute(0, 3, 1, 2).float().div_(255.0)
    if x.shape[-1] != size or x.shape[-2] != size:
        x = nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x.sub_(0.5).div_(0.5).reshape(*lead, 3, size, size)


def _projector(width: int, hidden: int, pooling: int) -> nn.Module:
    from transformers import PerceptionLMConfig, TimmWrapperConfig
    from transformers.models.perception_lm.modeling_perception_lm import PerceptionLMMultiModalProjector

    config = PerceptionLMConfig(vision_config=TimmWrapperConfig(model_args={"embed_dim": width}),
                                text_config={"model_type": "llama", "hidden_size": hidden},
                                projector_pooling_ratio=pooling)
    return PerceptionLMMultiModalProjector(config)


def cut_tower(pe_model: nn.Module, layer: int) -> nn.Module:
    """A copy of a PE-core CLIP model's timm trunk with blocks 1..`layer` only (no final norm, no head)."""
    trunk = copy.deepcopy(pe_model.visual.trunk)
    depth = len(trunk.blocks)
    if not 1 <= layer <= depth:
        raise ValueError(f"layer {layer} out of range 1..{depth}")
    trunk.prune_intermediate_layers([layer - 1], prune_norm=True, prune_head=True)
    return trunk


class VisionLanguageModel(nn.Module):
    """PE tower (cut at `layer`) -> projector -> causal LM; see the module docstring."""

    def __init__(self, tower: nn.Module, lm: nn.Module, tokenizer: Any, *, layer: int, pooling: int = 2,
                 max_frames: int = 16, image_size: int, meta: dict[str, Any] | None = None) -> None:
        super().__init__()
        hidden = lm.config.hidden_size
        self.tower, self.lm, self.tokenizer = tower, lm, tokenizer
        self.projector = _projector(tower.embed_dim, hidden, pooling)
        self.frame_embed = nn.Parameter(torch.zeros(max_frames, hidden))
        self.layer, self.pooling, self.max_frames, self.image_size = layer, pooling, max_frames, image_size
        self.meta = dict(meta or {})

    # -- vision -------------------------------------------------------------------------------
    def vision_tokens(self, frames_BFCSS: torch.Tensor) -> torch.Tensor:
        """Patch tokens after block `layer` of every frame: [B, F, N, D] (no class token)."""
        B, F = frames_BFCSS.shape[:2]
        (tokens,) = self.tower.forward_intermediates(
            frames_BFCSS.flatten(0, 1), indices=[self.layer - 1], norm=False, output_fmt="NLC",
            intermediates_only=True, stop_early=True)
        return tokens.reshape(B, F, *tokens.shape[1:])

    def project(self, tokens_BFND: torch.Tensor) -> torch.Tensor:
        """Visual LM inputs [B, F*T, H]: projected, pooled, plus the frame-index embedding."""
        B, F = tokens_BFND.shape[:2]
        if F > self.max_frames:
            raise ValueError(f"{F} frames; this model takes at most {self.max_frames}")
        x = self.projector(tokens_BFND.flatten(0, 1).to(self.frame_embed.dtype))
        x = x.reshape(B, F, -1, x.shape[-1]) + self.frame_embed[:F, None, :]
        return x.flatten(1, 2)

    def visual(self, *, frames: torch.Tensor | None = None, tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Visual LM inputs from frames [B, F, 3, S, S] or from precomputed `vision_tokens`."""
        if tokens is None:
            if frames is None:
                raise ValueError("give frames or tokens")
            tokens = self.vision_tokens(frames)
        return self.project(tokens)

    # -- language -----------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None = None,
                *, frames: torch.Tensor | None = None, tokens: torch.Tensor | None = None,
                frame_mask: torch.Tensor | None = None) -> Any:
        """The LM's output over [visual tokens, text]; `labels` [B, L] (IGNORE where no loss) give `.loss`.
        `frame_mask` [B, F] (1 = real frame) hides padded frames from attention."""
        vis = self.visual(frames=frames, tokens=tokens)
        B, V = vis.shape[:2]
        text = self.lm.get_input_embeddings()(input_ids)
        vis_mask = torch.ones(B, V, dtype=attention_mask.dtype, device=attention_mask.device)
        if frame_mask is not None:
            vis_mask = frame_mask.to(attention_mask.dtype).repeat_interleave(V // frame_mask.shape[1], dim=1)
        inputs = torch.cat([vis.to(text.dtype), text], 1)
        mask = torch.cat([vis_mask, attention_mask], 1)
        if labels is None:
            return self.lm(inputs_embeds=inputs, attention_mask=mask)
        # logits only where a label is predicted (the text), not over the visual tokens: the LM head
        # is the largest matrix multiply of a small LM
        out = self.lm(inputs_embeds=inputs, attention_mask=mask, **self._keep(labels.shape[1] + 1))
        logits = out.logits[:, -(labels.shape[1] + 1):-1]  # position t predicts text token t
        out.loss = nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE)
        return out

    def _keep(self, n: int) -> dict[str, int]:
        import inspect

        if "logits_to_keep" in inspect.signature(self.lm.forward).parameters:
            return {"logits_to_keep": n}
        return {}

    @torch.no_grad()
    def generate(self, *, frames: torch.Tensor | None = None, tokens: torch.Tensor | None = None,
                 prompts: Sequence[str] | None = None, max_new_tokens: int = 64) -> list[str]:
        """Greedy text for each clip (all clips of one call have the same frame count), after an
        optional prompt per clip (left-padded, so every sequence ends where generation starts)."""
        vis = self.visual(frames=frames, tokens=tokens)
        B = vis.shape[0]
        tok = self.tokenizer
        ids = [[tok.bos_token_id] + (tok.encode(p, add_special_tokens=False) if prompts else []) for p in
               (prompts or [""] * B)]
        width = max(len(i) for i in ids)
        pad = tok.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(i)) + i for i in ids], device=vis.device)
        text_mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids], device=vis.device)
        emb = self.lm.get_input_embeddings()(input_ids)
        # padding goes first: [pad..., visual, BOS, prompt]
        pads = (text_mask == 0).sum(1).tolist()
        seq = torch.stack([torch.cat([emb[b, :p], vis[b].to(emb.dtype), emb[b, p:]]) for b, p in enumerate(pads)])
        ones = torch.ones(B, vis.shape[1], dtype=torch.long, device=vis.device)
        mask = torch.stack([torch.cat([text_mask[b, :p], ones[b], text_mask[b, p:]]) for b, p in enumerate(pads)])
        out = self.lm.generate(inputs_embeds=seq, attention_mask=mask,
                               max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
                               eos_token_id=tok.eos_token_id)
        return [t.strip() for t in tok.batch_decode(out, skip_special_tokens=True)]

    # -- saving -------------------------------------------------------------------------------
    def own_state(self) -> dict[str, torch.Tensor]:
        """Tower, projector and frame embedding (the LM is saved by `save_pretrained`)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("lm.")}

    def save(self, out_dir: str | Path, *, extra: dict[str, Any] | None = None) -> Path:
        """Write the model folder (see the module docstring); files are renamed into place."""
        from safetensors.torch import save_file

        from peflow.models.lm import quiet
        from peflow.models.pe import unshared

        quiet()
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.lm.save_pretrained(out / LM_DIR)
        self.tokenizer.save_pretrained(out / LM_DIR)
        tmp = out / f".{VLM_FILE}.tmp"
        save_file(unshared(self.own_state()), str(tmp))
        os.replace(tmp, out / VLM_FILE)
        card = {"format": "peflow-vlm", "layer": self.layer, "pooling": self.pooling, "max_frames": self.max_frames,
                "image_size": self.image_size, **self.meta, **(extra or {})}
        tmp = out / f".{VLM_CARD}.tmp"
        tmp.write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, out / VLM_CARD)
        return out


def build_vlm(pe_model: nn.Module, lm: nn.Module, tokenizer: Any, *, layer: int, pooling: int = 2,
              max_frames: int = 16) -> VisionLanguageModel:
    """A vision-language model on a PE-core CLIP model's tower cut at `layer` (negative: from the end)."""
    from peflow.models.pe import block_index

    depth = len(pe_model.visual.trunk.blocks)
    layer = block_index(layer, depth)
    grid = pe_model.visual.trunk.patch_embed.grid_size
    if grid[0] != grid[1] or grid[0] % pooling:
        raise ValueError(f"token grid {tuple(grid)} is not square or not divisible by pooling {pooling}")
    return VisionLanguageModel(cut_tower(pe_model, layer), lm, tokenizer, layer=layer, pooling=pooling,
                               max_frames=max_frames, image_size=int(pe_model.visual.image_size[0]),
                               meta={"pe_preset": getattr(pe_model, "peflow_preset", None), "depth": depth})


def load_vlm(path: str | Path) -> VisionLanguageModel:
    """A saved vision-language model folder, in eval mode; problems are one-line ValueErrors naming it."""
    from safetensors.torch import load_file

    from peflow.models.lm import load_lm
    from peflow.models.pe import build_model

    path = Path(path)
    card_path = path / VLM_CARD
    if not card_path.is_file():
        raise ValueError(f"{path}: no {VLM_CARD} (not a peflow captioner or PE-lang folder)")
    card = json.loads(card_path.read_text())
    lm, tokenizer = load_lm(path / LM_DIR)
    model = build_vlm(build_model(card["pe_preset"]), lm, tokenizer, layer=card["layer"], pooling=card["pooling"],
                      max_frames=card["max_frames"])
    try:
        missing, unexpected = model.load_state_dict(load_file(str(path / VLM_FILE)), strict=False)
    except Exception as e:  # noqa: BLE001  (a truncated or foreign file: say which)
        raise ValueError(f"{path / VLM_FILE}: does not load ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    own_missing = [k for k in missing if not k.startswith("lm.")]
    if own_missing or unexpected:
        raise ValueError(f"{path / VLM_FILE}: does not fit {VLM_CARD}: missing {own_missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    model.meta = {k: v for k, v in card.items() if k not in ("format", "layer", "pooling", "max_frames",
                                                              "image_size")}
    return model.eval()
