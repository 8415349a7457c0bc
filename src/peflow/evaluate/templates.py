"""Prompt templates for zero-shot classification.

A class's text embedding is the normalised mean of its templates' embeddings
(CLIP's prompt ensembling, as open_clip's `build_zero_shot_classifier` and
the PE evaluation do). Template sets:

- `corpus`: prompts in the words of the built-in corpus's captions and its
  shift splits (photo, sketch, cartoon, clutter, unusual view), so a model
  trained on that corpus is asked in its own vocabulary;
- `simple`: a handful of generic CLIP prompts;
- `openai`: a selection of OpenAI's ImageNet prompt list (generic photo
  conditions), for models trained on web captions;
- `all`: the three together (duplicates removed).

`{c}` stands for the class name; "a {c}" becomes "an {c}" before a vowel.
"""

from __future__ import annotations

import re

CORPUS_TEMPLATES: tuple[str, ...] = (
    "a {c}.",
    "a photo of a {c}.",
    "an image of a {c}.",
    "a picture showing a {c}.",
    "a {c} in the middle.",
    "a small {c}.",
    "a large {c}.",
    "a sketch of a {c}.",
    "a line drawing of a {c}.",
    "an outline drawing of a {c}.",
    "a cartoon of a {c}.",
    "an illustration of a {c}.",
    "clip art of a {c}.",
    "a cluttered scene with a {c}.",
    "a {c} among many small shapes.",
    "an unusual view of a {c}.",
    "a tilted {c}.",
)

SIMPLE_TEMPLATES: tuple[str, ...] = (
    "{c}.",
    "a photo of a {c}.",
    "a bad photo of the {c}.",
    "a origami {c}.",
    "a photo of the large {c}.",
    "a {c} in a video game.",
    "art of the {c}.",
    "a photo of the small {c}.",
)

OPENAI_TEMPLATES: tuple[str, ...] = (
    "a bad photo of a {c}.",
    "a photo of many {c}.",
    "a sculpture of a {c}.",
    "a photo of the hard to see {c}.",
    "a low resolution photo of the {c}.",
    "a rendering of a {c}.",
    "graffiti of a {c}.",
    "a cropped photo of the {c}.",
    "a tattoo of a {c}.",
    "a bright photo of a {c}.",
    "a photo of a clean {c}.",
    "a photo of a dirty {c}.",
    "a dark photo of the {c}.",
    "a drawing of a {c}.",
    "a photo of my {c}.",
    "a close-up photo of a {c}.",
    "a black and white photo of the {c}.",
    "a painting of the {c}.",
    "a pixelated photo of the {c}.",
    "a blurry photo of the {c}.",
    "a sketch of the {c}.",
    "a toy {c}.",
    "a cartoon {c}.",
    "a plastic {c}.",
    "a photo of a large {c}.",
    "a jpeg corrupted photo of a {c}.",
    "a good photo of a {c}.",
    "itap of a {c}.",
    "a embroidered {c}.",
    "a photo of a weird {c}.",
)

#: Prompts of the attribute label sets (`peflow.evaluate.labelsets`): `{c}` is the class's phrase.
ATTRIBUTE_TEMPLATES: dict[str, tuple[str, ...]] = {
    "colour": ("a {c} shape.", "a photo of a {c} shape.", "an image of a {c} object.", "a picture showing a {c} shape."),
    "position": ("a shape {c}.", "a photo of a shape {c}.", "an image of an object {c}.", "a large shape {c}."),
}
#: How a class of an attribute label set is worded in a prompt, where not by its name (the corpus's words).
ATTRIBUTE_PHRASES: dict[str, dict[str, str]] = {
    "position": {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
                 "center": "in the center"},
}

TEMPLATE_SETS: dict[str, tuple[str, ...]] = {
    "corpus": CORPUS_TEMPLATES,
    "simple": SIMPLE_TEMPLATES,
    "openai": OPENAI_TEMPLATES,
    "all": tuple(dict.fromkeys(CORPUS_TEMPLATES + SIMPLE_TEMPLATES + OPENAI_TEMPLATES)),
}

_ARTICLE = re.compile(r"\b([Aa]) ([aeiouAEIOU])")


def get_templates(name: str) -> tuple[str, ...]:
    """The template set called `name` (see the module docstring)."""
    try:
        return TEMPLATE_SETS[name]
    except KeyError:
        raise ValueError(f"unknown template set {name!r}; known: {sorted(TEMPLATE_SETS)}") from None


def fill(template: str, classname: str) -> str:
    """`template` with `{c}` replaced by `classname` and 'a' fixed to 'an' before a vowel."""
    if "{c}" not in template:
        raise ValueError(f"template {template!r} has no '{{c}}' placeholder")
    return _ARTICLE.sub(lambda m: f"{m.group(1)}n {m.group(2)}", template.replace("{c}", classname))


def prompts(classnames: list[str] | tuple[str, ...], templates: tuple[str, ...]) -> list[list[str]]:
    """One list of prompts per class."""
    return [[fill(t, c) for t in templates] for c in classnames]
