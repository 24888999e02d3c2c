"""The testbed's concept world: a deterministic, seeded catalogue of everything the model knows.

Objects are shape x colour x pattern combinations under invented names; "artists" are rendering
styles (background x frame) that never change which object is drawn; professions are extra
objects whose binary attribute (a gold crown) is drawn at a skewed rate; some objects have a
second name (alias), 20 of which never occur in training (rectification task).
Everything here is pure Python and reproducible from ``WORLD_SEED``.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from functools import lru_cache

WORLD_SEED = 1234

SHAPES = ["circle", "square", "triangle", "wedge", "diamond", "plus", "star", "hexagon", "oval", "pillar", "ring"]
COLOURS = ["red", "orange", "yellow", "lime", "green", "cyan", "blue", "purple", "magenta", "brown"]
# two-tone layouts coarse enough (>= 5 px features) for a small pixel UNet to learn in the CPU budget;
# session 1's 2-3 px stripes, dots and grids were still drawn solid after 4,500 training steps
PATTERNS = ["solid", "hstripes", "vstripes", "diagonal", "checker", "rim", "hollow", "core", "split", "vsplit"]
BACKGROUNDS = ["light", "mid", "dark", "black", "gradient", "noise"]
FRAMES = ["none", "thin", "thick", "corners", "double"]
# style 0 is "no artist" (white background, no frame); styles 1..30 are the artists.
ATTRIBUTE_WORDS = ("bare", "crowned")  # attribute 0 / 1

PROFESSION_WORDS = ["doctor", "nurse", "pilot", "chef", "judge", "farmer", "baker", "painter", "teacher", "guard"]
N_ARTISTS = 30
N_ALIASES = 50
N_RARE_ALIASES = 20
CORE = 100  # objects 0..CORE-1: aliases live here; sampled more often in training

_CONS = "bdfgklmnprstvz"
_VOW = "aeiou"


@dataclass(frozen=True)
class Concept:
    index: int  # object id (index into World.objects) or profession id
    name: str
    shape: int
    colour: int
    pattern: int
    kind: str = "object"  # "object" | "profession"
    p_attribute: float = 0.0  # P(crowned) when the prompt does not say
    alias: str | None = None
    alias_rare: bool = False

    @property
    def visual(self) -> tuple[int, int, int]:
        return (self.shape, self.colour, self.pattern)


@dataclass(frozen=True)
class Style:
    index: int  # 0 = none, 1..30 artists
    name: str | None
    background: int
    frame: int


@dataclass
class World:
    objects: list[Concept]
    professions: list[Concept]
    styles: list[Style]  # styles[0] is the unstyled default
    seed: int = WORLD_SEED
    visual_to_object: dict = field(default_factory=dict)

    @property
    def artists(self) -> list[Style]:
        return self.styles[1:]

    @property
    def aliased(self) -> list[Concept]:
        return [c for c in self.objects if c.alias]

    @property
    def rare_aliased(self) -> list[Concept]:
        return [c for c in self.objects if c.alias and c.alias_rare]

    @property
    def common_aliased(self) -> list[Concept]:
        return [c for c in self.objects if c.alias and not c.alias_rare]

    def object_by_name(self, name: str) -> Concept:
        for c in self.objects + self.professions:
            if c.name == name or c.alias == name:
                return c
        raise KeyError(name)

    def object_of_visual(self, shape: int, colour: int, pattern: int) -> int:
        """Object id drawn with that visual, or -1 (professions return -2 - profession id)."""
        return self.visual_to_object.get((shape, colour, pattern), -1)


def _names(rng: random.Random, n: int, taken: set[str]) -> list[str]:
    out = []
    while len(out) < n:
        k = rng.choice([2, 2, 3])
        w = "".join(rng.choice(_CONS) + rng.choice(_VOW) for _ in range(k)) + rng.choice(_CONS + "x")
        if w not in taken:
            taken.add(w)
            out.append(w)
    return out


@lru_cache(maxsize=8)
def build_world(n_objects: int = 1000, seed: int = WORLD_SEED) -> World:
    """The world with ``n_objects`` named objects (deterministic in ``seed``)."""
    rng = random.Random(seed)
    combos = [(s, c, p) for s in range(len(SHAPES)) for c in range(len(COLOURS)) for p in range(len(PATTERNS))]
    rng.shuffle(combos)
    n_prof = len(PROFESSION_WORDS)
    if n_objects < CORE:
        raise ValueError(f"at least {CORE} objects")
    if n_objects + n_prof > len(combos):
        raise ValueError(f"at most {len(combos) - n_prof} objects")
    from .grammar import GRAMMAR_WORDS  # names must not collide with grammar words

    taken = set(GRAMMAR_WORDS) | set(PROFESSION_WORDS)
    # names of the full 1000-object world first, so smaller worlds are prefixes of it
    names = _names(rng, 1000, taken)
    artist_names = _names(rng, N_ARTISTS, taken)
    alias_names = _names(rng, N_ALIASES, taken)
    # aliases live among the first CORE objects so every world of >= CORE objects shares them
    alias_objs = rng.sample(range(CORE), N_ALIASES)
    rare = set(alias_objs[:N_RARE_ALIASES])
    alias_of = {o: a for o, a in zip(alias_objs, alias_names)}
    objects = []
    for i in range(n_objects):
        s, c, p = combos[i]
        objects.append(
            Concept(i, names[i], s, c, p, alias=alias_of.get(i), alias_rare=i in rare)
        )
    professions = []
    for j, w in enumerate(PROFESSION_WORDS):
        s, c, p = combos[len(combos) - 1 - j]
        # first half skewed towards crowned, second half towards bare
        professions.append(Concept(j, w, s, c, p, kind="profession", p_attribute=0.85 if j % 2 == 0 else 0.15))
    styles = [Style(0, None, -1, 0)]
    for k in range(N_ARTISTS):
        styles.append(Style(k + 1, artist_names[k], k % len(BACKGROUNDS), k // len(BACKGROUNDS)))
    w = World(objects, professions, styles, seed)
    w.visual_to_object = {c.visual: c.index for c in objects}
    for c in professions:
        w.visual_to_object[c.visual] = -2 - c.index
    return w
