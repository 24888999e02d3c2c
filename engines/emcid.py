"""EMCID engine: an EditPlan on a DiffusersModel -> ConceptDelta over text-encoder ``mlp.fc2`` layers.

Stage I (:mod:`.emcid_targets`) gives, per concept, an offset of the hidden state at the output
of the last edited layer L at the last subject token. Stage II (:mod:`.solvers.emcid`) writes
those targets into ``mlp.fc2`` of every edited layer, shallow to deep, MEMIT-style:

    for the i-th of n edited layers l:
        K   = fc2 inputs of layer l at the subject tokens   (recomputed: earlier layers edited)
        z   = hidden state after layer L at the subject tokens (recomputed the same way)
        R   = (z* - z) / (n - i)                            (residual spread over remaining layers)
        D_l = alpha R^T K [(1 - alpha) w C0_l + alpha K^T K]^{-1}

Note on the residual: MEMIT measures z at the last edited layer L for every l (implemented
here). The public EMCID code (``execute_emcid_*``) instead compares z* with the output of the
*current* layer's fc2 module, which mixes a residual-stream quantity with an MLP output; we
follow MEMIT's definition, under which alpha -> 1 drives z to z* exactly.

Options (``plan.options``): ``alpha`` (0.5), ``layers`` (None = every read layer but the last;
list, "0-9" string, or {component: spec}), ``cov_weight`` (10000, EMCID's mom2_update_weight:
C0 is the mean second moment times this), ``corpus`` (caption list / file; None = built-in
captions), ``c0_exclude_edited`` (True: captions naming an edited concept are left out of C0,
see :mod:`.covariance`), ``cov_positions`` ("padded"), ``cov_cache_dir``, ``targets`` (stage I mode:
distill | images | text | dest_hidden | refine; default distill), ``steps``, ``lr``,
``text_weight``, ``clamp``, ``images_per_concept``, ``gen_steps``, ``batch_concepts``, ``seed``,
``targets_cache_dir``, ``executor`` (local | ray), ``key_mode`` ("mean": one key per concept,
averaged over templates, as in the paper; "each": one per prompt).
"""
from __future__ import annotations

import time

from ..adapters.text_encoder import fc2_name, resolve_layers
from ..core.apply import apply_delta, base_fingerprint
from ..core.delta import ConceptDelta
from ..core.plan import EditPlan
from ..core.version import __version__
from ..solvers.emcid import emcid_solve_layer
from .multilayer import spread_edit
from .stage_i import StageIConfig, TargetRequest, compute_targets

STAGE_I_KEYS = ("steps", "lr", "text_weight", "clamp", "weight_decay", "images_per_concept", "gen_steps", "guidance", "batch_concepts", "seed")


def plan_requests(plan: EditPlan, images: dict | None = None) -> list[TargetRequest]:
    images = images or {}
    out = []
    for e in plan.edits:
        if e.kind == "debias":
            raise ValueError("debias edits are not supported by the text-encoder methods; use method: uce")
        dest = "" if e.kind == "moderate" else e.target
        strength = e.strength if e.kind == "moderate" else 1.0
        out.append(TargetRequest(e.source, dest, strength, images.get(e.source)))
    return out


def stage_i_config(plan: EditPlan, default_mode: str = "distill") -> StageIConfig:
    o = plan.options
    kw = {k: type(getattr(StageIConfig, k))(o[k]) for k in STAGE_I_KEYS if k in o}
    return StageIConfig(mode=o.get("targets", default_mode), **kw)


def _base_meta(model, plan, method, hyper, layers_delta, t0, extra):
    names = list(layers_delta)
    meta = {
        "method": method,
        "family": model.family,
        "edits": [vars(e) for e in plan.edits],
        "preserve": plan.preserve,
        "hyperparameters": hyper,
        **base_fingerprint(model, names),
        "concept_edit_version": __version__,
    }
    meta.update(extra)
    meta["seconds"] = {"total": round(time.perf_counter() - t0, 4)}
    return meta


def emcid_delta(
    model,
    plan: EditPlan,
    *,
    images: dict | None = None,
    progress: bool = True,
) -> ConceptDelta:
    """EMCID (stage I targets + stage II multi-layer closed form) as a ConceptDelta; model untouched.

    ``images`` maps a source concept to destination images for stage I mode ``images``.
    """
    from .second_moments import c0_exclusions, excludes_edited, second_moments

    t0 = time.perf_counter()
    o = plan.options
    alpha = float(o.get("alpha", 0.5))
    cov_weight = float(o.get("cov_weight", 10000.0))
    layers = resolve_layers(model, o.get("layers"))
    names = [fc2_name(c, l) for c, ls in layers.items() for l in ls]
    C0, cov_info = second_moments(
        model, names, o.get("corpus"), cache_dir=o.get("cov_cache_dir"), positions=o.get("cov_positions", "padded"), progress=progress,
        exclude=c0_exclusions(plan),
    )
    t_cov = time.perf_counter() - t0
    cfg = stage_i_config(plan)
    reqs = plan_requests(plan, images)
    st1 = compute_targets(
        model, reqs, plan.templates, layers, cfg, cache_dir=o.get("targets_cache_dir"), executor=o.get("executor", "local"), progress=progress
    )
    t_targets = time.perf_counter() - t0 - t_cov

    def solve(name, K, R):
        sol = emcid_solve_layer(K, R, cov_weight * C0[name].double(), alpha=alpha)
        return sol.up, sol.down, {"condition": sol.report.condition, "ridge": sol.report.jitter, "rank": int(K.shape[0])}

    out, report = spread_edit(model, plan, layers, st1.deltas, solve, key_mode=o.get("key_mode", "mean"), progress=progress)
    hyper = {
        "alpha": alpha,
        "cov_weight": cov_weight,
        "layers": layers,
        "templates": plan.templates,
        "key_mode": o.get("key_mode", "mean"),
        "stage_i": vars(cfg),
        "cov_positions": o.get("cov_positions", "padded"),
        "c0_exclude_edited": excludes_edited(plan),
    }
    meta = _base_meta(
        model, plan, "emcid", hyper, out, t0,
        {
            "covariance": {k: v for k, v in cov_info.items() if k != "computed"},
            "stage_i": {"steps_run": st1.steps_run, "cached": st1.cached, "computed": st1.computed},
            "layers_report": report,
        },
    )
    meta["seconds"] = {"covariance": round(t_cov, 4), "targets": round(t_targets, 4), "total": round(time.perf_counter() - t0, 4)}
    return ConceptDelta(out, meta)


def emcid_uce_delta(model, plan: EditPlan, *, images: dict | None = None, progress: bool = True) -> ConceptDelta:
    """EMCID on the text encoder, then UCE on cross-attention computed on the EMCID-edited encoder
    (so UCE sees the source keys as EMCID left them); the two deltas stacked."""
    from .uce import uce_delta

    d1 = emcid_delta(model, plan, images=images, progress=progress)
    h = apply_delta(d1, model.weights(list(d1.layers)), check_fingerprint=False)
    try:
        d2 = uce_delta(model, plan, progress=progress)
    finally:
        h.remove()
    out = d1.stacked(d2)
    out.metadata.update(method="emcid+uce", family=model.family, edits=d1.metadata["edits"], concept_edit_version=__version__)
    names = list(out.layers)
    out.metadata.update(base_fingerprint(model, names))
    return out
