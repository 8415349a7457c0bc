"""The expectation suites, each expectation tagged with the quarantine reason
it stands for (`meta={"reason": ...}`).

Suites run on the feature rows of one kind (`peflow.validation.features`):
  image     image-text shards
  video     video shards (PE Video Dataset layout)
  captions  generated captions on video shards (`model_caption`), for the
            caption stage's output

Every check is a column-map expectation, so its COMPLETE result lists the
failing rows. Map expectations skip null values: a feature that does not
apply (no json, no label set, a row for an unreadable shard) is None and is
not judged; the boolean `has_*` columns make "must be present" explicit.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

SUITES = ("image", "video", "captions")
SUITE_KIND = {"image": "image", "video": "video", "captions": "video"}

#: reason -> what it means (docs/validation.md, report.json)
REASONS: dict[str, str] = {
    "shard_unreadable": "the tar shard could not be read to the end (truncated or corrupt archive)",
    "media_undecodable": "the image or video entry is missing or does not decode",
    "resolution_out_of_bounds": "decoded width or height outside [min_side, max_side]",
    "frame_count_out_of_bounds": "decoded frame count outside [min_frames, max_frames]",
    "duration_out_of_bounds": "duration (frames / fps) outside [min_duration, max_duration] seconds",
    "frame_count_mismatch": "decoded frames differ from the json's num_frames (truncated video)",
    "metadata_invalid": "the json entry does not parse as a JSON object",
    "id_mismatch": "the json's key / video_id is not the sample's tar key",
    "caption_missing": "no caption (image: txt or json caption; video: human caption, model caption, "
                       "description or title), or only whitespace",
    "caption_length_out_of_bounds": "caption length outside [min_caption_chars, max_caption_chars]",
    "caption_not_utf8": "a caption or text field is not valid UTF-8",
    "duplicate_key": "the key was already seen in this kind (the first occurrence is kept)",
    "label_missing": "no label (image: json label; video: json category) while the card has a label set",
    "label_unknown": "the label is not in the card's label set (categories / actions)",
    "label_id_mismatch": "label_id is not the label's index in the card's label set",
    "aux_invalid": "a dense target (mask.png, depth.png, masks.npy) does not decode or match the media size",
    "model_caption_missing": "no generated caption (model_caption)",
    "model_caption_length_out_of_bounds": "model_caption length outside [min_caption_chars, max_caption_chars]",
    "model_caption_not_utf8": "model_caption is not valid UTF-8",
    "model_caption_copies_title": "model_caption is the title (case-insensitive): the captioner copied metadata",
    "model_caption_word_count_out_of_bounds": "model_caption word count outside [min_caption_words, "
                                              "max_caption_words]",
    "model_caption_repetition_loop": "a word or phrase repeats back to back more than max_caption_repeats times "
                                     "(a generation loop)",
    "model_caption_prompt_echo": "model_caption repeats the summarizer's prompt instead of answering it",
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Bounds:
    """Accepted ranges (inclusive)."""

    min_side: int = 16
    max_side: int = 4096
    min_frames: int = 2
    max_frames: int = 4096
    min_duration: float = 0.1
    max_duration: float = 600.0
    min_caption_chars: int = 5
    max_caption_chars: int = 2000
    min_caption_words: int = 3
    max_caption_words: int = 300
    max_caption_repeats: int = 3

    def check(self) -> None:
        for lo, hi in (("min_side", "max_side"), ("min_frames", "max_frames"),
                       ("min_duration", "max_duration"), ("min_caption_chars", "max_caption_chars"),
                       ("min_caption_words", "max_caption_words")):
            a, b = getattr(self, lo), getattr(self, hi)
            if a < 0 or a > b:
                raise ValueError(f"{lo}={a} and {hi}={b}: need 0 <= {lo} <= {hi}")


def _is(column: str, value: bool, reason: str, what: str) -> tuple[str, Any]:
    import great_expectations as gx

    return reason, gx.expectations.ExpectColumnValuesToBeInSet(
        column=column, value_set=[value], meta={"reason": reason}, description=what)


def _between(column: str, lo: float, hi: float, reason: str, what: str) -> tuple[str, Any]:
    import great_expectations as gx

    return reason, gx.expectations.ExpectColumnValuesToBeBetween(
        column=column, min_value=lo, max_value=hi, meta={"reason": reason}, description=what)


def _common(b: Bounds, label_set: Sequence[str] | None) -> list[tuple[str, Any]]:
    import great_expectations as gx

    checks = [
        _is("readable", True, "shard_unreadable", "The shard reads to the end."),
        _is("decodes", True, "media_undecodable", "The media entry is present and decodes."),
        _between("width", b.min_side, b.max_side, "resolution_out_of_bounds",
                 f"Width is within **{b.min_side}-{b.max_side}** px."),
        _between("height", b.min_side, b.max_side, "resolution_out_of_bounds",
                 f"Height is within **{b.min_side}-{b.max_side}** px."),
        _is("meta_valid", True, "metadata_invalid", "The json entry is a JSON object."),
        _is("id_matches_key", True, "id_mismatch", "The json's id is the tar key."),
        _is("has_caption", True, "caption_missing", "A non-blank caption is present."),
        _between("caption_length", b.min_caption_chars, b.max_caption_chars, "caption_length_out_of_bounds",
                 f"The caption has **{b.min_caption_chars}-{b.max_caption_chars}** characters."),
        _is("caption_utf8_valid", True, "caption_not_utf8", "Caption text is valid UTF-8."),
        _between("key_repeat", 0, 0, "duplicate_key", "Keys are unique (first occurrence kept)."),
        _is("aux_ok", True, "aux_invalid", "Dense targets decode and match the media size."),
    ]
    if label_set is not None:
        checks += [
            _is("has_label", True, "label_missing", "Every sample has a label."),
            _is("label_in_label_set", True, "label_unknown",
                f"The label is one of the card's **{len(label_set)}** classes."),
            ("label_id_mismatch", gx.expectations.ExpectColumnPairValuesToBeEqual(
                column_A="label_id", column_B="label_set_id", ignore_row_if="either_value_is_missing",
                meta={"reason": "label_id_mismatch"}, description="label_id is the label's index in the set.")),
        ]
    return checks


def build(suite: str, bounds: Bounds, label_set: Sequence[str] | None) -> list[tuple[str, Any]]:
    """(reason, expectation) pairs of one suite."""
    import great_expectations as gx

    b = bounds
    if suite == "image":
        return _common(b, label_set)
    if suite == "video":
        return [
            *_common(b, label_set),
            _between("num_frames", b.min_frames, b.max_frames, "frame_count_out_of_bounds",
                     f"The video has **{b.min_frames}-{b.max_frames}** frames."),
            _between("duration", b.min_duration, b.max_duration, "duration_out_of_bounds",
                     f"The video lasts **{b.min_duration}-{b.max_duration}** s."),
            ("frame_count_mismatch", gx.expectations.ExpectColumnPairValuesToBeEqual(
                column_A="num_frames", column_B="meta_num_frames", ignore_row_if="either_value_is_missing",
                meta={"reason": "frame_count_mismatch"}, description="All frames the json announces decode.")),
        ]
    if suite == "captions":
        return [
            _is("readable", True, "shard_unreadable", "The shard reads to the end."),
            _is("has_model_caption", True, "model_caption_missing", "A generated caption is present."),
            _between("model_caption_length", b.min_caption_chars, b.max_caption_chars,
                     "model_caption_length_out_of_bounds",
                     f"The generated caption has **{b.min_caption_chars}-{b.max_caption_chars}** characters."),
            _is("model_caption_utf8_valid", True, "model_caption_not_utf8", "The generated caption is UTF-8."),
            _is("model_caption_equals_title", False, "model_caption_copies_title",
                "The generated caption is not the title."),
            _between("model_caption_words", b.min_caption_words, b.max_caption_words,
                     "model_caption_word_count_out_of_bounds",
                     f"The generated caption has **{b.min_caption_words}-{b.max_caption_words}** words."),
            _between("model_caption_max_repeat", 0, b.max_caption_repeats, "model_caption_repetition_loop",
                     f"No word or phrase repeats back to back more than **{b.max_caption_repeats}** times."),
            _is("model_caption_echoes_prompt", False, "model_caption_prompt_echo",
                "The generated caption does not echo the summarizer's prompt."),
        ]
    raise ValueError(f"unknown suite {suite!r}; known: {', '.join(SUITES)}")


def parse(suites: str) -> list[str]:
    """'image,video' -> ['image', 'video'] (checked, order kept, no repeats)."""
    names = list(dict.fromkeys(s.strip() for s in suites.split(",") if s.strip()))
    unknown = [s for s in names if s not in SUITES]
    if unknown or not names:
        raise ValueError(f"suites={suites!r}: unknown or empty {unknown}; choose from {', '.join(SUITES)}")
    return names
