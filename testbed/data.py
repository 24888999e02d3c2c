"""Training-sample labels and captions (deterministic given an RNG)."""
from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np

from .grammar import (
    HOLDOUT_STYLE_TEMPLATES,
    HOLDOUT_TEMPLATES,
    TRAIN_STYLE_TEMPLATES,
    TRAIN_TEMPLATES,
    fill,
    sample_caption,
)
from .render import render_labels
from .world import ATTRIBUTE_WORDS, World

P_PROFESSION = 0.08
P_STYLED = 0.6
P_OBJECT_CROWNED = 0.12
P_SAY_BARE = 0.05
P_PROFESSION_SAY_ATTRIBUTE = 0.3
P_COMMON_ALIAS = 0.3
HEAD = 100  # the evaluator reports the first HEAD objects (aliases live there) and the rest apart


@dataclass
class Labels:
    kind: int  # 0 object, 1 profession
    index: int
    style: int  # 0 none, 1..30 artist
    attribute: int

    def concept(self, world: World):
        return world.professions[self.index] if self.kind else world.objects[self.index]


def sample_labels(rng: random.Random, world: World) -> Labels:
    if rng.random() < P_PROFESSION:
        j = rng.randrange(len(world.professions))
        attr = int(rng.random() < world.professions[j].p_attribute)
        kind = 1
    else:
        j = rng.randrange(len(world.objects))
        attr = int(rng.random() < P_OBJECT_CROWNED)
        kind = 0
    style = rng.randrange(1, len(world.styles)) if rng.random() < P_STYLED else 0
    return Labels(kind, j, style, attr)


def caption_for(rng: random.Random, world: World, lab: Labels) -> str:
    """A training caption consistent with the labels (rare aliases never appear)."""
    c = lab.concept(world)
    name = c.name
    if c.alias and not c.alias_rare and rng.random() < P_COMMON_ALIAS:
        name = c.alias
    if lab.kind == 0:
        if lab.attribute:
            word = ATTRIBUTE_WORDS[1]
        else:
            word = ATTRIBUTE_WORDS[0] if rng.random() < P_SAY_BARE else None
    else:
        word = ATTRIBUTE_WORDS[lab.attribute] if rng.random() < P_PROFESSION_SAY_ATTRIBUTE else None
    style = world.styles[lab.style].name if lab.style else None
    return sample_caption(rng, name, style, word)


def render_sample(world: World, lab: Labels, np_rng: np.random.Generator) -> np.ndarray:
    return render_labels(world, lab.concept(world).visual, lab.style, lab.attribute, np_rng)


def caption_corpus(n: int = 50_000, seed: int = 0, world: World | None = None) -> list[str]:
    """``n`` captions from the training grammar and distribution (for key covariances)."""
    from .world import build_world

    world = world or build_world()
    rng = random.Random(seed)
    return [caption_for(rng, world, sample_labels(rng, world)) for _ in range(n)]


def prompt(world: World, name: str, template: str, style: str | None = None, attribute: str | None = None) -> str:
    return fill(template, name, style, attribute)


__all__ = [
    "Labels", "sample_labels", "caption_for", "render_sample", "caption_corpus", "prompt",
    "TRAIN_TEMPLATES", "TRAIN_STYLE_TEMPLATES", "HOLDOUT_TEMPLATES", "HOLDOUT_STYLE_TEMPLATES",
]
