"""The multi-layer driver shared by the text-encoder editors (EMCID, null-space): MEMIT-style
spreading of a wanted hidden-state change over several ``mlp.fc2`` layers, shallow to deep."""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..adapters.text_encoder import fc2_name, subject_states, tokenize_prompts
from ..core.apply import apply_delta
from ..core.delta import ConceptDelta, LayerDelta
from ..core.plan import EditPlan
from ..core.prompts import expand
from ..solvers.emcid import spread_residual


def spread_edit(
    model,
    plan: EditPlan,
    layers: dict[str, list[int]],
    offsets: dict[str, torch.Tensor],
    solve,
    *,
    key_mode: str = "mean",
    progress: bool = True,
) -> tuple[dict[str, LayerDelta], dict]:
    """Multi-layer MEMIT-style driver shared by EMCID and null-space editing.

    ``offsets[comp]`` (n_edits x hidden) is the wanted change of the hidden state after the last
    edited layer at each concept's subject token; ``solve(name, K, R) -> (up, down, info)`` the
    per-layer closed form. Edits are applied temporarily while the next layer's keys are
    computed and removed before returning (the model is left untouched).
    """
    if key_mode not in ("mean", "each"):
        raise ValueError("key_mode must be 'mean' or 'each'")
    T = len(plan.templates)
    n = len(plan.edits)
    src = tokenize_prompts(model, [p for e in plan.edits for p in expand(e.source, plan.templates)])
    owner = torch.arange(n).repeat_interleave(T)
    out: dict[str, LayerDelta] = {}
    report: dict = {}
    handles = []
    try:
        for comp, ls in layers.items():
            L = ls[-1]
            # the states entering the first edited layer never change: run the layers below it once
            st = subject_states(model, comp, src, out_layers=[L], capture_input=ls[0])
            z0 = st[("out", L)].double()
            resume = (ls[0], st[("in", ls[0])])
            z_star = z0 + offsets[comp].double()[owner]
            start = (z_star - z0).norm(dim=-1).mean().item()
            for i, l in enumerate(tqdm(ls, desc=f"{comp} layers", disable=not progress, leave=False)):
                # keys of layer l and z at L with layers l_0..l_{i-1} edited; the input of layer l is
                # final from here on (only layers >= l change later), so the next pass resumes there
                st = subject_states(model, comp, src, fc2_layers=[l], out_layers=[L], capture_input=l, start=resume)
                resume = (l, st[("in", l)])
                K = st[("fc2_in", l)].double()
                R = spread_residual(z_star, st[("out", L)].double(), i, len(ls))
                if key_mode == "mean":
                    K = torch.zeros(n, K.shape[1], dtype=K.dtype).index_add(0, owner, K) / T
                    R = torch.zeros(n, R.shape[1], dtype=R.dtype).index_add(0, owner, R) / T
                name = fc2_name(comp, l)
                up, down, info = solve(name, K, R)
                ld = LayerDelta(up.float(), down.float()).compact()
                out[name] = ld
                report[name] = info
                w = model.weights([name])
                handles.append(apply_delta(ConceptDelta({name: ld}), w, check_fingerprint=False))
            zf = subject_states(model, comp, src, out_layers=[L], start=resume)[("out", L)].double()
            report[comp] = {
                "residual_before": round(start, 6),
                "residual_after": round((z_star - zf).norm(dim=-1).mean().item(), 6),
                "target_norm": round(z0.norm(dim=-1).mean().item(), 6),
            }
    finally:
        for h in reversed(handles):
            h.remove()
    return out, report
