"""Prompt grammar of the testbed: training templates, held-out paraphrases, caption corpus.

Slots: ``{o}`` object/profession name (with an optional attribute word before it),
``{s}`` artist name. Held-out templates are never used in training or as editing prompts.
"""
from __future__ import annotations

import random

# training templates; the first few mention no style
TRAIN_TEMPLATES = [
    "{o}",
    "a {o}",
    "a photo of a {o}",
    "a picture of a {o}",
    "an image of a {o}",
    "a drawing of a {o}",
    "a painting of a {o}",
    "a photo of the {o}",
    "a close picture of a {o}",
    "a small {o}",
    "the {o}",
    "a rendering of a {o}",
]
TRAIN_STYLE_TEMPLATES = [
    "a {o} in the style of {s}",
    "a painting of a {o} by {s}",
    "a photo of a {o} in the style of {s}",
    "{o} by {s}",
    "a drawing of a {o} by {s}",
    "a picture of the {o} in the style of {s}",
    "an image of a {o} by {s}",
    "a {o} painted by {s}",
    "art of a {o} by {s}",
]
# held-out paraphrases: new arrangements of grammar words, never seen in training
HOLDOUT_TEMPLATES = [
    "a {o} photo",
    "picture of {o}",
    "the image of the {o}",
    "a painting showing a {o}",
    "one {o}, a drawing",
]
HOLDOUT_STYLE_TEMPLATES = [
    "{o} in the style of {s}",
    "a {o} art by {s}",
    "{s} painting of a {o}",
    "a rendering of the {o} painted by {s}",
]

_extra = ["showing", "one", ",", "art"]


def _words(templates) -> set[str]:
    out = set()
    for t in templates:
        for w in t.replace(",", " , ").split():
            if not w.startswith("{"):
                out.add(w)
    return out


GRAMMAR_WORDS = sorted(
    _words(TRAIN_TEMPLATES + TRAIN_STYLE_TEMPLATES + HOLDOUT_TEMPLATES + HOLDOUT_STYLE_TEMPLATES)
    | {"bare", "crowned", "person"}
    | set(_extra)
)


def fill(template: str, obj: str, style: str | None = None, attribute: str | None = None) -> str:
    o = f"{attribute} {obj}" if attribute else obj
    text = template.replace("{o}", o)
    if "{s}" in text:
        text = text.replace("{s}", style or "")
    # "a" -> "an" is not applied: invented names keep the grammar simple and fixed
    return text


def sample_caption(
    rng: random.Random,
    name: str,
    style_name: str | None,
    attribute_word: str | None,
    templates=None,
    style_templates=None,
) -> str:
    """A caption for a sample whose labels are already fixed (style None = unstyled)."""
    if style_name is None:
        t = rng.choice(templates or TRAIN_TEMPLATES)
    else:
        t = rng.choice(style_templates or TRAIN_STYLE_TEMPLATES)
    return fill(t, name, style_name, attribute_word)
