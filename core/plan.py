"""Edit plans: what to change, parsed from YAML/JSON files or CLI flags into one structure.

Example edit file::

    method: uce            # uce | emcid | nullspace (text-encoder methods when installed)
    lambda: 0.5
    token: last            # last | aligned
    templates: ["{}", "a painting by {}"]
    preserve: ["Claude Monet"]
    edits:
      - erase: Van Gogh
        type: style        # guide defaults to "art" for styles, "" for objects
      - replace: cat
        with: dog
      - moderate: nudity
        strength: 1.0
      - debias: doctor
        attributes: [male, female]
        ratios: [0.5, 0.5]     # fitted by the debias loop, or give `alphas:` directly
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

KINDS = ("erase", "replace", "moderate", "debias")
DEFAULT_GUIDE = {"object": "", "style": "art"}


class PlanError(ValueError):
    pass


@dataclass
class Edit:
    kind: str
    source: str
    target: str = ""  # erase guide / replace destination; unused for moderate and debias
    strength: float = 1.0  # moderate: how far towards the unconditional key (1 = all the way)
    attributes: list[str] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)
    alphas: list[float] | None = None
    weight: float | None = None  # per-edit erase scale (defaults to the plan's)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise PlanError(f"unknown edit kind {self.kind!r}; expected one of {', '.join(KINDS)}")
        if not isinstance(self.source, str) or not self.source.strip():
            raise PlanError(f"{self.kind} edit has an empty concept")
        self.source = self.source.strip()
        if self.kind == "debias":
            if len(self.attributes) < 2:
                raise PlanError(f"debias {self.source!r} needs at least two attributes")
            if self.ratios and (len(self.ratios) != len(self.attributes) or abs(sum(self.ratios) - 1) > 1e-6):
                raise PlanError(f"debias {self.source!r}: ratios must match the attributes and sum to 1")
            if not self.ratios:
                self.ratios = [1.0 / len(self.attributes)] * len(self.attributes)
            if self.alphas is not None and len(self.alphas) != len(self.attributes):
                raise PlanError(f"debias {self.source!r}: one alpha per attribute")
        if self.kind == "replace" and not self.target.strip():
            raise PlanError(f"replace {self.source!r} needs a destination concept ('with')")
        if self.kind == "moderate" and not 0 < self.strength <= 1:
            raise PlanError(f"moderate strength must be in (0, 1], got {self.strength}")


@dataclass
class EditPlan:
    edits: list[Edit]
    preserve: list[str] = field(default_factory=list)
    method: str = "uce"
    lam: float = 0.5
    erase_scale: float = 1.0
    preserve_scale: float = 1.0
    token: str = "last"
    templates: list[str] = field(default_factory=lambda: ["{}"])
    preserve_empty: bool = True  # UCE preserves the unconditional "" by default
    layers: str = "kv"  # kv: to_k and to_v; v: to_v only
    options: dict = field(default_factory=dict)  # method-specific settings

    def __post_init__(self):
        if not self.edits:
            raise PlanError("the plan has no edits")
        if self.token not in ("last", "aligned"):
            raise PlanError(f"token selection must be 'last' or 'aligned', got {self.token!r}")
        if self.layers not in ("kv", "v"):
            raise PlanError(f"layers must be 'kv' or 'v', got {self.layers!r}")
        if self.lam < 0:
            raise PlanError("lambda must be >= 0")
        for t in self.templates:
            if t.count("{}") != 1:
                raise PlanError(f"template {t!r} must contain exactly one '{{}}'")
        sources = {e.source.lower() for e in self.edits}
        self.preserve = [p.strip() for p in self.preserve if p.strip() and p.strip().lower() not in sources]

    def to_dict(self) -> dict:
        return asdict(self)


def _edit_from_dict(d: dict) -> Edit:
    kinds = [k for k in KINDS if k in d]
    if len(kinds) != 1:
        raise PlanError(f"each edit names exactly one of {', '.join(KINDS)}: got {d}")
    kind = kinds[0]
    target = d.get("with", d.get("guide"))
    if kind == "erase" and target is None:
        kind_type = d.get("type", "object")
        if kind_type not in DEFAULT_GUIDE:
            raise PlanError(f"erase type must be 'object' or 'style', got {kind_type!r}")
        target = DEFAULT_GUIDE[kind_type]
    return Edit(
        kind=kind,
        source=d[kind],
        target=target or "",
        strength=float(d.get("strength", 1.0)),
        attributes=list(d.get("attributes", [])),
        ratios=[float(x) for x in d.get("ratios", [])],
        alphas=None if d.get("alphas") is None else [float(x) for x in d["alphas"]],
        weight=None if d.get("weight") is None else float(d["weight"]),
    )


def plan_from_dict(d: dict) -> EditPlan:
    if not isinstance(d, dict) or "edits" not in d:
        raise PlanError("an edit file is a mapping with an 'edits' list")
    known = {"method", "lambda", "erase_scale", "preserve_scale", "token", "templates", "preserve", "preserve_empty", "layers", "edits", "options"}
    unknown = set(d) - known
    if unknown:
        raise PlanError(f"unknown keys in edit file: {', '.join(sorted(unknown))}")
    return EditPlan(
        edits=[_edit_from_dict(e) for e in d["edits"]],
        preserve=list(d.get("preserve", [])),
        method=d.get("method", "uce"),
        lam=float(d.get("lambda", 0.5)),
        erase_scale=float(d.get("erase_scale", 1.0)),
        preserve_scale=float(d.get("preserve_scale", 1.0)),
        token=d.get("token", "last"),
        templates=list(d.get("templates", ["{}"])),
        preserve_empty=bool(d.get("preserve_empty", True)),
        layers=d.get("layers", "kv"),
        options=dict(d.get("options", {})),
    )


def load_plan(path: str | Path) -> EditPlan:
    path = Path(path)
    if not path.exists():
        raise PlanError(f"edit file {path} does not exist")
    text = path.read_text()
    if path.suffix.lower() == ".json":
        data = json.loads(text)
    else:
        import yaml

        data = yaml.safe_load(text)
    return plan_from_dict(data)
