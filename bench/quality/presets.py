"""Text-encoder editing methods as benchmark callables: ``METHODS[name](model, plan) -> ConceptDelta``.

Each callable runs the plan's edits, preserve set and templates under the preset's method and
settings, so a benchmark can hand every method the same EditPlan (edits, preserve, templates) and get a
delta to apply with :func:`concept_edit.core.apply.apply_delta` over ``model.weights(names)``.

Presets (all cheap enough for 1,000 edits on a CPU except the ``-distill`` ones):

- ``emcid``: stage II over the default layers, alpha 0.5, targets ``dest_hidden``, C0 weight 10,000
  (the paper's; fixed here, as in every table run before the engine set it by default).
- ``emcid-auto``: the same with the package's default C0 weight, set from the edit's size
  (``cov_ratio``; ``engines/emcid.cov_weight``).
- ``emcid-distill``: the paper's full method (stage I dual self-distillation, cached per concept
  under ``cache_dir``/targets so larger edit counts reuse smaller runs' concepts).
- ``nullspace``: null-space constrained fc2 editing, projector from corpus + preserve set.
- ``nullspace-xattn``: null-space constrained cross-attention editing (UCE keys / targets).
- ``emcid+uce``: EMCID on the text encoder, then UCE on cross-attention over the edited encoder.

Every ``emcid*`` preset but ``emcid-auto`` pins C0 weight 10,000; ``name:cov_weight=W`` overrides it.

- ``emcid-t5`` / ``nullspace-t5``, ``emcid-clip`` / ``nullspace-clip`` (FLUX / SD3): the same
  methods on the T5 encoder's ``DenseReluDense.wo`` layers only, or on the CLIP encoders' ``mlp.fc2``
  only (default layers of those encoders: every read layer but the last).

Any other engine the package registers (``rece``, ``speed``, ...) runs with its own defaults plus the
overrides; it gets ``corpus`` only if its settings have one.

``corpus`` (caption list or file) is the C0 corpus; pass the testbed's caption corpus.
Bench-only option ``encoders``: "t5" | "clip" restricts ``layers`` to those encoders of the model.
"""
from __future__ import annotations

import dataclasses

from concept_edit.core.delta import ConceptDelta
from concept_edit.core.plan import EditPlan
from concept_edit.core.settings import build_settings

PAPER_C0_WEIGHT = 10000.0  # EMCID's mom2_update_weight; the engine default until session 13

PRESETS: dict[str, tuple[str, dict]] = {
    "emcid": ("emcid", {"targets": "dest_hidden", "alpha": 0.5, "cov_weight": PAPER_C0_WEIGHT}),
    "emcid-auto": ("emcid", {"targets": "dest_hidden", "alpha": 0.5}),
    "emcid-distill": ("emcid", {"targets": "distill", "alpha": 0.5, "steps": 200, "batch_concepts": 16,
                                "cov_weight": PAPER_C0_WEIGHT}),
    "nullspace": ("nullspace", {"site": "text_encoder", "projector": "both", "targets": "dest_hidden"}),
    "nullspace-xattn": ("nullspace", {"site": "cross_attention", "projector": "both", "targets": "dest_hidden"}),
    "emcid+uce": ("emcid+uce", {"targets": "dest_hidden", "alpha": 0.5, "cov_weight": PAPER_C0_WEIGHT}),
    # FLUX / SD3 text encoders, one kind at a time
    "emcid-t5": ("emcid", {"targets": "dest_hidden", "alpha": 0.5, "encoders": "t5", "cov_weight": PAPER_C0_WEIGHT}),
    "emcid-clip": ("emcid", {"targets": "dest_hidden", "alpha": 0.5, "encoders": "clip", "cov_weight": PAPER_C0_WEIGHT}),
    "nullspace-t5": ("nullspace", {"site": "text_encoder", "projector": "both", "targets": "dest_hidden", "encoders": "t5"}),
    "nullspace-clip": ("nullspace", {"site": "text_encoder", "projector": "both", "targets": "dest_hidden",
                                     "encoders": "clip"}),
}


def encoder_layers(model, kind: str) -> dict:
    """``layers`` selecting the default layers of the model's T5 (``kind`` "t5") or CLIP encoders."""
    from concept_edit.adapters.text_encoder import encoder, encoder_components, is_t5

    comps = [c for c in encoder_components(model) if is_t5(encoder(model, c)) == (kind == "t5")]
    if kind not in ("t5", "clip") or not comps:
        raise ValueError(f"this {model.family} model has no {kind!r} text encoder")
    return {c: None for c in comps}


def with_settings(plan: EditPlan, engine: str, values: dict) -> EditPlan:
    """The same edits, preserve set and templates under ``engine`` with these settings."""
    return dataclasses.replace(plan, method=engine, settings=build_settings(engine, values))


def make_method(name: str, *, corpus=None, cache_dir=None, progress: bool = False, **overrides):
    """A callable (model, plan) -> ConceptDelta for preset ``name`` (or a registered engine's name)."""
    if name not in PRESETS:
        return engine_method(name, corpus=corpus, progress=progress, **overrides)
    engine, defaults = PRESETS[name]
    defaults = {**defaults, **overrides}
    if cache_dir is not None:
        defaults.setdefault("cov_cache_dir", f"{cache_dir}/covariance")
        if defaults.get("targets") != "dest_hidden":  # dest_hidden has no stage I to cache (and refuses the setting)
            defaults.setdefault("targets_cache_dir", f"{cache_dir}/targets")

    def run(model, plan: EditPlan) -> ConceptDelta:
        values = {**defaults, **({"corpus": corpus} if corpus is not None else {})}
        kind = values.pop("encoders", None)
        if kind is not None:
            values["layers"] = encoder_layers(model, kind)
        p = with_settings(plan, engine, values)
        if engine == "emcid":
            from concept_edit.engines.emcid import emcid_delta

            return emcid_delta(model, p, progress=progress)
        if engine == "emcid+uce":
            from concept_edit.engines.emcid import emcid_uce_delta

            return emcid_uce_delta(model, p, progress=progress)
        from concept_edit.engines.nullspace import nullspace_delta

        return nullspace_delta(model, p, progress=progress)

    run.__name__ = f"method_{name}"
    return run


def engine_method(name: str, *, corpus=None, progress: bool = False, **overrides):
    """A registered engine with these settings as a bench callable; the corpus goes to engines
    whose settings take one (as the presets get it)."""
    from concept_edit.core.settings import settings_class
    from concept_edit.engines.registry import ENGINES, compute_delta

    if name not in ENGINES:
        raise KeyError(f"unknown method {name!r}; available: {', '.join([*PRESETS, *ENGINES])}")
    fields = {f.name for f in dataclasses.fields(settings_class(name))}
    values = {**({"corpus": corpus} if corpus is not None and "corpus" in fields else {}), **overrides}
    settings = build_settings(name, values)

    def run(model, plan: EditPlan) -> ConceptDelta:
        return compute_delta(model, dataclasses.replace(plan, method=name, settings=settings), progress=progress)

    run.__name__ = f"method_{name}"
    return run


METHODS = {name: make_method(name) for name in PRESETS}


def noise_scores(model, delta: ConceptDelta, pairs: list[tuple[str, str]], holdout: list[str], *, n_noise: int = 4, seed: int = 0) -> dict:
    """A classifier-free proxy of Source2Dest / Holdout Delta through the UNet's noise prediction.

    For prompts p (source) and p_hat (destination) and fixed noised latents x_t:
    ``source2dest`` = mean over pairs of 1 - |eps'(p) - eps(p_hat)| / |eps(p) - eps(p_hat)| (1: the
    edited model treats the source as the destination, 0: unchanged), ``holdout_drift`` = mean
    over holdout prompts of |eps'(h) - eps(h)| / mean |eps(p) - eps(p_hat)| (0: untouched).
    eps' is the edited model (delta applied, then removed).
    """
    import torch
    from concept_edit.adapters.text_encoder import tokenize_prompts, unet_conditioning
    from concept_edit.core.apply import apply_delta
    from concept_edit.core.prompts import Prompt

    pipe = model.pipe
    g = torch.Generator("cpu").manual_seed(seed)
    c = pipe.unet.config
    x0 = torch.randn(n_noise, c.in_channels, c.sample_size, c.sample_size, generator=g)
    t = torch.linspace(100, 900, n_noise).long()

    def eps(texts):
        out = []
        for text in texts:
            pr = tokenize_prompts(model, [Prompt(text, 0)] * n_noise)
            ehs, added, _ = unet_conditioning(model, pr)
            kw = {"added_cond_kwargs": added} if added is not None else {}
            with torch.no_grad():
                out.append(pipe.unet(x0, t, encoder_hidden_states=ehs, **kw).sample.flatten())
        return torch.stack(out)

    src, dst = [p for p, _ in pairs], [q for _, q in pairs]
    e_src, e_dst, e_hold = eps(src), eps(dst), eps(holdout)
    h = apply_delta(delta, model.weights(list(delta.layers)), check_fingerprint=False)
    try:
        f_src, f_hold = eps(src), eps(holdout)
    finally:
        h.remove()
    base = (e_src - e_dst).norm(dim=1).clamp_min(1e-12)
    s2d = (1 - (f_src - e_dst).norm(dim=1) / base).mean().item()
    drift = ((f_hold - e_hold).norm(dim=1) / base.mean()).mean().item() if holdout else 0.0
    return {"source2dest": s2d, "holdout_drift": drift}
