"""Node logic that needs no ComfyUI: parsing widget text, building plans, summarising deltas.

Everything ComfyUI-specific (the adapter, patches, folder_paths) is imported inside functions.
"""
from __future__ import annotations

import math
import re

import torch

from ..core.delta import ConceptDelta
from ..core.plan import Edit, EditPlan, PlanError, split_quoted
from ..core.settings import build_settings

CATEGORY = "ConceptEdit"
DELTA_TYPE = "CONCEPT_DELTA"
CAPTURE_TYPE = "CONCEPT_ATTENTION"


def parse_list(text: str) -> list[str]:
    """Concepts from a widget: one per line, or comma-separated. A name containing a comma is
    quoted ("Smith, John"); a '#' starts a comment only at the start of a line or after a space,
    so "C# programmer" stays whole; blanks are dropped."""
    items = []
    for line in (text or "").splitlines():
        items += split_quoted(re.split(r"(?:^|\s)#", line, maxsplit=1)[0])
    return items


def parse_floats(text: str) -> list[float]:
    vals = [v for v in re.split(r"[,\s]+", (text or "").strip()) if v]
    try:
        return [float(v) for v in vals]
    except ValueError as e:
        raise PlanError(f"expected numbers separated by commas, got {text!r}") from e


def parse_pairs(text: str) -> list[tuple[str, str]]:
    """'cat -> dog' (or 'cat => dog', 'cat = dog') per line or comma-separated; a colon is part of a
    name ('16:9')."""
    pairs = []
    for item in parse_list(text):
        parts = re.split(r"\s*(?:->|=>|=)\s*", item, maxsplit=1)
        if len(parts) != 2 or not parts[0] or not parts[1]:
            raise PlanError(f"replacement {item!r} must look like 'source -> destination'")
        pairs.append((parts[0], parts[1]))
    return pairs


def erase_edits(concepts: str, concept_type: str, guide: str) -> list[Edit]:
    names = parse_list(concepts)
    if not names:
        raise PlanError("name at least one concept to erase")
    g = guide.strip() if guide and guide.strip() else {"style": "art", "object": ""}[concept_type]
    return [Edit("erase", c, g) for c in names]


def replace_edits(replacements: str) -> list[Edit]:
    pairs = parse_pairs(replacements)
    if not pairs:
        raise PlanError("give at least one replacement 'source -> destination'")
    return [Edit("replace", s, d) for s, d in pairs]


def moderate_edits(concepts: str, moderation: float) -> list[Edit]:
    names = parse_list(concepts)
    if not names:
        raise PlanError("name at least one concept to moderate")
    return [Edit("moderate", c, strength=float(moderation)) for c in names]


def debias_edits(concepts: str, attributes: str, ratios: str, alphas: str) -> list[Edit]:
    names = parse_list(concepts)
    attrs = parse_list(attributes)
    if not names:
        raise PlanError("name at least one concept to debias")
    r = parse_floats(ratios)
    a = parse_floats(alphas)
    if not a:
        # No generate-and-classify loop inside a graph: start from the desired ratios, the usual
        # first step of UCE's debias loop. Fit calibrated alphas with concept_edit.engines.debias.fit_debias.
        a = list(r) if r else [1.0 / max(len(attrs), 1)] * len(attrs)
    return [Edit("debias", c, attributes=list(attrs), ratios=list(r), alphas=list(a)) for c in names]


def make_plan(edits: list[Edit], method: str, preserve: list[str], templates: list[str], settings: dict) -> EditPlan:
    """The plan a node describes; ``settings`` in edit-file spelling, validated like an edit file's."""
    return EditPlan(edits=edits, method=method, preserve=preserve, templates=templates,
                    settings=build_settings(method, settings))


@torch.no_grad()
def residual_errors(model, plan: EditPlan, delta: ConceptDelta) -> dict:
    """How well the edited cross-attention layers hit their targets, relative to doing nothing:
    |(W0 + dW) K^T - W0 T^T|_F / |W0 (K - T)^T|_F per layer (0 = exact, 1 = unchanged).

    Only for plans whose targets are UCE-style key targets on cross-attention layers.
    """
    from ..engines.uce import edit_keys_and_targets

    names = [n for n in delta.layers if n.startswith("unet.") and n.endswith(("attn2.to_k", "attn2.to_v"))]
    if not names:
        return {}
    alphas = {e.source: e.alphas for e in plan.edits if e.kind == "debias" and e.alphas}
    _, K, T, _ = edit_keys_and_targets(model, plan, alphas or None)
    K, T = K.double(), T.double()
    W = model.weights(names)
    errs = {}
    for n in names:
        W0 = W[n].double()
        dW = delta.layers[n].dense(torch.float64)
        want = (K - T) @ W0.mT
        got = K @ (W0 + dW).mT - T @ W0.mT
        den = want.norm().item()
        errs[n] = got.norm().item() / den if den > 0 else 0.0
    return errs


def edit_summary(delta: ConceptDelta, plan: EditPlan | None = None, errors: dict | None = None, extra: dict | None = None) -> dict:
    """What an edit did, for the web extension and the node's UI output (JSON-safe)."""
    meta = delta.metadata
    edits = meta.get("edits") or ([vars(e) for e in plan.edits] if plan else [])
    concepts = []
    for e in edits:
        kind, src = e.get("kind"), e.get("source")
        if kind in ("erase", "replace"):
            concepts.append(f"{kind} {src} -> {e.get('target') or '∅'}")
        elif kind == "moderate":
            concepts.append(f"moderate {src} ({e.get('strength', 1.0):g})")
        elif kind == "debias":
            concepts.append(f"debias {src}: {', '.join(e.get('attributes', []))}")
        else:
            concepts.append(f"{kind} {src}")
    comps: dict[str, int] = {}
    for n in delta.layers:
        comps[n.split(".")[0]] = comps.get(n.split(".")[0], 0) + 1
    out = {
        "method": meta.get("method"),
        "family": meta.get("family"),
        "concepts": concepts,
        "preserve": list(meta.get("preserve", plan.preserve if plan else [])),
        "layers": len(delta.layers),
        "components": comps,
        "max_rank": delta.max_rank,
        "base_fingerprint": meta.get("base_fingerprint"),
        "seconds": (meta.get("seconds") or {}).get("total"),
    }
    if errors:
        vals = [v for v in errors.values() if math.isfinite(v)]
        out["residual_error"] = {"mean": sum(vals) / len(vals), "max": max(vals)} if vals else None
    if extra:
        out.update(extra)
    return out
