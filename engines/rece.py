"""RECE engine (Reliable and Efficient Concept Erasure, Gong et al., ECCV 2024) on UNet cross-attention.

1. The UCE edit of the plan (keys, targets and preserve set as :mod:`.uce` builds them).
2. ``epochs`` rounds: for every key row of an erase / replace edit, the adversarial embedding c'
   that the current edited to_k/to_v of every cross-attention layer still map closest to what the
   original weights produced for the concept's key (closed form, :mod:`..solvers.rece`), then an
   edit that sends c' to the concept's target (its guide / destination key, as UCE's target).

``update: accumulate`` (default) follows the official code: each round edits the *current*
weights with that round's adversarial keys only, ridge ``adv_ridge`` towards the current weights,
preserved keys (weight ``adv_preserve_scale``) kept at their current outputs and targets the
guide keys through the current weights. A replace edit's own key rows are kept at their current
outputs as well (they already reach the destination; the official code erases only).
``update: resolve`` instead re-solves UCE from the original weights with the concept keys plus all
adversarial keys found so far.

Every round's change is the current weight times a key-space matrix, so every edited layer's
total change stays W0 @ left @ right with one shared pair of factors (rank: edit keys + all
rounds' adversarial keys), and the per-layer weights are read once (their Gram sums).
"""
from __future__ import annotations

import time

import torch

from ..adapters.base import EditableModel
from ..core.delta import ConceptDelta, LayerDelta
from ..core.plan import EditPlan, PlanError
from ..core.progress import tqdm
from ..solvers.rece import (
    adversarial_embeddings,
    gram,
    output_distance,
    rece_system_factored,
)
from ..solvers.uce import UCESolution, uce_solve
from .metadata import delta_metadata
from .uce import edit_layers, edit_rows, key_spaces, preserve_keys

ATTACKED = ("erase", "replace")  # edits whose concept RECE attacks; moderate / debias are solved as UCE does


def _grams(model, layers: dict, progress: bool):
    """Original Gram sums of the edited projections and of the cross-attention projections kept
    (float32 products, as the official code, summed in float64)."""
    everything = edit_layers(model, "kv")
    sums: dict[bool, torch.Tensor] = {}
    for name, W in tqdm(everything.items(), desc="RECE grams", disable=not progress, leave=False):
        g = gram([W], compute_dtype=torch.float32)
        edited = name in layers
        sums[edited] = sums[edited] + g if edited in sums else g
    return sums[True], sums.get(False)


def _per_edit(values: torch.Tensor, owners: list[int]) -> dict[int, float]:
    out: dict[int, list[float]] = {}
    for v, o in zip(values.tolist(), owners):
        out.setdefault(o, []).append(v)
    return {o: round(sum(v) / len(v), 5) for o, v in out.items()}


def _round_preserve(P, scale: float, K_replaced: torch.Tensor, w_replaced: torch.Tensor):
    """Keys an accumulate round keeps at their current outputs, with their weights: the preserve set
    (weight ``scale``) and the key rows of replace edits (their edit weight). A replaced concept's own
    keys already reach the destination; left free, the round's edit of the adversarial keys pulls
    them off it (testbed: the source then drew neither concept). The official code erases only, so
    erase rows are left as it leaves them."""
    if K_replaced.shape[0] == 0:
        return P, scale
    n = 0 if P is None else P.shape[0]
    keys = K_replaced if P is None else torch.cat([P.to(K_replaced.dtype), K_replaced])
    weights = torch.cat([torch.full((n,), float(scale), dtype=torch.float64), w_replaced.to(torch.float64)])
    return keys, weights


def rece_delta(model: EditableModel, plan: EditPlan, *, progress: bool = True) -> ConceptDelta:
    """The RECE edit of ``plan`` on ``model`` as a ConceptDelta (model untouched)."""
    if hasattr(model, "key_spaces"):
        raise PlanError(f"rece: {model.family} models have no UNet cross-attention; RECE edits SD 1.x, 2.x and SDXL "
                        "(use uce on FLUX/SD3)")
    if not any(e.kind in ATTACKED for e in plan.edits):
        raise PlanError("rece attacks and re-erases the concepts of erase and replace edits; this plan has none "
                        "(use uce)")
    t0 = time.perf_counter()
    s = plan.settings
    ((layers, (enc,)),) = key_spaces(model, plan).values()
    t1 = time.perf_counter()
    enc, K, T, w, owners = edit_rows(model, plan, enc=enc)
    P = preserve_keys(enc, plan)
    t_keys = time.perf_counter() - t1
    sel = [i for i, o in enumerate(owners) if plan.edits[o].kind in ATTACKED]
    Kr, Tr, wr = K[sel], T[sel], w[sel]
    own = [owners[i] for i in sel]
    replace = torch.tensor([plan.edits[o].kind == "replace" for o in own])
    P_round, p_round = _round_preserve(P, s.adv_preserve_scale, Kr[replace], wr[replace])  # the same every round

    sol = uce_solve(K, T, P, lam=s.lam, erase_scale=w, preserve_scale=s.preserve_scale)
    left, right = sol.left, sol.right  # the edited weights are W0 (I + left @ right)
    Ge, Gk = _grams(model, layers, progress)
    eye = torch.eye(K.shape[1], dtype=left.dtype)
    found, rounds = [], []
    for epoch in tqdm(range(s.epochs), desc="RECE epochs", disable=not progress, leave=False):
        A = eye + left @ right
        system = rece_system_factored(Ge, Gk, A)
        C, emb_report = adversarial_embeddings(system, Kr, lam=s.reg_lambda)
        dist, dist_own = output_distance(system, C, Kr), output_distance(system, Kr, Kr)
        found.append(C)
        if s.update == "accumulate":  # targets and preserved outputs through the current weights W0 A
            step = uce_solve(C, Tr, P_round, lam=s.adv_ridge, erase_scale=wr, preserve_scale=p_round)
            left = torch.cat([left, A @ step.left], 1)
            right = torch.cat([right, step.right], 0)
        else:
            step = uce_solve(torch.cat([K, *found]), torch.cat([T, *[Tr] * len(found)]), P, lam=s.lam,
                             erase_scale=torch.cat([w, *[wr] * len(found)]), preserve_scale=s.preserve_scale)
            left, right = step.left, step.right
        after = output_distance(rece_system_factored(Ge, Gk, eye + left @ right), C, Kr)
        d_adv, d_own, d_after = _per_edit(dist, own), _per_edit(dist_own, own), _per_edit(after, own)
        rounds.append({
            "epoch": epoch + 1,
            "n_adversarial_keys": int(C.shape[0]),
            # relative distance of the edited outputs (all cross-attention to_k/to_v) from the original
            # outputs of the concept's key: of its adversarial key, of its own key, and of the
            # adversarial key once this round's edit is made; mean over the concept's key rows
            "concepts": [{"concept": plan.edits[o].source, "adversarial_distance": d_adv[o],
                          "concept_distance": d_own[o], "adversarial_distance_after": d_after[o]} for o in d_adv],
            "embedding_condition": emb_report.condition,
            "condition": step.report.condition,
            "ridge": step.report.jitter,
        })

    total = UCESolution(left=left, right=right, report=sol.report)
    out = {}
    for name, W in tqdm(layers.items(), desc="layers", disable=not progress, leave=False):
        up, down = total.layer_factors(W.detach())
        out[name] = LayerDelta(up.float(), down.float()).compact()
    extra = {"n_edit_keys": int(K.shape[0]), "n_preserve_keys": 0 if P is None else int(P.shape[0]),
             "condition": sol.report.condition, "ridge": sol.report.jitter,
             "n_adversarial_keys": int(sum(c.shape[0] for c in found)), "rece_epochs": rounds}
    meta = delta_metadata(model, plan, "rece", out, t0, seconds={"keys": round(t_keys, 4)}, **extra)
    return ConceptDelta(out, meta)
