"""Language models for the captioner and PE lang: an offline tokenizer and a causal LM.

`lm="tiny"` (the CPU preset) is a small Llama-architecture model built from a
config, with a byte-level BPE tokenizer trained in memory on the corpus text by
`tokenizers`; any other value is a Hugging Face causal LM by hub id or local
folder, loaded with its own tokenizer (the real loading path: `from_pretrained`).
Both save with `save_pretrained`, so a checkpoint folder holds everything needed
to load it again offline.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TINY = "tiny"


def quiet() -> None:
    """No transformers progress bars (loading and writing weights) in stage logs."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
PAD, BOS, EOS = "<pad>", "<s>", "</s>"


@dataclass(frozen=True, kw_only=True)
class TinyLM:
    """Dimensions of the `tiny` causal LM (a Llama built from a config)."""

    hidden: int = 128
    layers: int = 2
    heads: int = 4
    intermediate: int = 384
    vocab_size: int = 1024  #: BPE vocabulary trained on the corpus text
    max_positions: int = 512


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Any:
    """A byte-level BPE trained on `texts`, wrapped as a `PreTrainedTokenizerFast` with
    <pad>, <s> and </s> (ids 0, 1, 2); deterministic for the same texts."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, BOS, EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOS)


def build_tiny_lm(tokenizer: Any, dims: TinyLM = TinyLM()) -> Any:
    """A randomly initialised Llama causal LM sized by `dims`, over `tokenizer`'s vocabulary."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=dims.hidden, intermediate_size=dims.intermediate,
                         num_hidden_layers=dims.layers, num_attention_heads=dims.heads,
                         num_key_value_heads=dims.heads, max_position_embeddings=dims.max_positions,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    return LlamaForCausalLM(config)


def load_lm(source: str | Path) -> tuple[Any, Any]:
    """(causal LM, tokenizer) from a hub id or a local folder (`save_pretrained` layout); a
    tokenizer without a pad token gets its EOS as pad. Raises ValueError naming the source."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(source))
        model = AutoModelForCausalLM.from_pretrained(str(source))
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"language model {source}: cannot load it ({first})") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.bos_token is None:
        tokenizer.bos_token = tokenizer.eos_token
    return model, tokenizer


def new_lm(source: str, texts: Iterable[str] | None = None, dims: TinyLM = TinyLM()) -> tuple[Any, Any]:
    """(causal LM, tokenizer) for a config's `lm`: `tiny` builds both (the tokenizer trained on
    `texts`); anything else is loaded by `load_lm`."""
    if source != TINY:
        return load_lm(source)
    if texts is None:
        raise ValueError("lm 'tiny' needs texts to train its tokenizer on")
    tokenizer = train_tokenizer(texts, dims.vocab_size)
    return build_tiny_lm(tokenizer, dims), tokenizer
