"""What the edit nodes do, without ComfyUI's node API: one node per (method, kind), its inputs
(generated from the method's typed settings) and its run. Each takes MODEL + CLIP, never mutates
them, and returns patched clones (ComfyUI LoRA-style weight patches via ``add_patches``) plus the
CONCEPT_DELTA. The V3 node classes that ComfyUI sees are built from this in ``comfy_v3.py``.

Edits are computed against the *effective* weights: the MODEL's and CLIP's existing patches
(LoRAs, earlier edits) included, unless ``base`` is set to "original" (see
``adapters/comfy_model.py`` and docs/comfyui.md).
"""
from __future__ import annotations

import dataclasses
import math

from ..core.settings import (
    MMDIT_ONLY_TOKENS,
    SettingsError,
    build_settings,
    settings_class,
    spelling,
)
from ..engines import compute_delta
from .common import (
    debias_edits,
    edit_summary,
    erase_edits,
    make_plan,
    moderate_edits,
    parse_list,
    replace_edits,
    residual_errors,
)

# node key -> (display name, engine (plan.method), kinds, fixed settings, site).
# UCE and the null-space cross-attention site run on any EditableModel (the ComfyUI adapter);
# the text-encoder methods run on a CLIPTextModel rebuilt from the CLIP's effective weights
# (see adapters/comfy_model.text_encoder_model), with destination-state targets
# ("dest_hidden": no image generation inside a graph).
METHODS = {
    "uce": ("UCE", "uce", ("erase", "replace", "moderate", "debias"), {}, "unet"),
    "nullspace": ("Null-space", "nullspace", ("erase", "replace", "moderate"),
                  {"site": "cross_attention", "projector": "preserve"}, "unet"),
    "emcid": ("EMCID", "emcid", ("erase", "replace", "moderate"), {"targets": "dest_hidden"}, "text_encoder"),
    "nullspace_te": ("Null-space TE", "nullspace", ("erase", "replace", "moderate"),
                     {"site": "text_encoder", "targets": "dest_hidden", "projector": "preserve"}, "text_encoder"),
    # RECE attacks the concepts of erase / replace edits (a plan of only moderate or debias edits is UCE's)
    "rece": ("RECE", "rece", ("erase", "replace"), {}, "unet"),
    "speed": ("SPEED", "speed", ("erase", "replace", "moderate", "debias"), {}, "unet"),
}
WIDGET_NAMES = {"lam": "lambda_"}  # widget name -> kept from earlier releases (saved graphs use it)
OPTIONAL_NUMBER = "float | None"  # a FLOAT widget cannot be empty: its 0 means the setting's None


def _valid_choices(engine: str, fixed: dict, key: str, choices) -> list:
    """The values of a choice setting that the node's fixed settings allow."""
    out = []
    for c in choices:
        try:
            build_settings(engine, {**fixed, key: c})
            out.append(c)
        except SettingsError:
            pass
    return out


def _widget(f, engine: str, fixed: dict, site: str) -> tuple | None:
    """A ComfyUI widget for settings field ``f`` (from its type, default, choices and help), or
    None when the node's fixed settings leave it a single value."""
    meta = f.metadata
    tip = {"tooltip": meta.get("help", "")}
    key = spelling(f.name)
    choices = meta.get("choices") or (("kv", "v") if f.name == "layers" and site == "unet" else None)
    if f.name == "token":  # 'all' (T5's tokens before the subject) stays library-only
        choices = tuple(c for c in choices if c not in MMDIT_ONLY_TOKENS)
    if choices:
        ok = _valid_choices(engine, fixed, key, choices)
        return (ok, {"default": ok[0] if f.default not in ok else f.default, **tip}) if len(ok) > 1 else None
    if f.default is None and f.type == OPTIONAL_NUMBER:  # a number or unset (EMCID's cov_weight): 0 = unset
        return ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1e9, "step": 0.01, **tip})
    if f.default is None or f.type == "typing.Any":  # free-form (e.g. layer lists): text, empty = default
        return ("STRING", {"default": "", "tooltip": tip["tooltip"] + " (empty: default)"})
    if isinstance(f.default, bool):
        return ("BOOLEAN", {"default": f.default, **tip})
    lo = meta.get("min")
    if isinstance(f.default, int):
        return ("INT", {"default": f.default, "min": -(2**31) if lo is None else int(lo), "max": 2**31 - 1, **tip})
    # the frontend rounds a FLOAT widget to its step: a smaller default (RECE's reg_lambda 1e-3) needs a finer one
    step = 10.0 ** math.floor(math.log10(f.default)) if 0 < f.default < 0.01 else 0.01
    return ("FLOAT", {"default": float(f.default), "min": -1e6 if lo is None else lo, "max": 1e6, "step": step, **tip})


def setting_widgets(method_key: str) -> dict[str, tuple]:
    """The settings a node of this method shows: the method's node settings, minus those the
    node fixes, those with a single possible value and those without effect under the fixed ones."""
    _, engine, _, fixed, site = METHODS[method_key]
    cls = settings_class(engine)
    inactive = build_settings(engine, fixed).inactive()
    out = {}
    for f in dataclasses.fields(cls):
        if f.metadata.get("node") and f.name not in fixed and f.name not in inactive:
            w = _widget(f, engine, fixed, site)
            if w is not None:
                out[WIDGET_NAMES.get(f.name, f.name)] = w
    return out


def node_settings(method_key: str, widgets: dict) -> dict:
    """Settings values (edit-file spelling) from a node's widget values; empty strings mean default.

    A widget left at its setting's default is not passed as given: a node sends every widget's
    value, so otherwise a setting another one makes ineffective (RECE's adv_ridge with update:
    resolve, the null-space preserve_scale with a relative threshold) would be refused although the
    user never touched it. Changed from the default, it is refused with the reason."""
    _, engine, _, fixed, _ = METHODS[method_key]
    defaults = {f.name: f.default for f in dataclasses.fields(settings_class(engine))}
    optional_numbers = {f.name for f in dataclasses.fields(settings_class(engine)) if f.type == OPTIONAL_NUMBER}
    back = {v: k for k, v in WIDGET_NAMES.items()}
    values = dict(fixed)
    for w, v in widgets.items():
        name = back.get(w, w)
        if isinstance(v, str) and not v.strip():
            continue
        if name in optional_numbers and v == 0:
            continue
        if name not in fixed and name in defaults and _same(v, defaults[name]):
            continue
        values[spelling(name)] = v
    return values


def _same(value, default) -> bool:
    """A widget value equal to the setting's default (widgets send floats for ints and back)."""
    if isinstance(value, bool) or isinstance(default, bool):
        return type(value) is type(default) and value == default
    return value == default


# The inputs of each edit kind, before the shared ones (host-neutral widget specs).
KIND_INPUTS = {
    "erase": {
        "concepts": ("STRING", {"multiline": True, "default": "Van Gogh",
                                "tooltip": "Concepts to erase, one per line or comma-separated"}),
        "concept_type": (["style", "object"], {"default": "style",
                                               "tooltip": "Sets the default guide: 'art' for a style, the empty prompt for an object"}),
        "guide": ("STRING", {"default": "", "tooltip": "Map erased concepts onto this (empty: 'art' for styles, '' for objects)"}),
    },
    "replace": {
        "replacements": ("STRING", {"multiline": True, "default": "cat -> dog",
                                    "tooltip": "'source -> destination', one per line"}),
    },
    "moderate": {
        "concepts": ("STRING", {"multiline": True, "default": "nudity",
                                "tooltip": "Concepts to moderate, one per line or comma-separated"}),
        "moderation": ("FLOAT", {"default": 1.0, "min": 0.01, "max": 1.0, "step": 0.01,
                                 "tooltip": "How far towards the unconditional key (1 = all the way)"}),
    },
    "debias": {
        "concepts": ("STRING", {"multiline": True, "default": "doctor",
                                "tooltip": "Concepts to debias (e.g. professions), one per line or comma-separated"}),
        "attributes": ("STRING", {"default": "male, female", "tooltip": "Attributes to balance, comma-separated"}),
        "ratios": ("STRING", {"default": "0.5, 0.5", "tooltip": "Desired proportions (sum to 1)"}),
        "alphas": ("STRING", {"default": "", "tooltip": "Attribute coefficients; empty = start from the ratios"}),
    },
}
BUILD_EDITS = {"erase": erase_edits, "replace": replace_edits, "moderate": moderate_edits, "debias": debias_edits}


def edit_inputs(method_key: str, kind: str) -> list[tuple[str, tuple | None, bool]]:
    """The inputs of an edit node, in order: ``(name, widget spec, optional)``; the spec is None for
    the MODEL and CLIP sockets. The order is what saved UI-format workflows store widget values by
    (positionally), so it keeps that of earlier releases: kind inputs, preserve, lambda, strength |
    scales, token, templates, layers, base, with the inputs a method does not use left out."""
    site = METHODS[method_key][4]
    settings = setting_widgets(method_key)
    req: dict = dict(KIND_INPUTS[kind])
    req["preserve"] = ("STRING", {"multiline": True, "default": "",
                                  "tooltip": "Concepts to keep unchanged, one per line or comma-separated "
                                             "(quote a name that contains a comma)"})
    if "lambda_" in settings:
        req["lambda_"] = settings.pop("lambda_")
    req["strength"] = ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01,
                                 "tooltip": "Patch strength, as on a LoRA loader"})
    templates = ("STRING", {"multiline": True, "default": "{}",
                            "tooltip": "Prompt templates, one per line, each with one {}"})
    opt: dict = {}
    for name, spec in settings.items():
        if name == "layers":
            opt["templates"] = templates
        opt[name] = spec
    opt.setdefault("templates", templates)
    if site == "unet":  # text-encoder edits always see the CLIP's own patches
        opt["base"] = (["patched", "original"], {"default": "patched",
                                                 "tooltip": "Compute against the weights with earlier patches "
                                                            "(LoRAs, edits) applied, or the checkpoint's"})
    return ([("model", None, False), ("clip", None, False)] + [(k, v, False) for k, v in req.items()]
            + [(k, v, True) for k, v in opt.items()])


def edit_node(method_key: str, kind: str, model, clip, *, preserve: str = "", strength: float = 1.0,
              templates: str = "{}", base: str = "patched", **kw):
    """What an edit node does with its input values: ``(model clone, clip clone, delta)`` and the
    UI summary, as returned by :func:`run_edit`."""
    widgets = {k: kw.pop(k) for k in list(kw) if k in setting_widgets(method_key)}
    edits = BUILD_EDITS[kind](**kw)
    _, engine, kinds, _, site = METHODS[method_key]
    if kind not in kinds:
        raise ValueError(f"{METHODS[method_key][0]} has no {kind} node")
    tpl = [t.strip() for t in (templates or "").splitlines() if t.strip()] or ["{}"]
    plan = make_plan(edits, engine, parse_list(preserve), tpl, node_settings(method_key, widgets))
    return run_edit(model, clip, plan, strength=strength, base=base, site=site)


def run_edit(model, clip, plan, *, strength: float = 1.0, base: str = "patched", site: str = "unet"):
    """Compute ``plan`` on (model, clip) and return the node result with its UI summary."""
    from ..adapters.comfy_host import comfy_host
    from ..adapters.comfy_mmdit import comfy_editable_model, mmdit_family
    from ..adapters.comfy_text_encoder import text_encoder_model
    from .patches import apply_to_comfy

    if site == "text_encoder":
        if model is not None and mmdit_family(model):
            raise ValueError(f"{plan.method} edits the CLIP text encoders of SD 1.x, 2.x and SDXL; a "
                             f"{mmdit_family(model)} model is edited with the UCE nodes (its text readers)")
        em = text_encoder_model(clip, model)
        base = "patched"  # the CLIP's own patches are always included
    else:  # FLUX / SD3 MODELs: their text readers (adapters/comfy_mmdit.py); else UNet cross-attention
        em = comfy_editable_model(model, clip, base=base)
    with comfy_host():  # ComfyUI's progress bar (and Cancel) for every phase; caches in models/concept_edit
        delta = compute_delta(em, plan, progress=False)
    delta.metadata.setdefault("comfyui", {})["base"] = base
    try:
        errors = residual_errors(em, plan, delta)
    except Exception:  # a summary must never fail the edit
        errors = {}
    new_model, new_clip, info = apply_to_comfy(delta, model, clip, strength_model=strength, strength_clip=strength)
    summary = edit_summary(delta, plan, errors, {"strength": strength, "base": base, "patched": info})
    return {"ui": {"concept_edit": [summary]}, "result": (new_model, new_clip, delta)}


def edit_node_ids() -> dict[str, tuple[str, str, str, str]]:
    """node id -> (method key, kind, display name, description) of every edit node. The ids are
    what saved workflows refer to: keep them."""
    out = {}
    for method, (label, _, kinds, _, site) in METHODS.items():
        where = "the UNet's cross-attention" if site == "unet" else "the text encoders' MLP layers"
        for kind in kinds:
            node_id = f"ConceptEdit{label.replace('-', '').replace(' ', '')}{kind.capitalize()}"
            out[node_id] = (method, kind, f"{label} {kind.capitalize()} (ConceptEdit)",
                            f"{label} {kind}: closed-form edit of {where}")
    return out
