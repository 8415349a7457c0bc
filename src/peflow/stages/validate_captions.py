"""Validate the video data engine's captions: the `captions` Great Expectations suite on the
caption stage's output (paper section 2.2's engine output, checked before finetuning reads it).

The same stage as `peflow validate` with the `captions` suite (docs/validation.md): every
generated caption must be present, valid UTF-8, within the character and word bounds, free
of generation loops (a phrase repeated back to back), not an echo of the summarizer's prompt
and not a copy of the title. Failing videos are quarantined with their reasons
(quarantine.jsonl); the rest are copied, bytes unchanged, into OUT in the same layout.
"""

from __future__ import annotations

from dataclasses import dataclass

from peflow.config import opt
from peflow.stages import validate
from peflow.stages.validate import run  # noqa: F401  (the stage's run: validate's, with this Config)


@dataclass(kw_only=True)
class Config(validate.Config):
    """Options of `peflow validate-captions`."""

    data: str = opt("", "The caption stage's output (video shards with model_caption).")
    out: str = opt("", "Output folder: the videos whose captions passed, report.json, quarantine.jsonl, "
                        "data_docs/.")
    suites: str = opt("captions", "Comma-separated suites (default: captions; add video to re-check the media).")
