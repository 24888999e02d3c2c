"""SPEED engine (Li et al., Scalable, Precise, and Efficient Concept Erasure, ICLR 2026) on UNet
cross-attention: null-space constrained editing with a refined retain set (docs/speed.md).

1. Edit keys and targets as UCE builds them (templates, ``token``); each row weighs its edit's
   weight / number of rows (the official code averages the edit terms).
2. The retain set is the plan's preserve set (with "" unless ``preserve_empty: false``) at the
   same tokens; a preserve concept containing an edited concept as a word is dropped, as the
   official code drops such retain texts.
3. Invariant keys (IEC): the null text's [SOT] state and ``clusters`` k-means centres of its
   other states.
4. Per layer: IPF (``filter``) and DPA (``aug_num`` copies per kept key, noise from ``seed``)
   refine the retain set, whose mean second moment gives the projector (eigenvalues below
   ``threshold``); the constrained closed form gives the layer's delta
   (:func:`..solvers.speed.speed_solve_layer`).

With neither IPF nor DPA the retain set is the same for every layer and its projector is built once.

The edit term is the mean over the edit keys (official), so against ``retain_scale`` each concept's
pull shrinks as more are edited; each layer reports its ``reach`` (share of the edit keys' output
distance to their targets the edit closes) and a weak edit is warned about.
"""
from __future__ import annotations

import copy
import re
import time
import warnings

import torch

from ..adapters.base import EditableModel
from ..core.delta import ConceptDelta, LayerDelta
from ..core.plan import EditPlan, PlanError
from ..core.progress import tqdm
from ..solvers.speed import (
    erase_map,
    invariant_keys,
    retain_moment,
    retain_projector,
    speed_solve_layer,
)
from .metadata import delta_metadata
from .uce import edit_rows, key_spaces, preserve_keys

WEAK_REACH = 0.5  # below this mean reach the edit leaves the concepts mostly as they were: warn


def retain_concepts(plan: EditPlan) -> tuple[list[str], list[str]]:
    """(kept, dropped): preserve concepts that contain no edited concept as a whole word."""
    pats = [re.compile(r"\b" + re.escape(e.source.lower()) + r"\b") for e in plan.edits]
    kept, dropped = [], []
    for c in plan.preserve:
        (dropped if any(p.search(c.lower()) for p in pats) else kept).append(c)
    return kept, dropped


def _retain_keys(enc, plan: EditPlan, kept: list[str]):
    view = copy.copy(plan)  # the plan with its preserve list replaced
    view.preserve = kept
    return preserve_keys(enc, view)


def null_text_states(model: EditableModel) -> torch.Tensor:
    """The states the UNet reads for "" (the full padded sequence, as the pipeline feeds it)."""
    return model.encode_ids([model.padded_ids("")])[0]


def reach(W, D, K, T) -> float:
    """Mean over edit keys (those not already at their target) of the share of the output distance
    to the target that ``D`` closes: 1 reaches the targets, 0 leaves the keys where they were."""
    before = (K - T) @ W.mT
    after = K @ (W + D).mT - T @ W.mT
    b = before.norm(dim=1)
    keep = b > 1e-9 * b.max().clamp_min(1e-300)
    return float((1 - after.norm(dim=1)[keep] / b[keep]).mean()) if keep.any() else 1.0


def speed_delta(model: EditableModel, plan: EditPlan, *, progress: bool = True, noise=None,
                kmeans_init: list[int] | None = None) -> ConceptDelta:
    """The SPEED edit of ``plan`` on ``model`` as a ConceptDelta (model untouched).

    For reproducing another run (bench/speed_reference.py): ``noise(layer name, retain keys, aug_num)``
    returns the (m x aug_num) z of the augmentation copies instead of draws from ``seed``;
    ``kmeans_init`` gives the k-means starting rows (indices into the null text's states after [SOT])."""
    if hasattr(model, "key_spaces"):
        raise PlanError(f"speed: {model.family} models have no UNet cross-attention; SPEED edits SD 1.x, 2.x and SDXL "
                        "(use uce on FLUX/SD3)")
    t0 = time.perf_counter()
    s = plan.settings
    ((layers, (enc,)),) = key_spaces(model, plan).values()
    t1 = time.perf_counter()
    enc, K, T, w, _ = edit_rows(model, plan, enc=enc)
    kept, dropped = retain_concepts(plan)
    if dropped:
        warnings.warn(f"speed: preserve concepts containing an edited concept are not retained: {', '.join(dropped)}",
                      stacklevel=2)
    R = _retain_keys(enc, plan, kept)
    Kc = invariant_keys(null_text_states(model).double(), s.clusters, init=kmeans_init) if s.invariant else None
    t_keys = time.perf_counter() - t1

    K, T = K.double(), T.double()
    weights = w.double() / K.shape[0]
    erase = erase_map(K, T, weights)
    gen = torch.Generator().manual_seed(s.seed)
    shared = None
    out, report = {}, {}
    drift = 0.0
    for name, W in tqdm(layers.items(), desc="SPEED layers", disable=not progress, leave=False):
        W = W.detach()
        if shared is None or s.filter or s.aug_num:
            z = None
            if s.aug_num and R is not None:
                z = (noise(name, R, s.aug_num) if noise is not None
                     else torch.randn(R.shape[0], s.aug_num, generator=gen, dtype=torch.float64))
            rm = retain_moment(W, erase, R, filter=s.filter, noise=z)
            proj = retain_projector(rm.moment, s.threshold)
            shared = (rm, proj)
        rm, proj = shared
        sol = speed_solve_layer(W, K, T, weights, proj, Kc, retain_scale=s.retain_scale, lamb=s.lamb)
        ld = LayerDelta(sol.up.float(), sol.down.float()).compact()
        out[name] = ld
        Wd, D = W.double(), sol.up @ sol.down
        if Kc is not None:  # relative change of the invariant keys' outputs (0 up to rounding unless lamb > 0)
            drift = max(drift, ((Kc @ D.mT).norm() / (Kc @ Wd.mT).norm()).item())
        report[name] = {"retained": rm.n_kept, "augmented": rm.n_augmented, "kept_rank": proj.kept_rank,
                        "coverage": round(sol.coverage, 6), "leakage": round(proj.leakage, 6),
                        "reach": round(reach(Wd, D, K, T), 4)}
    mean_reach = sum(r["reach"] for r in report.values()) / max(1, len(report))
    if mean_reach < WEAK_REACH:
        warnings.warn(f"speed: the edit closes only {mean_reach:.0%} of the edit keys' distance to their targets "
                      f"(mean over layers; the edit term is the mean over {K.shape[0]} keys, against retain_scale "
                      f"{s.retain_scale:g}): the concepts will barely change. Lower retain_scale (the official celebrity runs "
                      "use 0.05) or raise erase_scale.", stacklevel=2)
    extra = {"n_edit_keys": int(K.shape[0]), "n_retain_keys": 0 if R is None else int(R.shape[0]),
             "n_invariant_keys": 0 if Kc is None else int(Kc.shape[0]), "layers_report": report}
    if Kc is not None:
        extra["invariant_drift"] = float(f"{drift:.3g}")
    if dropped:
        extra["retain_dropped"] = dropped
    meta = delta_metadata(model, plan, "speed", out, t0, seconds={"keys": round(t_keys, 4)}, **extra)
    return ConceptDelta(out, meta)
