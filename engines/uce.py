"""UCE engine: an EditPlan on an EditableModel -> ConceptDelta over cross-attention to_k/to_v.

Every target is of the form v* = W0 t (t a key-space vector), so one Cholesky solve serves
all layers and each layer's delta is W0 @ left @ right with the shared ``right`` factor.
"""
from __future__ import annotations

import time

import torch

from ..adapters.base import EditableModel
from ..core.delta import ConceptDelta, LayerDelta
from ..core.plan import EditPlan
from ..core.progress import tqdm
from ..core.prompts import Prompt, expand
from ..solvers.uce import uce_solve
from .keys import KeyEncoder
from .metadata import delta_metadata


def _targets_last(enc: KeyEncoder, plan: EditPlan, alphas: dict[str, list[float]]):
    """(K, T, weights) for last-token selection: one row per edit x template."""
    tpl = plan.templates
    src = [p for e in plan.edits for p in expand(e.source, tpl)]
    need = []  # prompts whose keys build the targets
    for e in plan.edits:
        if e.kind in ("erase", "replace"):
            need += expand(e.target, tpl)
        elif e.kind == "moderate":
            need += expand("", tpl)
        else:
            for a in e.attributes:
                need += expand(a, tpl)
    enc.prefetch((src, False), (need, False), *_preserve_groups(plan))  # one encoding pass
    K, _ = enc.last_token_keys(src)
    B, _ = enc.last_token_keys(need)
    rows = []
    i = j = 0
    n = len(tpl)
    for e in plan.edits:
        c = K[i : i + n]
        if e.kind in ("erase", "replace"):
            rows.append(B[j : j + n]); j += n
        elif e.kind == "moderate":
            rows.append(c + e.strength * (B[j : j + n] - c)); j += n
        else:
            al = alphas.get(e.source) or e.alphas or [0.0] * len(e.attributes)
            t = c.clone()
            for a in al:
                t = t + a * B[j : j + n]; j += n
            rows.append(t)
        i += n
    return K, torch.cat(rows)


def _targets_aligned(enc: KeyEncoder, plan: EditPlan, alphas: dict[str, list[float]]):
    src: list[Prompt] = []
    dst: list[Prompt] = []
    for e in plan.edits:
        if e.kind == "debias":
            raise ValueError("debias edits use last-token selection (token: last)")
        s = expand(e.source, plan.templates)
        d = expand(e.target if e.kind != "moderate" else "", plan.templates)
        src += s
        dst += d
    K, T, owners = enc.aligned_keys(src, dst)
    n = len(plan.templates)
    strength = torch.tensor([plan.edits[o // n].strength if plan.edits[o // n].kind == "moderate" else 1.0 for o in owners])
    T = K + strength[:, None] * (T - K)
    return K, T, owners


def edit_keys_and_targets(model: EditableModel, plan: EditPlan, alphas: dict[str, list[float]] | None = None):
    """Key rows, target rows and per-row erase weights for a plan (shared by UCE-style solvers)."""
    enc = KeyEncoder(model)
    alphas = alphas or {}
    n = len(plan.templates)
    if plan.settings.token == "last":
        K, T = _targets_last(enc, plan, alphas)
        owners = [i // n for i in range(K.shape[0])]
    else:
        K, T, owners = _targets_aligned(enc, plan, alphas)
        owners = [o // n for o in owners]
    w = torch.tensor(plan.edit_weights(), dtype=torch.float64)[owners]
    return enc, K, T, w


def _preserve_groups(plan: EditPlan) -> list[tuple[list[Prompt], bool]]:
    """Preserve prompt groups as (prompts, empty_all_tokens): the user's concepts, then ""."""
    groups = [([p for c in plan.preserve for p in expand(c, plan.templates)], False)]
    if plan.preserve_empty:
        groups.append(([Prompt("", 0)], True))
    return [g for g in groups if g[0]]


def preserve_keys(enc: KeyEncoder, plan: EditPlan) -> torch.Tensor | None:
    rows = []
    for prompts, empty in _preserve_groups(plan):
        if plan.settings.token == "last":
            rows.append(enc.last_token_keys(prompts, empty_all_tokens=empty)[0])
        else:
            rows.append(enc.all_token_keys(prompts)[0])
    return torch.cat(rows) if rows else None


def edit_layers(model: EditableModel, which: str) -> dict[str, torch.nn.Parameter]:
    """Cross-attention projections to edit: ``which`` is "kv" (to_k and to_v) or "v"."""
    suffixes = ("to_k", "to_v") if which == "kv" else ("to_v",)
    layers = {k: v for k, v in model.cross_attention_weights().items() if k.endswith(suffixes)}
    if not layers:
        raise ValueError("model has no cross-attention to_k/to_v layers to edit")
    return layers


def uce_delta(
    model: EditableModel,
    plan: EditPlan,
    *,
    alphas: dict[str, list[float]] | None = None,
    progress: bool = True,
) -> ConceptDelta:
    """Compute the UCE edit of ``plan`` on ``model`` as a ConceptDelta (model untouched)."""
    t0 = time.perf_counter()
    enc, K, T, w = edit_keys_and_targets(model, plan, alphas)
    P = preserve_keys(enc, plan)
    t_keys = time.perf_counter() - t0
    s = plan.settings
    sol = uce_solve(K, T, P, lam=s.lam, erase_scale=w, preserve_scale=s.preserve_scale)
    layers = edit_layers(model, s.layers)
    out = {}
    for name, W in tqdm(layers.items(), desc="layers", disable=not progress, leave=False):
        up, down = sol.layer_factors(W.detach())
        out[name] = LayerDelta(up.float(), down.float()).compact()
    meta = delta_metadata(
        model, plan, "uce", out, t0,
        alphas=alphas or {},
        n_edit_keys=int(K.shape[0]),
        n_preserve_keys=0 if P is None else int(P.shape[0]),
        condition=sol.report.condition,
        ridge=sol.report.jitter,
        seconds={"keys": round(t_keys, 4)},
    )
    return ConceptDelta(out, meta)
