"""Shared fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The built-in corpus at preset `test` (32 px; 120 train / 24 val / 24 test images, 24 per
    shift split, 20/8/8 videos of 16 frames; two train shards), generated once per session
    in about a second. Treat it as read-only."""
    from peflow.stages import synth

    out = tmp_path_factory.mktemp("corpus") / "synth"
    return synth.run(synth.Config(out=str(out), preset="test", seed=0, workers=1))
