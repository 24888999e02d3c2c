"""Text-encoder editing methods as benchmark callables: ``METHODS[name](model, plan) -> ConceptDelta``.

Each callable fills in method options the plan does not set (the plan's own ``options`` win),
so a benchmark can hand every method the same EditPlan (edits, preserve, templates) and get a
delta to apply with :func:`concept_edit.apply.apply_delta` over ``layer_weights(model, names)``
(text-encoder names need :func:`concept_edit.text_encoder_edit.layer_weights` until the
diffusers adapter maps ``text_model.`` names under transformers >= 5).

Presets (all cheap enough for 1,000 edits on a CPU except the ``-distill`` ones):

- ``emcid``: stage II over the default layers, alpha 0.5, targets ``dest_hidden``.
- ``emcid-distill``: the paper's full method (stage I dual self-distillation, cached per concept
  under ``cache_dir``/targets so larger edit counts reuse smaller runs' concepts).
- ``nullspace``: null-space constrained fc2 editing, projector from corpus + preserve set.
- ``nullspace-xattn``: null-space constrained cross-attention editing (UCE keys / targets).
- ``emcid+uce``: EMCID on the text encoder, then UCE on cross-attention over the edited encoder.

``corpus`` (caption list or file) is the C0 corpus; pass the testbed's caption corpus.
"""
from __future__ import annotations

import copy

from .delta import ConceptDelta
from .edits import EditPlan

PRESETS: dict[str, tuple[str, dict]] = {
    "emcid": ("emcid", {"targets": "dest_hidden", "alpha": 0.5}),
    "emcid-distill": ("emcid", {"targets": "distill", "alpha": 0.5, "steps": 200, "batch_concepts": 16}),
    "nullspace": ("nullspace", {"site": "text_encoder", "projector": "both", "targets": "dest_hidden"}),
    "nullspace-xattn": ("nullspace", {"site": "cross_attention", "projector": "both", "targets": "dest_hidden"}),
    "emcid+uce": ("emcid+uce", {"targets": "dest_hidden", "alpha": 0.5}),
}


def with_options(plan: EditPlan, defaults: dict, **extra) -> EditPlan:
    p = copy.copy(plan)
    p.options = {**defaults, **{k: v for k, v in extra.items() if v is not None}, **plan.options}
    return p


def make_method(name: str, *, corpus=None, cache_dir=None, progress: bool = False, **overrides):
    """A callable (model, plan) -> ConceptDelta for preset ``name``."""
    if name not in PRESETS:
        raise KeyError(f"unknown method {name!r}; available: {', '.join(PRESETS)}")
    engine, defaults = PRESETS[name]
    defaults = {**defaults, **overrides}
    if cache_dir is not None:
        defaults.setdefault("cov_cache_dir", f"{cache_dir}/covariance")
        defaults.setdefault("targets_cache_dir", f"{cache_dir}/targets")

    def run(model, plan: EditPlan) -> ConceptDelta:
        p = with_options(plan, defaults, corpus=corpus)
        p.method = engine
        if engine == "emcid":
            from .emcid_edit import emcid_delta

            return emcid_delta(model, p, progress=progress)
        if engine == "emcid+uce":
            from .emcid_edit import emcid_uce_delta

            return emcid_uce_delta(model, p, progress=progress)
        from .nullspace_edit import nullspace_delta

        return nullspace_delta(model, p, progress=progress)

    run.__name__ = f"method_{name}"
    return run


METHODS = {name: make_method(name) for name in PRESETS}
