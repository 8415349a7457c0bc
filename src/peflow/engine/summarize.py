"""The engine's last step: one caption per video from its clip caption, frame captions and
metadata (paper section 2.2, step 3).

Two backends behind one interface, `Summarizer.summarize(inputs) -> captions`:

- `rules` (the CPU default, deterministic): the clip caption is the storyline (a frame
  caption when the clip caption is empty, the cleaned metadata when every caption is); the
  metadata are cleaned of web noise (hashtags, links, calls to subscribe, hype words) and
  give only words that a frame caption confirms and the storyline lacks (entity names, as
  the paper's prompt says: context, not the primary source); the result is cut at `max_words`.
- `llm`: any Hugging Face causal LM with a chat template (hub id or local folder), prompted
  as the paper prompts Llama 3.3 70B (App. A.1), greedy, batched.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

BACKENDS = ("rules", "llm")

#: The paper's summarization prompt (App. A.1 / A.2.4), its steps and what to avoid.
PROMPT = (
    "Create a concise caption of a video using the provided metadata, video caption, and frame captions.\n"
    "TASK: Extract key information from the captions and combine it into an alt text format using single phrase "
    "or set of phrases.\n"
    "1. Use the title and description for context and entity names, but not as the primary source.\n"
    "2. Blend the title and description with the video and frame captions for the main storyline.\n"
    "3. Extract the most relevant and concise information.\n"
    "4. Combine it into short phrases of about {words} words.\n"
    "5. Prioritize key information over grammar.\n"
    "6. Minimize special characters.\n"
    "Avoid adding or inferring information not present in the inputs, and complex sentence structure.\n\n"
    "Title: {title}\nDescription: {description}\nVideo caption: {clip}\nFrame captions:\n{frames}\n\nCaption:"
)

_SPAM = re.compile(r"subscribe|follow|link|rights reserved|copyright|thanks for watching|notification|comment|"
                   r"music by|made this|bio\b|http|www\.", re.I)
_STOP = frozenset("a an the and or of in on at to is are this that it its with for from as by be was video clip "
                  "here today watch watching my i you your we our so just new part episode".split())


@dataclass(frozen=True)
class EngineInput:
    """What the summarizer fuses for one video."""

    clip_caption: str
    frame_captions: tuple[str, ...]
    title: str = ""
    description: str = ""


def clean_metadata(text: str) -> str:
    """Web text without hashtags, links, spam sentences, shouted hype and repeated punctuation."""
    sentences = [s for s in re.split(r"(?<=[.!?])\s+", text or "") if s and not _SPAM.search(s)]
    out = " ".join(sentences)
    out = re.sub(r"#\w+", " ", out)
    out = re.sub(r"\b[A-Z0-9]{2,}\b", lambda m: m.group(0).lower() if len(m.group(0)) > 3 else " ", out)
    out = re.sub(r"[!?|]+|\.{2,}", " ", out)
    return " ".join(out.split())


def _content_words(text: str) -> list[str]:
    return [w for w in re.findall(r"[a-z]+", text.lower()) if w not in _STOP and len(w) > 2]


class Summarizer:
    """One caption per `EngineInput`."""

    name = "summarizer"

    def summarize(self, inputs: Sequence[EngineInput]) -> list[str]:
        raise NotImplementedError


class RulesSummarizer(Summarizer):
    """Deterministic fusion; see the module docstring."""

    name = "rules"

    def __init__(self, max_words: int = 80) -> None:
        self.max_words = max_words

    def summarize(self, inputs: Sequence[EngineInput]) -> list[str]:
        return [self._one(x) for x in inputs]

    def _one(self, x: EngineInput) -> str:
        meta = clean_metadata(". ".join(t.strip() for t in (x.title, x.description) if t.strip()))
        # the storyline: the clip caption; without one, a frame caption; without any, the cleaned metadata
        story = next((" ".join(c.split()) for c in (x.clip_caption, *x.frame_captions) if c.strip()), meta)
        have = set(_content_words(story))
        seen_in_frames = {w for c in x.frame_captions for w in _content_words(c)}
        extra = [w for w in dict.fromkeys(_content_words(meta)) if w in seen_in_frames and w not in have]
        text = story if not extra else f"{story.rstrip('.')}. Also seen: {', '.join(extra)}."
        words = text.split()
        return " ".join(words[: self.max_words]) if words else ""


class LLMSummarizer(Summarizer):
    """A Hugging Face causal LM with a chat template (`peflow.models.lm.load_lm`), greedy."""

    name = "llm"

    def __init__(self, source: str, *, max_new_tokens: int = 96, words: int = 120, batch_size: int = 8,
                 model: Any = None, tokenizer: Any = None) -> None:
        from peflow.models.lm import load_lm

        if model is None:
            model, tokenizer = load_lm(source)
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError(f"summarizer model {source}: its tokenizer has no chat template")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_new_tokens, self.words, self.batch_size = max_new_tokens, words, batch_size

    def prompt(self, x: EngineInput) -> str:
        """The chat-formatted prompt for one video."""
        frames = "\n".join(f"- {c}" for c in x.frame_captions)
        user = PROMPT.format(words=self.words, title=x.title, description=x.description, clip=x.clip_caption,
                             frames=frames)
        return self.tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                                  add_generation_prompt=True)

    def summarize(self, inputs: Sequence[EngineInput]) -> list[str]:
        import torch

        tok, out = self.tokenizer, []
        tok.padding_side = "left"
        for i in range(0, len(inputs), self.batch_size):
            prompts = [self.prompt(x) for x in inputs[i:i + self.batch_size]]
            enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.no_grad():
                gen = self.model.generate(**enc, max_new_tokens=self.max_new_tokens, do_sample=False,
                                          pad_token_id=tok.pad_token_id)
            new = gen[:, enc["input_ids"].shape[1]:]
            out += [" ".join(t.split()) for t in tok.batch_decode(new, skip_special_tokens=True)]
        return out


def get_summarizer(backend: str, *, model: str = "", max_words: int = 80) -> Summarizer:
    """The summarizer of a config: `rules`, or `llm` over `model` (hub id or local folder)."""
    if backend == "rules":
        return RulesSummarizer(max_words=max_words)
    if backend == "llm":
        if not model:
            raise ValueError("summarizer 'llm' needs summarizer_model (a hub id or a local folder)")
        return LLMSummarizer(model)
    raise ValueError(f"summarizer must be one of {BACKENDS}, got {backend!r}")
