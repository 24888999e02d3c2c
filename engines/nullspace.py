"""Null-space constrained editing engine (AlphaEdit adapted to CLIP / cross-attention).

Two sites (``plan.options["site"]``):

- ``text_encoder`` (default): ``mlp.fc2`` of the selected text-encoder layers, with the same
  multi-layer MEMIT-style spreading as EMCID (:func:`.multilayer.spread_edit`); the per-layer
  update is :func:`.solvers.nullspace.nullspace_solve_layer` with the projector built from the
  fc2-input second moment of the preserved keys.
- ``cross_attention``: every UNet ``attn2.to_k`` / ``attn2.to_v`` (``plan.layers``: kv | v),
  keys and targets chosen as in UCE (:func:`.uce.edit_keys_and_targets`); the projector is
  built from the UNet-read text states of the preserved keys. The right factor depends only on
  the keys, so it is solved once and shared by every layer.

Projector (``projector``): ``corpus`` (C0 over the caption corpus, cached like EMCID's),
``preserve`` (the plan's preserve concepts in every template, all token positions, plus "" if
``preserve_empty``) or ``both`` (default: sum of the two mean second moments). Eigenvectors of
that matrix whose eigenvalues fall below ``threshold`` (default 1e-3, relative to the largest
eigenvalue unless ``relative: false``) span the editable subspace; its dimension (kept rank)
the fraction of the edit keys' energy inside it (coverage) and of the preserved keys' energy
inside it (leakage: how far "P K0 = 0" holds) are reported in the metadata.

Targets (``targets``): ``dest_hidden`` (default; the destination concept's state, as UCE /
the write-up's naive choice), ``refine`` (UNet-guided refinement: start from it and optimise
so the UNet's noise prediction for the edited prompt matches the destination prompt's), or any
EMCID stage I mode for the text-encoder site. Other options: ``lam`` (ridge, 1.0), ``layers``,
``corpus``, ``cov_cache_dir``, ``cov_positions``, ``c0_exclude_edited`` (True: captions naming an
edited concept are left out of C0, see :mod:`.covariance`), ``key_mode`` ("each"), stage I settings.

Sequential editing: pass an :class:`~.solvers.nullspace.EditHistory` (or ``history_file``, a
safetensors file kept between runs); earlier edits' keys Kp enter the solve (so new edits do not
undo them) and this edit's keys are added to it.
"""
from __future__ import annotations

import time

import torch

from ..adapters.text_encoder import TEXT_STATES, fc2_name, resolve_layers
from ..core.delta import ConceptDelta, LayerDelta
from ..core.plan import EditPlan
from ..core.prompts import expand
from ..solvers.nullspace import EditHistory, null_space_projector, nullspace_solve_layer
from .emcid import _base_meta, plan_requests, stage_i_config
from .multilayer import spread_edit
from .second_moments import _compute, c0_exclusions, second_moments
from .stage_i import compute_targets


def _preserve_captions(plan: EditPlan) -> list[str]:
    caps = [p.text for c in plan.preserve for p in expand(c, plan.templates)]
    if plan.preserve_empty:
        caps.append("")
    return caps


def _preserve_moments(model, plan, names, positions):
    caps = _preserve_captions(plan)
    if not caps:
        return {}
    moments, _ = _compute(model, caps, names, batch_size=64, positions=positions, progress=False)
    return moments


def projectors(model, plan: EditPlan, names: list[str], *, progress: bool = True):
    """{name: NullSpaceProjector} and info, from the plan's ``projector`` source and threshold."""
    o = plan.options
    source = o.get("projector", "both")
    if source not in ("corpus", "preserve", "both"):
        raise ValueError("projector must be 'corpus', 'preserve' or 'both'")
    positions = o.get("cov_positions", "padded")
    C = {n: None for n in names}
    info: dict = {"projector": source}
    if source in ("corpus", "both"):
        c0, cinfo = second_moments(
            model, names, o.get("corpus"), cache_dir=o.get("cov_cache_dir"), positions=positions, progress=progress, exclude=c0_exclusions(plan)
        )
        info["covariance"] = {k: v for k, v in cinfo.items() if k != "computed"}
        C = {n: c0[n].double() for n in names}
    if source in ("preserve", "both"):
        pm = _preserve_moments(model, plan, names, positions)
        if not pm and source == "preserve":
            raise ValueError("projector 'preserve' needs preserve concepts (or preserve_empty)")
        for n, m in pm.items():
            C[n] = m.double() if C[n] is None else C[n] + m.double()
    thr = float(o.get("threshold", 1e-3))
    rel = bool(o.get("relative", True))
    P = {n: null_space_projector(C[n], threshold=thr, relative=rel) for n in names}
    info.update(threshold=thr, relative=rel)
    return P, info


def save_history(history: EditHistory, path) -> None:
    """Write an EditHistory (Gram matrices + key counts) as safetensors."""
    import json

    from safetensors.torch import save_file

    from ..core.atomic import atomic_path

    with atomic_path(path, True) as tmp:
        save_file({k: v.contiguous() for k, v in history.grams.items()}, str(tmp), metadata={"counts": json.dumps(history.counts)})


def load_history(path) -> EditHistory:
    import json

    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        counts = json.loads((f.metadata() or {}).get("counts", "{}"))
        grams = {k: f.get_tensor(k) for k in f.keys()}
    return EditHistory.from_state_dict(grams, counts)


def nullspace_delta(
    model,
    plan: EditPlan,
    *,
    history: EditHistory | None = None,
    images: dict | None = None,
    progress: bool = True,
) -> ConceptDelta:
    """Null-space constrained edit of ``plan`` as a ConceptDelta (model untouched).

    Sequential editing: pass ``history`` (updated in place), or set ``options.history_file``:
    the file is loaded if it exists, used, and rewritten with this edit's keys added.
    """
    from pathlib import Path

    site = plan.options.get("site", "text_encoder")
    hfile = plan.options.get("history_file")
    if history is None and hfile:
        history = load_history(hfile) if Path(hfile).exists() else EditHistory()
    if site == "text_encoder":
        delta = _text_encoder(model, plan, history, images, progress)
    elif site == "cross_attention":
        delta = _cross_attention(model, plan, history, progress)
    else:
        raise ValueError(f"null-space site must be 'text_encoder' or 'cross_attention', got {site!r}")
    if hfile:
        save_history(history, hfile)
    return delta


def _text_encoder(model, plan, history, images, progress):
    t0 = time.perf_counter()
    o = plan.options
    lam = float(o.get("lam", 1.0))
    layers = resolve_layers(model, o.get("layers"))
    names = [fc2_name(c, l) for c, ls in layers.items() for l in ls]
    P, pinfo = projectors(model, plan, names, progress=progress)
    cfg = stage_i_config(plan, default_mode="dest_hidden")
    st1 = compute_targets(
        model, plan_requests(plan, images), plan.templates, layers, cfg,
        cache_dir=o.get("targets_cache_dir"), executor=o.get("executor", "local"), progress=progress,
    )

    def solve(name, K, R):
        sol = nullspace_solve_layer(K, R, P[name], history_gram=history.gram(name) if history else None, lam=lam)
        if history is not None:
            history.add(name, K)
        return sol.up, sol.down, {
            "kept_rank": sol.kept_rank, "dim": P[name].dim, "coverage": round(sol.coverage, 6),
            "condition": sol.report.condition, "ridge": sol.report.jitter,
        }

    out, report = spread_edit(model, plan, layers, st1.deltas, solve, key_mode=o.get("key_mode", "each"), progress=progress)
    hyper = {"site": "text_encoder", "lam": lam, "layers": layers, "templates": plan.templates, "key_mode": o.get("key_mode", "each"),
             "stage_i": vars(cfg), **{k: v for k, v in pinfo.items() if k != "covariance"}}
    meta = _base_meta(model, plan, "nullspace", hyper, out, t0, {
        "kept_rank": {n: P[n].kept_rank for n in names},
        "leakage": {n: P[n].leakage for n in names},
        "covariance": pinfo.get("covariance"),
        "stage_i": {"steps_run": st1.steps_run, "cached": st1.cached, "computed": st1.computed},
        "layers_report": report,
        "history_keys": len(history) if history is not None else None,
    })
    return ConceptDelta(out, meta)


def _cross_attention(model, plan, history, progress):
    from .uce import edit_keys_and_targets, edit_layers

    t0 = time.perf_counter()
    o = plan.options
    lam = float(o.get("lam", 1.0))
    enc, K, T, _w = edit_keys_and_targets(model, plan)
    K, T = K.double(), T.double()
    mode = o.get("targets", "dest_hidden")
    steps_run = 0
    if mode not in ("dest_hidden", "refine"):
        raise ValueError("cross-attention null-space targets are 'dest_hidden' or 'refine'")
    if mode == "refine":
        if plan.token != "last":
            raise ValueError("UNet-guided refinement needs token: last")
        cfg = stage_i_config(plan, default_mode="refine")
        reqs = plan_requests(plan)
        st1 = compute_targets(model, reqs, plan.templates, {TEXT_STATES: []}, cfg, cache_dir=o.get("targets_cache_dir"), progress=progress)
        owner = torch.arange(len(reqs)).repeat_interleave(len(plan.templates))
        T = K + st1.deltas[TEXT_STATES].double()[owner]
        steps_run = st1.steps_run
    P, pinfo = projectors(model, plan, [TEXT_STATES], progress=progress)
    proj = P[TEXT_STATES]
    gram = history.gram(TEXT_STATES) if history else None
    # one shared right factor: the residual of layer W0 is (T - K) W0^T, the solve depends on K only
    sol = nullspace_solve_layer(K, torch.zeros(K.shape[0], 1, dtype=K.dtype), proj, history_gram=gram, lam=lam)
    if history is not None:
        history.add(TEXT_STATES, K)
    layers = edit_layers(model, plan)
    out = {}
    left = (T - K).mT  # d x n
    for name, W in layers.items():
        up = W.detach().double() @ left
        out[name] = LayerDelta(up.float(), sol.down.float()).compact()
    hyper = {"site": "cross_attention", "lam": lam, "token": plan.token, "templates": plan.templates, "layers": plan.layers,
             "targets": mode, **{k: v for k, v in pinfo.items() if k != "covariance"}}
    meta = _base_meta(model, plan, "nullspace", hyper, out, t0, {
        "kept_rank": {TEXT_STATES: proj.kept_rank},
        "leakage": {TEXT_STATES: proj.leakage},
        "coverage": round(sol.coverage, 6),
        "covariance": pinfo.get("covariance"),
        "condition": sol.report.condition,
        "ridge": sol.report.jitter,
        "n_edit_keys": int(K.shape[0]),
        "stage_i": {"steps_run": steps_run},
        "history_keys": len(history) if history is not None else None,
    })
    return ConceptDelta(out, meta)
