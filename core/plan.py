"""Edit plans: what to change and the method's settings, parsed from YAML/JSON files, CLI flags
or node inputs into one validated structure.

Example edit file::

    method: uce            # uce | emcid | nullspace | emcid+uce
    lambda: 0.5            # a setting of the method (core/settings.py); also allowed under options:
    token: last            # last | aligned | all (T5 keys of FLUX/SD3)
    templates: ["{}", "a painting by {}"]
    preserve: ["Claude Monet"]
    preserve_empty: true   # keep "" (the unconditional prompt) too
    options: {}            # further settings of the method, e.g. {alpha: 0.5} for emcid
    edits:
      - erase: Van Gogh
        type: style        # chooses the guide: "art" for styles, "" for objects; or give guide:
      - replace: cat
        with: dog
      - moderate: nudity
        strength: 1.0
      - debias: doctor
        attributes: [male, female]
        ratios: [0.5, 0.5]     # fitted by the debias loop, or give `alphas:` directly

Every key is checked: unknown keys (with the nearest valid name), wrong types (a string where a
list belongs) and contradictions (one concept edited twice, replaced by itself) are errors.
"""
from __future__ import annotations

import difflib
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from .settings import (
    MethodSettings,
    SettingsError,
    all_setting_keys,
    build_settings,
    settings_class,
)

KINDS = ("erase", "replace", "moderate", "debias")
DEFAULT_GUIDE = {"object": "", "style": "art"}
# edit kind -> the keys an edit of that kind may have (besides the kind itself)
EDIT_KEYS = {
    "erase": ("type", "guide", "weight"),
    "replace": ("with", "weight"),
    "moderate": ("strength", "weight"),
    "debias": ("attributes", "ratios", "alphas", "weight"),
}
PLAN_KEYS = ("method", "edits", "preserve", "preserve_empty", "templates", "options")


class PlanError(SettingsError):
    pass


def split_quoted(text: str, sep: str = ",", *, unquote: bool = True) -> list[str]:
    """Names separated by ``sep``; a name containing ``sep`` is double-quoted ("Smith, John").
    The one quoting rule for CLI flags and node widgets; blank items are dropped. ``unquote=False``
    keeps the quotes, for splitting the parts again at another separator."""
    parts, cur, quoted = [], "", False
    for ch in text:
        if ch == '"':
            quoted = not quoted
        if ch == sep and not quoted:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    parts = [x.strip() for x in parts]
    if unquote:
        parts = [x[1:-1].strip() if len(x) >= 2 and x[0] == x[-1] == '"' else x for x in parts]
    return [x for x in parts if x]


def _unknown(key, valid, where: str) -> PlanError:
    near = difflib.get_close_matches(str(key), list(valid), n=1)
    hint = f" (did you mean {near[0]!r}?)" if near else ""
    return PlanError(f"unknown key {key!r} in {where}{hint}; valid keys: {', '.join(sorted(valid))}")


def _str(v, what: str) -> str:
    if not isinstance(v, str):
        raise PlanError(f"{what} must be a string, got {v!r}")
    return v


def _num(v, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise PlanError(f"{what} must be a finite number, got {v!r}")
    return float(v)


def _list(v, what: str, item=_str) -> list:
    if not isinstance(v, (list, tuple)):
        raise PlanError(f"{what} must be a list (e.g. [a, b]), got {v!r}")
    return [item(x, f"each entry of {what}") for x in v]


@dataclass
class Edit:
    kind: str
    source: str
    target: str = ""  # erase guide / replace destination; unused for moderate and debias
    strength: float = 1.0  # moderate: how far towards the unconditional key (1 = all the way)
    attributes: list[str] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)
    alphas: list[float] | None = None
    weight: float | None = None  # per-edit erase scale (defaults to the settings' erase_scale)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise PlanError(f"unknown edit kind {self.kind!r}; expected one of {', '.join(KINDS)}")
        if not isinstance(self.source, str) or not self.source.strip():
            raise PlanError(f"{self.kind} edit has an empty concept")
        self.source = self.source.strip()
        self.target = _str(self.target, f"{self.kind} {self.source!r}: the guide/destination").strip()
        if self.weight is not None and _num(self.weight, "weight") <= 0:
            raise PlanError(f"{self.kind} {self.source!r}: weight must be > 0 (0 would leave the concept unchanged)")
        if self.kind == "debias":
            if len(self.attributes) < 2:
                raise PlanError(f"debias {self.source!r} needs at least two attributes")
            if self.ratios and (len(self.ratios) != len(self.attributes) or abs(sum(self.ratios) - 1) > 1e-6):
                raise PlanError(f"debias {self.source!r}: ratios must match the attributes and sum to 1")
            if not self.ratios:
                self.ratios = [1.0 / len(self.attributes)] * len(self.attributes)
            if self.alphas is not None and len(self.alphas) != len(self.attributes):
                raise PlanError(f"debias {self.source!r}: one alpha per attribute")
        if self.kind == "replace":
            if not self.target:
                raise PlanError(f"replace {self.source!r} needs a destination concept ('with')")
            if self.target.lower() == self.source.lower():
                raise PlanError(f"replace {self.source!r} with itself changes nothing")
        if self.kind == "moderate" and not 0 < self.strength <= 1:
            raise PlanError(f"moderate strength must be in (0, 1], got {self.strength}")


@dataclass
class EditPlan:
    edits: list[Edit]
    preserve: list[str] = field(default_factory=list)
    method: str = "uce"
    templates: list[str] = field(default_factory=lambda: ["{}"])
    preserve_empty: bool = True  # keep the unconditional "" too (UCE's default)
    settings: MethodSettings | None = None  # None: the method's defaults
    dropped_preserve: list[str] = field(default_factory=list, init=False)  # edited concepts taken out of preserve

    def __post_init__(self):
        if not self.edits:
            raise PlanError("the plan has no edits")
        _str(self.method, "method")
        cls = settings_class(self.method)
        if self.settings is None:
            self.settings = build_settings(self.method)
        elif not isinstance(self.settings, cls):
            raise PlanError(f"settings of type {type(self.settings).__name__} do not belong to method {self.method!r}")
        if not isinstance(self.preserve_empty, bool):
            raise PlanError(f"preserve_empty must be true or false, got {self.preserve_empty!r}")
        self.templates = _list(self.templates, "templates")
        if not self.templates:
            raise PlanError("templates must not be empty")
        for t in self.templates:
            if t.count("{}") != 1:
                raise PlanError(f"template {t!r} must contain exactly one '{{}}'")
        seen: dict[str, Edit] = {}
        for e in self.edits:
            k = e.source.lower()
            if k in seen:
                raise PlanError(f"{e.source!r} is edited twice ({seen[k].kind} and {e.kind}); give one edit per concept")
            seen[k] = e
        kept, dropped = [], []
        for p in _list(self.preserve, "preserve"):
            p = p.strip()
            if p:
                (dropped if p.lower() in seen else kept).append(p)
        if dropped:
            warnings.warn(f"preserve: {', '.join(dropped)} {'is' if len(dropped) == 1 else 'are'} edited by this plan, "
                          "so not preserved", stacklevel=2)
        self.preserve, self.dropped_preserve = kept, dropped

    def edit_weights(self) -> list[float]:
        """Each edit's weight in the solve: its own ``weight``, else the settings' ``erase_scale``."""
        return [e.weight if e.weight is not None else self.settings.erase_scale for e in self.edits]


def _edit_from_dict(d) -> Edit:
    if not isinstance(d, dict):
        raise PlanError(f"each edit is a mapping like {{erase: NAME}}, got {d!r}")
    kinds = [k for k in KINDS if k in d]
    if len(kinds) != 1:
        raise PlanError(f"each edit names exactly one of {', '.join(KINDS)}: got {d}")
    kind = kinds[0]
    source = _str(d[kind], f"{kind}")
    for key in d:
        if key != kind and key not in EDIT_KEYS[kind]:
            raise _unknown(key, (kind, *EDIT_KEYS[kind]), f"the {kind} edit of {source!r}")
    target = ""
    if kind == "erase":
        if "guide" in d and "type" in d:
            raise PlanError(f"erase {source!r}: 'type' only chooses the default guide; give type or guide, not both")
        if "guide" in d:
            target = _str(d["guide"], f"erase {source!r}: guide")
        else:
            kind_type = d.get("type", "object")
            if kind_type not in DEFAULT_GUIDE:
                raise PlanError(f"erase {source!r}: type must be 'object' or 'style', got {kind_type!r}")
            target = DEFAULT_GUIDE[kind_type]
    elif kind == "replace":
        target = _str(d.get("with", ""), f"replace {source!r}: with")
    return Edit(
        kind=kind,
        source=source,
        target=target,
        strength=_num(d.get("strength", 1.0), f"moderate {source!r}: strength"),
        attributes=[a.strip() for a in _list(d.get("attributes", []), f"debias {source!r}: attributes")],
        ratios=_list(d.get("ratios", []), f"debias {source!r}: ratios", _num),
        alphas=None if d.get("alphas") is None else _list(d["alphas"], f"debias {source!r}: alphas", _num),
        weight=None if d.get("weight") is None else _num(d["weight"], f"{kind} {source!r}: weight"),
    )


def settings_values(d: dict) -> dict:
    """The method settings of a plan mapping: its top-level setting keys plus ``options``."""
    options = d.get("options") or {}
    if not isinstance(options, dict):
        raise PlanError(f"options must be a mapping, got {options!r}")
    top = {k: v for k, v in d.items() if k not in PLAN_KEYS}
    both = sorted(set(top) & set(options))
    if both:
        raise PlanError(f"{', '.join(both)} given both at the top level and under options; give each once")
    return {**top, **options}


def plan_from_dict(d: dict) -> EditPlan:
    if not isinstance(d, dict) or "edits" not in d:
        raise PlanError("an edit file is a mapping with an 'edits' list")
    if not isinstance(d["edits"], list):
        raise PlanError(f"edits must be a list of edits, got {d['edits']!r}")
    method = _str(d.get("method", "uce"), "method")
    values = settings_values(d)
    cls = settings_class(method)
    for key in values:  # a misspelled top-level key: suggest among plan keys and this method's settings
        if key in d and key not in all_setting_keys():
            raise _unknown(key, set(PLAN_KEYS) | set(cls.help()), "the edit file")
    settings = build_settings(method, values)
    return EditPlan(
        edits=[_edit_from_dict(e) for e in d["edits"]],
        preserve=d.get("preserve", []),
        method=method,
        templates=d.get("templates", ["{}"]),
        preserve_empty=d.get("preserve_empty", True),
        settings=settings,
    )


def read_plan_file(path: str | Path) -> dict:
    """The mapping in a YAML/JSON edit file (YAML is read with safe_load: tags stay inert)."""
    path = Path(path)
    if not path.exists():
        raise PlanError(f"edit file {path} does not exist")
    if path.is_dir():
        raise PlanError(f"edit file {path} is a folder")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise PlanError(f"cannot read edit file {path}: {e}") from None
    try:
        if path.suffix.lower() == ".json":
            return json.loads(text)
        import yaml

        return yaml.safe_load(text)
    except Exception as e:  # JSON/YAML syntax errors and unsafe tags
        raise PlanError(f"{path.name} is not valid {'JSON' if path.suffix.lower() == '.json' else 'YAML'}: "
                        f"{str(e).splitlines()[0]}") from None


def load_plan(path: str | Path) -> EditPlan:
    return plan_from_dict(read_plan_file(path))
