"""The multi-layer driver shared by the text-encoder editors (EMCID, null-space): MEMIT-style
spreading of a wanted hidden-state change over several ``mlp.fc2`` layers (CLIP) or
``DenseReluDense.wo`` layers (T5), shallow to deep."""
from __future__ import annotations

import torch

from ..adapters.text_encoder import fc2_name, subject_states, tokenize_prompts
from ..core.apply import apply_delta
from ..core.delta import ConceptDelta, LayerDelta
from ..core.plan import EditPlan, PlanError
from ..core.progress import tqdm
from ..core.prompts import Prompt, expand
from ..solvers.emcid import spread_residual


def is_mmdit(model) -> bool:
    """A FLUX / SD3 model (adapters/mmdit_model.py): its text reaches a transformer, not a UNet."""
    return hasattr(model, "key_spaces")


def check_mmdit_text_encoder(model, plan: EditPlan, method: str) -> None:
    """Refuse what the text-encoder editors cannot do on FLUX / SD3 (yet): stage I target
    optimisation, which runs the denoiser (a UNet here), and ``images``. ``dest_hidden`` targets
    (the destination prompt's own text states) need no denoiser and work on every encoder."""
    if not is_mmdit(model):
        return
    targets = plan.settings.targets
    if targets != "dest_hidden":
        raise PlanError(f"{method} on {model.family} models: targets {targets!r} optimises target states through the "
                        "denoiser (stage I), which is built for UNet models only; use targets: dest_hidden (the "
                        "destination prompt's own text states, no denoiser)")


def preserve_prompts(plan: EditPlan) -> list[Prompt]:
    """The preserve set as prompts: each concept in every template, plus "" (its BOS key) if kept."""
    out = [p for c in plan.preserve for p in expand(c, plan.templates)]
    if plan.preserve_empty:
        out.append(Prompt("", 0))
    return out


def spread_edit(
    model,
    plan: EditPlan,
    layers: dict[str, list[int]],
    offsets: dict[str, torch.Tensor],
    solve,
    *,
    key_mode: str = "mean",
    anchor: str = "mean",
    preserve: list[Prompt] | None = None,
    progress: bool = True,
) -> tuple[dict[str, LayerDelta], dict]:
    """Write ``offsets`` into the ``mlp.fc2`` layers of ``layers``; returns (layer deltas, report).

    ``offsets[comp]`` (n_edits x hidden) is the wanted change of the hidden state after the last
    edited layer L at each concept's subject token. ``solve(name, K, R, w, Kp) -> (up, down, info)``
    is the per-layer closed form: keys K, residual shares R, per-row weights w, and the preserve
    set's keys Kp at this layer (None without a preserve set). Edits are applied temporarily
    while the next layer's keys are computed and removed before returning (model untouched).

    ``key_mode``: "mean" (one key and residual per concept, averaged over templates) or "each"
    (one per prompt). ``anchor``: "mean" measures each concept's residual on all its templates,
    "first" on its first template only (EMCID's official code).
    """
    if key_mode not in ("mean", "each") or anchor not in ("mean", "first"):
        raise ValueError("key_mode must be 'mean' or 'each', anchor 'mean' or 'first'")
    T = len(plan.templates)
    n = len(plan.edits)
    src = tokenize_prompts(model, [p for e in plan.edits for p in expand(e.source, plan.templates)])
    kept = tokenize_prompts(model, preserve) if preserve else []
    owner = torch.arange(n).repeat_interleave(T)
    first = torch.arange(n) * T  # row of each concept's first template
    w_edit = torch.tensor(plan.edit_weights(), dtype=torch.float64)
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
                if anchor == "first":
                    R = R[first][owner]
                if key_mode == "mean":
                    K = torch.zeros(n, K.shape[1], dtype=K.dtype).index_add(0, owner, K) / T
                    R = torch.zeros(n, R.shape[1], dtype=R.dtype).index_add(0, owner, R) / T
                    w = w_edit
                else:
                    w = w_edit[owner]
                Kp = subject_states(model, comp, kept, fc2_layers=[l])[("fc2_in", l)].double() if kept else None
                name = fc2_name(comp, l, model)
                up, down, info = solve(name, K, R, w, Kp)
                ld = LayerDelta(up.float(), down.float()).compact()
                out[name] = ld
                report[name] = info
                handles.append(apply_delta(ConceptDelta({name: ld}), model.weights([name]), check_fingerprint=False))
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
