"""Typed settings, one class per editing method: defaults, help text, validation.

Every host builds them through :func:`build_settings` from a plain mapping — the top-level keys
and ``options:`` of an edit file, CLI flags (``--lambda``, ``--set key=value``) or node widgets —
so a setting means the same thing everywhere. A key the method does not have is an error that
names it and the valid ones; a setting given where the method cannot use it (e.g. stage I
step counts with ``targets: dest_hidden``) is refused; nothing is accepted and ignored.
:meth:`MethodSettings.effective` lists only the settings that shaped the result, which is
what a delta's metadata records.

Edit-file spelling: ``lambda`` is the field ``lam``; everything else is the field name.
"""
from __future__ import annotations

import difflib
import math
import typing
from dataclasses import MISSING, dataclass, field, fields

KEY_ALIASES = {"lambda": "lam"}  # file/CLI spelling -> field name
FIELD_SPELLING = {v: k for k, v in KEY_ALIASES.items()}


class SettingsError(ValueError):
    pass


def _f(default, help: str, *, choices: tuple | None = None, node: bool = False, min: float | None = None):
    """A settings field. ``node``: shown as a ComfyUI widget on that method's nodes."""
    meta = {"help": help, "choices": choices, "node": node, "min": min}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


def _type_ok(value, hint) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is typing.Any:
        return True
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is list:
        (item,) = typing.get_args(hint) or (typing.Any,)
        return isinstance(value, list) and all(_type_ok(v, item) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    return isinstance(value, hint)


def _type_name(hint) -> str:
    return str(hint).replace("typing.", "").replace("<class '", "").replace("'>", "")


@dataclass
class MethodSettings:
    """Base: validation shared by every method. Subclasses add fields and :meth:`check`."""

    METHOD = ""
    NOT_APPLICABLE: typing.ClassVar[dict] = {}  # keys other methods have, with why this one has not

    def __post_init__(self):
        hints = typing.get_type_hints(type(self))
        for f in fields(self):
            v = getattr(self, f.name)
            if not _type_ok(v, hints[f.name]):
                raise SettingsError(f"{self.METHOD} setting {spelling(f.name)!r} must be {_type_name(hints[f.name])}, got {v!r}")
            if isinstance(v, float) and not math.isfinite(v):
                raise SettingsError(f"{self.METHOD} setting {spelling(f.name)!r} must be finite, got {v!r}")
            if isinstance(v, int) and not isinstance(v, bool) and hints[f.name] is float:
                setattr(self, f.name, float(v))
            ch, lo = f.metadata.get("choices"), f.metadata.get("min")
            if ch and v not in ch:
                raise SettingsError(f"{self.METHOD} setting {spelling(f.name)!r} must be one of {', '.join(map(str, ch))}, got {v!r}")
            if lo is not None and v is not None and v < lo:
                raise SettingsError(f"{self.METHOD} setting {spelling(f.name)!r} must be >= {lo}, got {v!r}")
        if getattr(self, "erase_scale", 1.0) == 0:
            raise SettingsError(f"{self.METHOD}: erase_scale 0 gives the edits no weight, so nothing would change")
        self.given: frozenset = frozenset()

    def check(self, given: frozenset) -> None:
        """Cross-field rules: refuse settings that would be ignored. ``given``: keys set explicitly."""

    def inactive(self) -> set[str]:
        """Fields that do not affect the result under the current values (left out of metadata)."""
        return set()

    def effective(self) -> dict:
        """The settings in effect, under their edit-file spelling (for a delta's metadata)."""
        skip = self.inactive()
        return {spelling(f.name): getattr(self, f.name) for f in fields(self) if f.name not in skip}

    @classmethod
    def help(cls) -> dict[str, str]:
        return {spelling(f.name): f.metadata.get("help", "") for f in fields(cls)}

    def refuse(self, given, keys, why: str) -> None:
        bad = [k for k in keys if k in given]
        if bad:
            raise SettingsError(f"{self.METHOD}: {', '.join(spelling(k) for k in bad)} {'has' if len(bad) == 1 else 'have'} no effect {why}")


def spelling(name: str) -> str:
    return FIELD_SPELLING.get(name, name)


# -- the methods -------------------------------------------------------------------------------
CROSS_ATTN_LAYERS = ("kv", "v")
TOKENS = ("last", "aligned", "all")
MMDIT_ONLY_TOKENS = ("all",)  # needs a bidirectional encoder (T5): UNet models refuse it (engines/keys.py)
READERS = ("all", "context", "pooled")


@dataclass
class UCESettings(MethodSettings):
    METHOD = "uce"
    lam: float = _f(0.5, "ridge towards the original weights (lambda)", node=True, min=0.0)
    erase_scale: float = _f(1.0, "weight of the edited concepts' keys (a per-edit `weight` overrides it)", node=True, min=0.0)
    preserve_scale: float = _f(1.0, "weight of the preserved concepts' keys", node=True, min=0.0)
    token: str = _f("last", "key tokens: the last subject token, UCE's original subject-token-through-padding (aligned), "
                    "or aligned plus the tokens before the subject (all: for T5, whose states before the subject depend on "
                    "it; refused for CLIP, whose are causal)", choices=TOKENS, node=True)
    layers: str = _f("kv", "cross-attention projections to edit: to_k and to_v, or to_v only", choices=CROSS_ATTN_LAYERS, node=True)
    readers: str = _f("all", "FLUX/SD3 text readers to edit: both, the context embedder only (token states) or the pooled-text "
                      "embedder only; refused on UNet models", choices=READERS)


@dataclass
class RECESettings(MethodSettings):
    """RECE: the UCE edit, then ``epochs`` rounds of: derive each erased concept's adversarial
    embedding in closed form under the current weights and erase it too (engines/rece.py)."""

    METHOD = "rece"
    NOT_APPLICABLE = {"readers": "RECE edits UNet cross-attention (SD 1.x, 2.x, SDXL) only"}
    lam: float = _f(0.5, "the UCE edit's ridge towards the original weights (lambda; with update: resolve also every "
                    "round's)", min=0.0, node=True)
    erase_scale: float = _f(1.0, "weight of the edited concepts' keys and of their adversarial keys (a per-edit `weight` "
                            "overrides it)", min=0.0, node=True)
    preserve_scale: float = _f(1.0, "weight of the preserved concepts' keys in the UCE edit (with update: resolve also in "
                               "every round)", min=0.0, node=True)
    token: str = _f("last", "key tokens: the last subject token, or UCE's subject-token-through-padding (aligned); the "
                    "adversarial keys are taken at the same tokens", choices=("last", "aligned"), node=True)
    layers: str = _f("kv", "cross-attention projections to edit: to_k and to_v, or to_v only (the adversarial embedding "
                     "always reads both)", choices=CROSS_ATTN_LAYERS, node=True)
    epochs: int = _f(1, "rounds of attack and re-erasure after the UCE edit (official: 1 for objects and styles, 2 for "
                     "unsafe concepts, 3 for nudity); for none use uce", min=1, node=True)
    reg_lambda: float = _f(1e-3, "the paper's lambda: weight of |c'|^2 in the adversarial embedding's closed form (official "
                           "--regular_scale: 1e-3 for styles and hard objects, 0.1 for nudity and easy objects)", min=0.0, node=True)
    adv_ridge: float = _f(0.1, "each round's ridge towards the current weights (official --lamb, 0.1 in the paper's Eq. 3)",
                          min=0.0, node=True)
    adv_preserve_scale: float = _f(0.1, "weight of the preserved keys in each round (official --preserve_scale, 0.1 in "
                                   "the paper's Eq. 3)", min=0.0, node=True)
    update: str = _f("accumulate", "accumulate: each round edits the current weights with that round's adversarial keys "
                     "(the official code); resolve: each round re-solves UCE from the original weights with the concept "
                     "keys plus every round's adversarial keys", choices=("accumulate", "resolve"), node=True)

    ROUND_KEYS = ("adv_ridge", "adv_preserve_scale")

    def check(self, given):
        if self.update == "resolve":
            self.refuse(given, self.ROUND_KEYS, "with update: resolve (the rounds use lambda and preserve_scale)")

    def inactive(self):
        return set(self.ROUND_KEYS) if self.update == "resolve" else set()


@dataclass
class SPEEDSettings(MethodSettings):
    """SPEED: null-space constrained editing of cross-attention with a refined retain set (IPF, DPA)
    and invariant equality constraints (IEC) (engines/speed.py, docs/speed.md). Names and defaults are
    the official code's (train_erase_null.py)."""

    METHOD = "speed"
    NOT_APPLICABLE = {
        "lambda": "SPEED's ridge towards the original weights is retain_scale (lamb softens the invariance "
                  "constraint)",
        "preserve_scale": "the retain (preserve) set enters through the null-space projector (threshold), "
                          "not with a weight",
        "readers": "SPEED edits UNet cross-attention (SD 1.x, 2.x, SDXL) only",
    }
    retain_scale: float = _f(1.0, "ridge towards the original weights inside the null space (official "
                             "--retain_scale: 1.0; 0.05 for its 10/50/100-celebrity runs)", min=0.0, node=True)
    threshold: float = _f(0.1, "eigenvalues of the refined retain set's mean second moment below this (absolute) "
                          "span the editable null space (official --threshold)", min=0.0, node=True)
    erase_scale: float = _f(1.0, "weight of the edited concepts' keys (a per-edit `weight` overrides it); the edit "
                            "term is the mean over the edit keys, as the official code", min=0.0, node=True)
    token: str = _f("last", "key tokens: the last subject token (official), or UCE's subject-token-through-padding "
                    "(aligned; the official code uses every token for 'nudity')", choices=("last", "aligned"), node=True)
    layers: str = _f("v", "cross-attention projections to edit: to_v only (official --params V) or to_k and to_v",
                     choices=CROSS_ATTN_LAYERS, node=True)
    filter: bool = _f(True, "Influence-based Prior Filtering: keep only the retain keys the unconstrained edit "
                      "moves more than the mean (official: on unless --disable_filter)", node=True)
    aug_num: int = _f(10, "Directed Prior Augmentation: copies of each kept retain key along the layer's least "
                      "singular direction, those the edit moves more than the mean kept (official --aug_num; 0: "
                      "none)", min=0, node=True)
    seed: int = _f(0, "seed of the augmentation noise (official --seed)", node=True)
    invariant: bool = _f(True, "Invariant Equality Constraints: the null text's [SOT] state and k-means centres "
                         "of its EOS/padding states keep their outputs exactly", node=True)
    clusters: int = _f(3, "k-means centres of the null text's EOS/padding states among the invariant keys "
                       "(official: 3; 0: the [SOT] state only)", min=0, node=True)
    lamb: float = _f(0.0, "ridge of the invariance constraint: 0 holds it exactly, > 0 only approximately "
                     "(official --lamb)", min=0.0, node=True)

    def __post_init__(self):
        super().__post_init__()
        if self.retain_scale == 0:
            raise SettingsError("speed setting 'retain_scale' must be > 0 (the solve needs a ridge)")

    def check(self, given):
        if self.aug_num == 0:
            self.refuse(given, ["seed"], "with aug_num: 0 (no augmentation noise)")
        if not self.invariant:
            self.refuse(given, ["clusters", "lamb"], "with invariant: false")

    def inactive(self):
        out = set()
        if self.aug_num == 0:
            out.add("seed")
        if not self.invariant:
            out |= {"clusters", "lamb"}
        return out


@dataclass
class StageISettings(MethodSettings):
    """EMCID stage I (target values); shared by EMCID and null-space editing."""

    targets: str = _f("distill", "how target states are found: distill (EMCID's dual self-distillation), images, text, "
                      "dest_hidden (the destination's own state), refine (dest_hidden refined through the UNet)",
                      choices=("distill", "images", "text", "dest_hidden", "refine"))
    steps: int = _f(200, "stage I optimisation steps", min=1)
    lr: float = _f(0.2, "stage I Adam learning rate", min=0.0)
    text_weight: float = _f(0.01, "weight of the text-alignment loss (distill, images)", min=0.0)
    clamp: float = _f(1.5, "offset norm cap, relative to the original state's norm", min=0.0)
    weight_decay: float = _f(5e-4, "MEMIT/EMCID weight decay on the offset", min=0.0)
    images_per_concept: int = _f(2, "destination images generated per concept (distill, refine)", min=1)
    gen_steps: int = _f(20, "sampler steps for those images (distill, refine)", min=1)
    guidance: float = _f(7.5, "classifier-free guidance for those images (distill, refine)", min=0.0)
    batch_concepts: int = _f(8, "concepts optimised together", min=1)
    seed: int = _f(0, "seed for stage I noise and images")
    targets_cache_dir: str | None = _f(None, "cache folder for stage I targets (None: no cache)")
    executor: str = _f("local", "where stage I runs", choices=("local", "ray"))

    GEN_KEYS = ("images_per_concept", "gen_steps", "guidance")
    OPT_KEYS = ("steps", "lr", "clamp", "weight_decay", "batch_concepts", "targets_cache_dir", "executor")

    def stage_i_inactive(self) -> set[str]:
        """Stage I settings the chosen ``targets`` mode does not read (see engines/stage_i.py)."""
        m = self.targets
        if m == "dest_hidden":  # no optimisation at all
            return {*self.OPT_KEYS, *self.GEN_KEYS, "seed", "text_weight"}
        out = set()
        if m == "text":  # text loss only: no noise, no images, the loss weight is 1
            out |= {"seed", "text_weight"}
        if m not in ("distill", "refine"):  # only these generate destination images
            out |= set(self.GEN_KEYS)
        if m == "refine":  # UNet noise loss only
            out.add("text_weight")
        return out

    def check_stage_i(self, given) -> None:
        bad = sorted(self.stage_i_inactive() & given)
        if bad:
            raise SettingsError(f"{self.METHOD}: {', '.join(spelling(k) for k in bad)} "
                                f"{'has' if len(bad) == 1 else 'have'} no effect with targets: {self.targets}")


@dataclass
class TextEncoderSettings(StageISettings):
    """Settings of the multi-layer text-encoder editors (``mlp.fc2`` of several layers)."""

    layers: typing.Any = _f(None, "text-encoder layers: None (every read layer but the last), a list, '0-9', or "
                            "{component: spec}", node=True)
    corpus: typing.Any = _f(None, "caption corpus for C0: a list, a .txt/.json file, None (built-in captions)")
    cov_positions: str = _f("padded", "C0 token positions: all 77 padded positions the pipeline feeds, or real tokens only "
                            "(EMCID's official code, via the attention mask)", choices=("padded", "tokens"))
    cov_cache_dir: str | None = _f(None, "cache folder for C0 (None: covariance/ under $CONCEPT_EDIT_CACHE, else the host's "
                                          "cache folder (ComfyUI: models/concept_edit), else ~/.cache/concept_edit)")
    c0_exclude_edited: bool = _f(True, "leave captions naming an edited concept out of C0", node=True)
    erase_scale: float = _f(1.0, "weight of the edited concepts' keys in the solve (a per-edit `weight` overrides it)", min=0.0)
    preserve_scale: float = _f(1.0, "weight of the preserved concepts' keys (each preserved prompt's key is kept like an "
                               "edit key of this weight)", node=True, min=0.0)
    token: str = _f("last", "key token: the text-encoder editors edit at the last subject token only", choices=("last",))
    target_anchor: str = _f("mean", "which templates' states the multi-layer residual is measured on: all (mean) or the "
                            "first only (EMCID's official code)", choices=("mean", "first"))


# EMCID's C0 weight per unit of edit-key energy (cov_weight None): chosen on protocol 2's
# validation split (bench/quality/protocol2/README.md); the weight then grows with the edit count.
COV_RATIO = 10.0


@dataclass
class EMCIDSettings(TextEncoderSettings):
    METHOD = "emcid"
    NOT_APPLICABLE = {"lambda": "EMCID's regulariser is cov_weight x C0 (and alpha), not a ridge"}
    alpha: float = _f(0.5, "editing intensity in (0, 1]: weight of the edit term against C0", node=True, min=0.0)
    cov_weight: float | None = _f(None, "weight of C0 (EMCID's mom2_update_weight); None: set per layer from the edit's size, "
                                  "cov_ratio x tr(K^T K) / tr(C0) over the edit keys K, so it grows with the edit count "
                                  "(a node's 0 means None)", node=True, min=0.0)
    cov_ratio: float = _f(COV_RATIO, "with cov_weight None: the C0 weight per unit of edit-key energy, relative to C0's "
                          "(chosen on protocol 2's validation split, docs/text_encoder_editing.md)", min=0.0)
    key_mode: str = _f("mean", "one key per concept averaged over templates (the paper), or one per prompt", choices=("mean", "each"))
    targets: str = _f("distill", "how target states are found: distill (EMCID's dual self-distillation), images (given "
                      "destination images), text (text alignment only), dest_hidden (the destination's own state)",
                      choices=("distill", "images", "text", "dest_hidden"))

    def __post_init__(self):
        super().__post_init__()
        if not 0 < self.alpha <= 1:
            raise SettingsError(f"emcid setting 'alpha' must be in (0, 1], got {self.alpha}")

    def check(self, given):
        self.check_stage_i(given)
        if self.cov_weight is not None:
            self.refuse(given, ["cov_ratio"], "with a fixed cov_weight (cov_ratio sets the weight only when cov_weight is None)")
            if self.cov_weight == 0:
                raise SettingsError(f"{self.METHOD}: cov_weight 0 drops C0, the term that keeps unedited concepts; give a positive "
                                    "weight, or none to have it set from the edit's size")
        if self.cov_ratio == 0:
            raise SettingsError(f"{self.METHOD}: cov_ratio 0 drops C0, the term that keeps unedited concepts; give a positive ratio")

    def inactive(self):
        return self.stage_i_inactive() | ({"cov_ratio"} if self.cov_weight is not None else set())


@dataclass
class NullspaceSettings(TextEncoderSettings):
    METHOD = "nullspace"
    site: str = _f("text_encoder", "what is edited: text-encoder mlp.fc2 layers, or UNet cross-attention to_k/to_v",
                   choices=("text_encoder", "cross_attention"))
    lam: float = _f(1.0, "ridge of the constrained solve (lambda)", node=True, min=0.0)
    projector: str = _f("both", "whose keys the update must not touch: the caption corpus, the preserve set, or both",
                        choices=("corpus", "preserve", "both"))
    threshold: float = _f(2e-2, "eigenvalues of the preserved keys' second moment below this span the editable subspace",
                          node=True, min=0.0)
    relative: bool = _f(False, "threshold relative to the largest eigenvalue (else absolute, as AlphaEdit)", node=True)
    targets: str = _f("dest_hidden", StageISettings.__dataclass_fields__["targets"].metadata["help"],
                      choices=("distill", "images", "text", "dest_hidden", "refine"))
    key_mode: str = _f("each", "one key per prompt, or one per concept averaged over templates (text-encoder site)",
                       choices=("mean", "each"))
    token: str = _f("last", "key tokens (aligned, all: cross-attention site only)", choices=TOKENS, node=True)
    layers: typing.Any = _f(None, "text_encoder site: encoder layers (None, list, '0-9', {component: spec}); "
                            "cross_attention site: 'kv' or 'v' (None: kv)", node=True)
    history_file: str | None = _f(None, "safetensors file of earlier edits' keys (sequential editing); read and rewritten")

    def __post_init__(self):
        super().__post_init__()
        if self.site == "cross_attention":
            if self.layers is None:
                self.layers = "kv"
            if self.layers not in CROSS_ATTN_LAYERS:
                raise SettingsError(f"nullspace on cross_attention: 'layers' must be 'kv' or 'v', got {self.layers!r}")

    def check(self, given):
        self.check_stage_i(given)
        if self.site == "cross_attention":
            if self.targets not in ("dest_hidden", "refine"):
                raise SettingsError("nullspace on cross_attention: targets must be 'dest_hidden' or 'refine'")
            if self.targets == "refine" and self.token != "last":
                raise SettingsError("nullspace: UNet-guided refinement (targets: refine) needs token: last")
            self.refuse(given, ["key_mode"], "on the cross_attention site (one key per prompt)")
        elif self.token != "last":
            raise SettingsError("nullspace on the text encoder edits at the last subject token: token must be 'last'")
        if self.projector == "corpus":
            self.refuse(given, ["preserve_scale"], "with projector: corpus (the preserve set is not used)")
        if self.projector == "preserve":
            self.refuse(given, ["corpus", "cov_cache_dir", "c0_exclude_edited"], "with projector: preserve (no corpus)")
            if self.relative:
                self.refuse(given, ["preserve_scale"], "with projector: preserve and a relative threshold (it scales out)")

    def inactive(self):
        out = self.stage_i_inactive()
        if self.site == "cross_attention":
            out.add("key_mode")
        if self.projector == "preserve":
            out |= {"corpus", "cov_cache_dir", "c0_exclude_edited"}
            if self.relative:
                out.add("preserve_scale")
        if self.projector == "corpus":
            out.add("preserve_scale")
        return out


@dataclass
class EMCIDUCESettings(EMCIDSettings):
    """EMCID on the text encoder, then UCE on cross-attention over the edited encoder."""

    METHOD = "emcid+uce"
    lam: float = _f(0.5, "UCE's ridge towards the original weights (lambda)", node=True, min=0.0)
    uce_layers: str = _f("kv", "UCE's cross-attention projections", choices=CROSS_ATTN_LAYERS)

    def uce(self) -> UCESettings:
        return UCESettings(lam=self.lam, erase_scale=self.erase_scale, preserve_scale=self.preserve_scale,
                           token="last", layers=self.uce_layers)


SETTINGS: dict[str, type[MethodSettings]] = {
    "uce": UCESettings, "emcid": EMCIDSettings, "nullspace": NullspaceSettings, "emcid+uce": EMCIDUCESettings,
    "rece": RECESettings, "speed": SPEEDSettings,
}


def settings_class(method: str) -> type[MethodSettings]:
    if method not in SETTINGS:
        raise SettingsError(f"unknown method {method!r}; available: {', '.join(SETTINGS)}")
    return SETTINGS[method]


def build_settings(method: str, values: typing.Mapping | None = None) -> MethodSettings:
    """Settings of ``method`` from a mapping (edit-file spelling). Unknown keys are an error."""
    cls = settings_class(method)
    names = [f.name for f in fields(cls)]
    kw = {}
    valid = sorted(spelling(n) for n in names)
    for key, v in (values or {}).items():
        name = KEY_ALIASES.get(key, key)
        if key not in valid:
            if key in cls.NOT_APPLICABLE:
                raise SettingsError(f"method {method!r} has no setting {key!r}: {cls.NOT_APPLICABLE[key]}")
            near = difflib.get_close_matches(str(key), valid, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise SettingsError(f"method {method!r} has no setting {key!r}{hint}; its settings: {', '.join(valid)}")
        kw[name] = v
    s = cls(**kw)
    s.given = frozenset(kw)
    s.check(s.given)
    return s


def all_setting_keys() -> set[str]:
    """Every key any method accepts (edit-file spelling)."""
    return {spelling(f.name) for cls in SETTINGS.values() for f in fields(cls)}


def markdown() -> str:
    """docs/settings.md: every method's settings with defaults and help (kept in sync by a test)."""
    lines = ["# Settings", "",
             "Generated by `python -m concept_edit.core.settings > docs/settings.md`; a test keeps it in sync.", "",
             "Give settings at the top level of an edit file or under `options:` (not both), on the command line",
             "as `--lambda`, `--token`, `--layers` or `--set KEY=VALUE` (these override a `--plan`), or as node",
             "widgets. A key the method does not have, a value of the wrong type and a setting that has no",
             "effect under the others (e.g. stage I steps with `targets: dest_hidden`) are refused.", ""]
    for method, cls in SETTINGS.items():
        lines += [f"## `{method}`", "", "| setting | default | values | what |", "|---|---|---|---|"]
        for f in fields(cls):
            d = f.default if f.default is not MISSING else f.default_factory()
            ch = ", ".join(map(str, f.metadata.get("choices") or ())) or ""
            lines.append(f"| `{spelling(f.name)}` | `{d!r}` | {ch} | {f.metadata.get('help', '')} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown(), end="")
