"""Null-space constrained editing engine (AlphaEdit adapted to CLIP / cross-attention).

Settings: :class:`~..core.settings.NullspaceSettings`. Two sites (``site``):

- ``text_encoder`` (default): ``mlp.fc2`` of the selected text-encoder layers, with the same
  multi-layer MEMIT-style spreading as EMCID (:func:`.multilayer.spread_edit`); the per-layer
  update is :func:`..solvers.nullspace.nullspace_solve_layer` with the projector built from the
  fc2-input second moment of the preserved keys.
- ``cross_attention``: every UNet ``attn2.to_k`` / ``attn2.to_v`` (``layers``: kv | v), keys and
  targets chosen as in UCE (:func:`.uce.edit_keys_and_targets`); the projector is built from the
  UNet-read text states of the preserved keys. The right factor depends only on the keys, so it is
  solved once and shared by every layer.

Projector (``projector``): ``corpus`` (C0 over the caption corpus, cached like EMCID's),
``preserve`` (the plan's preserve concepts in every template, all token positions, plus "" if
``preserve_empty``) or ``both`` (default: C0 + ``preserve_scale`` x the preserve set's mean second
moment). The preserve set is kept through the projector (that is its meaning here); ``projector:
corpus`` with preserve concepts is refused. Eigenvectors whose eigenvalues fall below
``threshold`` (default AlphaEdit's absolute 2e-2, chosen by the sweep in
bench/quality/nullspace_threshold; ``relative: true`` makes it a fraction of the largest
eigenvalue) span the editable subspace. The metadata reports its dimension (kept rank), the share
of the edit keys' energy inside it (coverage), the share of the preserved keys' energy inside it
(leakage), and ``preserve_drift``: the measured relative change of the preserve set's outputs
(text-encoder site: the UNet-read text states; cross-attention: the to_k/to_v outputs).

The edit term weighs each concept's keys by its ``weight`` (else ``erase_scale``); ``lambda`` is
the ridge of the constrained solve.

Targets (``targets``): ``dest_hidden`` (default; the destination concept's state, as UCE),
``refine`` (UNet-guided refinement: start from it and optimise so the UNet's noise prediction for
the edited prompt matches the destination prompt's), or any EMCID stage I mode for the
text-encoder site.

Sequential editing: pass an :class:`~..solvers.nullspace.EditHistory` (or ``history_file``, a
safetensors file kept between runs); earlier edits' keys Kp enter the solve (so new edits do not
undo them) and this edit's keys are added to it.
"""
from __future__ import annotations

import time

import torch

from ..adapters.text_encoder import TEXT_STATES, fc2_name, resolve_layers
from ..core.delta import ConceptDelta, LayerDelta
from ..core.plan import EditPlan, PlanError
from ..core.progress import tqdm
from ..core.prompts import expand
from ..solvers.nullspace import EditHistory, null_space_projector, nullspace_solve_layer
from .metadata import delta_metadata
from .multilayer import check_mmdit_text_encoder, is_mmdit, spread_edit
from .second_moments import c0_exclusions, caption_moments, second_moments
from .stage_i import compute_targets, requests_for, stage_i_config


def _preserve_captions(plan: EditPlan) -> list[str]:
    caps = [p.text for c in plan.preserve for p in expand(c, plan.templates)]
    if plan.preserve_empty:
        caps.append("")
    return caps


def _preserve_moments(model, plan, names, positions):
    caps = _preserve_captions(plan)
    if not caps:
        return {}
    moments, _, _ = caption_moments(model, caps, names, batch_size=64, positions=positions, progress=False)
    return moments


def projectors(model, plan: EditPlan, names: list[str], *, progress: bool = True):
    """{name: NullSpaceProjector} and info, from the settings' ``projector`` source and threshold."""
    s = plan.settings
    source = s.projector
    if source == "corpus" and plan.preserve:
        raise ValueError("nullspace: projector 'corpus' does not use the preserve set "
                         f"({', '.join(plan.preserve)}); use projector: both, or drop preserve")
    C = {n: None for n in names}
    info: dict = {"projector": source}
    if source in ("corpus", "both"):
        c0, cinfo = second_moments(
            model, names, s.corpus, cache_dir=s.cov_cache_dir, positions=s.cov_positions, progress=progress, exclude=c0_exclusions(plan)
        )
        info["covariance"] = {k: v for k, v in cinfo.items() if k != "computed"}
        C = {n: c0[n].double() for n in names}
    if source in ("preserve", "both"):
        pm = _preserve_moments(model, plan, names, s.cov_positions)
        if not pm and source == "preserve":
            raise ValueError("projector 'preserve' needs preserve concepts (or preserve_empty)")
        for n, m in pm.items():
            m = s.preserve_scale * m.double()
            C[n] = m if C[n] is None else C[n] + m
    # one eigendecomposition per layer (3072 x 3072 for SD 1.x fc2): slow enough to show
    P = {n: null_space_projector(C[n], threshold=s.threshold, relative=s.relative)
         for n in tqdm(names, desc="null-space projectors", disable=not progress or len(names) < 2, leave=False)}
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

    site = plan.settings.site
    hfile = plan.settings.history_file
    if history is None and hfile:
        history = load_history(hfile) if Path(hfile).exists() else EditHistory()
    if is_mmdit(model) and site != "text_encoder":
        raise PlanError(f"nullspace on {model.family} models edits the text encoders (site: text_encoder); their "
                        "transformer has no cross-attention reading fixed text states: use uce for its text readers")
    check_mmdit_text_encoder(model, plan, "nullspace")
    if site == "text_encoder":
        delta = _text_encoder(model, plan, history, images, progress)
    else:
        delta = _cross_attention(model, plan, history, progress)
    if hfile:
        save_history(history, hfile)
    return delta


def _text_encoder(model, plan, history, images, progress):
    t0 = time.perf_counter()
    s = plan.settings
    layers = resolve_layers(model, s.layers)
    names = [fc2_name(c, l, model) for c, ls in layers.items() for l in ls]
    P, pinfo = projectors(model, plan, names, progress=progress)
    st1 = compute_targets(
        model, requests_for(plan, images), plan.templates, layers, stage_i_config(s),
        cache_dir=s.targets_cache_dir, executor=s.executor, progress=progress,
    )

    def solve(name, K, R, w, _Kp):
        sol = nullspace_solve_layer(K, R, P[name], history_gram=history.gram(name) if history else None, lam=s.lam, weights=w)
        if history is not None:
            history.add(name, K)
        return sol.up, sol.down, {
            "kept_rank": sol.kept_rank, "dim": P[name].dim, "coverage": round(sol.coverage, 6),
            "condition": sol.report.condition, "ridge": sol.report.jitter,
        }

    # the preserve set is kept by the projector, not by extra keys in the solve
    out, report = spread_edit(model, plan, layers, st1.deltas, solve, key_mode=s.key_mode, anchor=s.target_anchor, progress=progress)
    delta = ConceptDelta(out, {})
    delta.metadata = delta_metadata(model, plan, "nullspace", out, t0,
        layers=layers,
        kept_rank={n: P[n].kept_rank for n in names},
        leakage={n: P[n].leakage for n in names},
        preserve_drift=preserve_drift(model, plan, delta),
        covariance=pinfo.get("covariance"),
        stage_i={"steps_run": st1.steps_run, "cached": st1.cached, "computed": st1.computed},
        layers_report=report,
        history_keys=len(history) if history is not None else None,
        **({"max_sequence_length": model.max_sequence_length} if is_mmdit(model) else {}),
    )
    return delta


def _cross_attention(model, plan, history, progress):
    from .uce import edit_keys_and_targets, edit_layers

    t0 = time.perf_counter()
    s = plan.settings
    enc, K, T, w = edit_keys_and_targets(model, plan)
    K, T = K.double(), T.double()
    steps_run = 0
    if s.targets == "refine":
        reqs = requests_for(plan)
        st1 = compute_targets(model, reqs, plan.templates, {TEXT_STATES: []}, stage_i_config(s), cache_dir=s.targets_cache_dir,
                              executor=s.executor, progress=progress)
        owner = torch.arange(len(reqs)).repeat_interleave(len(plan.templates))
        T = K + st1.deltas[TEXT_STATES].double()[owner]
        steps_run = st1.steps_run
    P, pinfo = projectors(model, plan, [TEXT_STATES], progress=progress)
    proj = P[TEXT_STATES]
    gram = history.gram(TEXT_STATES) if history else None
    # one shared right factor: the residual of layer W0 is (T - K) W0^T, the solve depends on K only
    sol = nullspace_solve_layer(K, torch.zeros(K.shape[0], 1, dtype=K.dtype), proj, history_gram=gram, lam=s.lam, weights=w)
    if history is not None:
        history.add(TEXT_STATES, K)
    layers = edit_layers(model, s.layers)
    out = {}
    left = (T - K).mT  # d x n
    for name, W in layers.items():
        up = W.detach().double() @ left
        out[name] = LayerDelta(up.float(), sol.down.float()).compact()
    delta = ConceptDelta(out, {})
    delta.metadata = delta_metadata(model, plan, "nullspace", out, t0,
        kept_rank={TEXT_STATES: proj.kept_rank},
        leakage={TEXT_STATES: proj.leakage},
        preserve_drift=preserve_drift(model, plan, delta),
        coverage=round(sol.coverage, 6),
        covariance=pinfo.get("covariance"),
        condition=sol.report.condition,
        ridge=sol.report.jitter,
        n_edit_keys=int(K.shape[0]),
        stage_i={"steps_run": steps_run},
        history_keys=len(history) if history is not None else None,
    )
    return delta


@torch.no_grad()
def preserve_drift(model, plan: EditPlan, delta: ConceptDelta) -> float | None:
    """Measured relative change of the preserve set's outputs under ``delta`` (None without one):
    cross-attention deltas: |dW X^T| / |W X^T| over the preserve prompts' UNet-read states X (every
    padded position) and every edited layer; text-encoder deltas: |X' - X| / |X| of those states."""
    from ..core.apply import apply_delta

    caps = _preserve_captions(plan)
    if not caps:
        return None
    if is_mmdit(model):  # what the transformer reads: every context token and the pooled vector
        return _mmdit_drift(model, caps, delta)
    ids = [model.padded_ids(c) for c in caps]
    X = torch.cat(model.encode_ids(ids)).double()
    if all(n.startswith("unet.") for n in delta.layers):
        W = model.weights(list(delta.layers))
        num = sum((X @ ld.dense(torch.float64).mT).pow(2).sum() for ld in delta.layers.values())
        den = sum((X @ W[n].detach().double().mT).pow(2).sum() for n in delta.layers)
        return round(float((num / den).sqrt()), 6)
    h = apply_delta(delta, model.weights(list(delta.layers)), check_fingerprint=False)
    try:
        X1 = torch.cat(model.encode_ids(ids)).double()
    finally:
        h.remove()
    return round(float((X1 - X).norm() / X.norm()), 6)


def _mmdit_drift(model, caps: list[str], delta: ConceptDelta) -> float:
    from ..core.apply import apply_delta

    def read():
        enc = model.encode(caps, cached=False)
        return torch.cat([torch.cat([enc[c][0].flatten(), enc[c][1].flatten()]) for c in caps]).double()

    X = read()
    h = apply_delta(delta, model.weights(list(delta.layers)), check_fingerprint=False)
    try:
        X1 = read()
    finally:
        h.remove()
    return round(float((X1 - X).norm() / X.norm()), 6)
