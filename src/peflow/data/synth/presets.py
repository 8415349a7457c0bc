"""Corpus presets: `nano` written out once, the others change a few fields."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class CorpusPreset:
    """Sizes of one built-in corpus."""

    name: str = "nano"
    image_size: int = 64  #: side of images and video frames, pixels (even)
    #: 24,000: with 4,000 the nano model memorised its captions (zero-shot top-1 21% vs 31% at 24,000)
    train_images: int = 24000
    val_images: int = 400
    test_images: int = 500
    shift_images: int = 300  #: per shift split
    #: 1920 train videos, half with a human caption: the captioner's human-caption phase has 960 (96
    #: per action; with 480 it named the action in 35% of held-out videos, with 960 in 47%); synth
    #: makes about 110 videos/s on 2 cores
    train_videos: int = 1920
    val_videos: int = 80
    test_videos: int = 160
    num_frames: int = 16
    fps: int = 8
    human_caption_fraction: float = 0.5  #: of train videos; val and test videos always have one
    images_per_shard: int = 1000
    videos_per_shard: int = 100
    jpeg_quality: int = 90

    def image_counts(self) -> dict[str, int]:
        from peflow.data.synth.vocab import SHIFTS

        counts = {"train": self.train_images, "val": self.val_images, "test": self.test_images}
        return counts | {f"shift_{s}": self.shift_images for s in SHIFTS}

    def video_counts(self) -> dict[str, int]:
        return {"train": self.train_videos, "val": self.val_videos, "test": self.test_videos}

    @property
    def min_pixels(self) -> int:
        """Objects showing fewer pixels than this are removed from the scene."""
        return max(3, round(0.0015 * self.image_size**2))

    def scaled(self, factor: int, **changes: object) -> CorpusPreset:
        """Every count times `factor`, plus `changes`."""
        counts = {f.name: getattr(self, f.name) * factor for f in dataclasses.fields(self)
                  if f.name.endswith(("_images", "_videos"))}
        return dataclasses.replace(self, **counts, **changes)

    def validate(self) -> None:
        if self.image_size < 16 or self.image_size % 2:
            raise ValueError(f"image_size must be even and >= 16, got {self.image_size}")
        if not 2 <= self.num_frames <= 256:
            raise ValueError(f"num_frames must be in [2, 256], got {self.num_frames}")
        if not 0.0 <= self.human_caption_fraction <= 1.0:
            raise ValueError(f"human_caption_fraction must be in [0, 1], got {self.human_caption_fraction}")
        for split, n in {**self.image_counts(), **{f"video {k}": v for k, v in self.video_counts().items()}}.items():
            if n < 0:
                raise ValueError(f"{split}: sample count must be >= 0, got {n}")


def nano() -> CorpusPreset:
    """Demo and CPU pipeline runs: 64 px, about 26k images and 360 videos."""
    return CorpusPreset()


def small() -> CorpusPreset:
    """128 px, 10x nano."""
    return nano().scaled(10, name="small", image_size=128)


def full() -> CorpusPreset:
    """224 px, 100x nano, 32-frame videos."""
    return nano().scaled(100, name="full", image_size=224, num_frames=32, videos_per_shard=50)


def test() -> CorpusPreset:
    """Tiny, for unit tests: 32 px, a few hundred images, 36 videos, two train shards."""
    return dataclasses.replace(nano(), name="test", image_size=32, train_images=120, val_images=24, test_images=24,
                               shift_images=24, train_videos=20, val_videos=8, test_videos=8,
                               images_per_shard=64, videos_per_shard=16)


PRESETS: dict[str, Callable[[], CorpusPreset]] = {"nano": nano, "small": small, "full": full, "test": test}


def get(name: str) -> CorpusPreset:
    if name not in PRESETS:
        raise ValueError(f"unknown synth preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name]()
