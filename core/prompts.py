"""Concepts placed in prompt templates, remembering where the concept ends (its last token is a key)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Prompt:
    text: str
    subject_end: int  # character offset one past the concept inside ``text``


def expand(concept: str, templates: list[str]) -> list[Prompt]:
    """Fill each template's ``{}`` with ``concept``."""
    out = []
    for t in templates:
        if t.count("{}") != 1:
            raise ValueError(f"template {t!r} must contain exactly one '{{}}'")
        pre = t.split("{}")[0]
        text = t.replace("{}", concept)
        out.append(Prompt(text, len(pre) + len(concept)))
    return out
