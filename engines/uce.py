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
    K, T, owners = enc.aligned_keys(src, dst, prefix=plan.settings.token == "all")
    n = len(plan.templates)
    strength = torch.tensor([plan.edits[o // n].strength if plan.edits[o // n].kind == "moderate" else 1.0 for o in owners])
    T = K + strength[:, None] * (T - K)
    return K, T, owners


def edit_keys_and_targets(model: EditableModel, plan: EditPlan, alphas: dict[str, list[float]] | None = None,
                          enc=None):
    """Key rows, target rows and per-row erase weights for a plan (shared by UCE-style solvers);
    ``enc`` is the key encoder (default: the model's text states, :class:`KeyEncoder`)."""
    enc, K, T, w, _ = edit_rows(model, plan, alphas, enc)
    return enc, K, T, w


def edit_rows(model: EditableModel, plan: EditPlan, alphas: dict[str, list[float]] | None = None, enc=None):
    """:func:`edit_keys_and_targets` plus the owner of each row: the index of its edit in ``plan.edits``."""
    enc = enc or KeyEncoder(model)
    alphas = alphas or {}
    n = len(plan.templates)
    if plan.settings.token == "last":
        K, T = _targets_last(enc, plan, alphas)
        owners = [i // n for i in range(K.shape[0])]
    else:
        K, T, owners = _targets_aligned(enc, plan, alphas)
        owners = [o // n for o in owners]
    w = torch.tensor(plan.edit_weights(), dtype=torch.float64)[owners]
    return enc, K, T, w, owners


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
            rows.append(enc.all_token_keys(prompts, prefix=plan.settings.token == "all")[0])
    return torch.cat(rows) if rows else None


def key_spaces(model, plan: EditPlan) -> dict[str, tuple[dict, list]]:
    """space -> (layers to edit, key encoders whose rows the space's solve uses). A UNet model has
    one space, its cross-attention; an MMDiT model (``model.key_spaces``) has the context
    embedder's token states and the pooled embedder's pooled vectors (adapters/mmdit_model.py)."""
    readers = getattr(plan.settings, "readers", "all")
    if hasattr(model, "key_spaces"):
        if plan.settings.layers != "kv":
            raise ValueError(f"{model.family}: 'layers' chooses UNet cross-attention projections; an MMDiT edits its "
                             "context and pooled-text embedders (choose them with 'readers')")
        spaces = model.key_spaces()
        keep = {"all": ("states", "pooled"), "context": ("states",), "pooled": ("pooled",)}[readers]
        return {k: v for k, v in spaces.items() if k in keep}
    if readers != "all":
        raise ValueError(f"'readers' chooses the text readers of FLUX/SD3 models; this model's text enters through "
                         f"cross-attention (choose its projections with 'layers'), got readers: {readers}")
    return {"states": (edit_layers(model, plan.settings.layers), [KeyEncoder(model)])}


def space_keys(model, plan: EditPlan, encs: list, alphas=None):
    """(K, T, w, P) of one key space: the rows of each of its key encoders, stacked."""
    parts = [edit_keys_and_targets(model, plan, alphas, enc) for enc in encs]
    K = torch.cat([k for _, k, _, _ in parts])
    T = torch.cat([t for _, _, t, _ in parts])
    w = torch.cat([w for _, _, _, w in parts])
    Ps = [p for p in (preserve_keys(enc, plan) for enc, _, _, _ in parts) if p is not None]
    return K, T, w, (torch.cat(Ps) if Ps else None)


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
    """Compute the UCE edit of ``plan`` on ``model`` as a ConceptDelta (model untouched).

    Targets are ``W0 t`` (weights only): a layer's bias adds the same to edited and original
    outputs, so it needs no solving and preserved outputs keep it."""
    t0 = time.perf_counter()
    s = plan.settings
    out, stats, t_keys = {}, {}, 0.0
    for space, (layers, encs) in key_spaces(model, plan).items():
        t1 = time.perf_counter()
        K, T, w, P = space_keys(model, plan, encs, alphas)
        t_keys += time.perf_counter() - t1
        sol = uce_solve(K, T, P, lam=s.lam, erase_scale=w, preserve_scale=s.preserve_scale)
        for name, W in tqdm(layers.items(), desc="layers", disable=not progress, leave=False):
            up, down = sol.layer_factors(W.detach())
            out[name] = LayerDelta(up.float(), down.float()).compact()
        stats[space] = {"n_edit_keys": int(K.shape[0]), "n_preserve_keys": 0 if P is None else int(P.shape[0]),
                        "condition": sol.report.condition, "ridge": sol.report.jitter}
    extra = dict(stats["states"]) if list(stats) == ["states"] else {"key_spaces": stats}
    if hasattr(model, "max_sequence_length"):
        extra["max_sequence_length"] = model.max_sequence_length  # T5 keys depend on the padding
    meta = delta_metadata(model, plan, "uce", out, t0, alphas=alphas or {}, seconds={"keys": round(t_keys, 4)}, **extra)
    return ConceptDelta(out, meta)
