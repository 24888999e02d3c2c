"""Apply deltas to live weights and remove them again bit-exactly, in any order.

Each touched parameter remembers its pristine value the first time a delta lands on it;
its data is always recomputed as pristine + sum of the deltas still applied, so removing
the last one restores the original bytes exactly.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Mapping

import torch

from .delta import (
    FINGERPRINT_SCOPE,
    ConceptDelta,
    fingerprint,
    fingerprint_v1,
    fingerprints_match,
)

_ids = itertools.count()


class DeltaMismatchError(ValueError):
    pass


def check_scale(scale) -> float:
    if not math.isfinite(float(scale)):
        raise ValueError(f"scale must be a finite number, got {scale}")
    return float(scale)


def encoder_weights(model, exclude=()) -> dict[str, torch.Tensor] | None:
    """Every text-encoder weight of ``model`` (live values) except those named in ``exclude``;
    None for a model that lists no weights beyond the protocol's ``weights(names)``."""
    te = getattr(model, "text_encoder_weights", None)
    if te is not None:
        ws = te()
    elif not hasattr(model, "all_weights"):
        return None
    else:
        every = model.all_weights()  # may be lazy (single file): index only the text-encoder names
        ws = {k: every[k] for k in every if k.startswith("text_encoder")}
    exclude = set(exclude)
    return {k: v for k, v in ws.items() if k not in exclude}


def base_fingerprint(model, names) -> dict:
    """Metadata naming the model state a delta on layers ``names`` is computed against.

    A delta depends on the weights it edits and on the text encoders that produce its keys (for a
    text-encoder delta: the rest of the encoder). ``base_fingerprint`` covers the edited layers'
    *pristine* values (before any applied delta, so deltas made on one model stack, and one made
    with another applied on the same layers checks the same way on both sides);
    ``encoder_fingerprint`` covers the other text-encoder weights as they are *now* (a delta made
    through an edited encoder is refused on an unedited one)."""
    names = list(names)
    ws = model.weights(names)
    out = {"base_fingerprint": fingerprint({n: _pristine(ws[n]) for n in names}), "fingerprint_scope": FINGERPRINT_SCOPE}
    enc = encoder_weights(model, names)
    if enc:
        out["encoder_fingerprint"] = fingerprint(enc)
    return out


def check_compatible(delta: ConceptDelta, weights: Mapping[str, torch.Tensor], *, check_fingerprint: bool = True,
                     model=None) -> None:
    """Raise if the delta names layers the model lacks, with other shapes, or another base model.
    With ``model`` the text encoders the delta depends on are checked too."""
    missing = [n for n in delta.layers if n not in weights]
    if missing:
        raise DeltaMismatchError(
            f"delta edits {len(missing)} layer(s) this model does not have, e.g. {missing[0]!r}; "
            f"it was made for a {delta.metadata.get('family', 'different')} model"
        )
    for name, ld in delta.layers.items():
        if tuple(weights[name].shape) != ld.shape:
            raise DeltaMismatchError(
                f"layer {name}: delta shape {ld.shape} does not match model weight {tuple(weights[name].shape)}"
            )
    if check_fingerprint:
        _check_base(delta.metadata, list(delta.layers), weights, model)


_FORCE = "pass check_fingerprint=False (CLI: --force) to apply it anyway"


def _check_base(meta: dict, names: list[str], weights, model) -> None:
    parts = meta.get("parts") or []
    if not meta.get("base_fingerprint") and parts and all("layer_names" in p for p in parts):
        for p in parts:  # a stack of deltas made on different model states: each part on its own
            _check_base(p, p["layer_names"], weights, model)
        return
    expected = meta.get("base_fingerprint")
    if not expected:
        return
    scope = meta.get("fingerprint_scope")
    sub = {n: _pristine(weights[n]) for n in names}
    if scope is None:  # written before fingerprint_scope: the edited layers only, float16 rounding
        ok = fingerprint_v1(sub) == expected or fingerprints_match(expected, fingerprint(sub))
    elif scope == FINGERPRINT_SCOPE:
        ok = fingerprints_match(expected, fingerprint(sub))
    else:
        raise DeltaMismatchError(f"delta fingerprint scope {scope!r} is unknown to this version; "
                                 f"upgrade concept_edit or {_FORCE}")
    if not ok:
        raise DeltaMismatchError(f"delta was computed on a model whose edited layers differ from this one's "
                                 f"(fingerprint {expected}); {_FORCE}")
    enc = meta.get("encoder_fingerprint")
    theirs = encoder_weights(model, names) if scope and enc and model is not None else None
    if theirs is not None:
        got = fingerprint(theirs)
        if not fingerprints_match(enc, got):
            raise DeltaMismatchError(f"delta was computed with a different text encoder (fingerprint {enc}, this "
                                     f"model's is {got}), so its keys do not match this model; {_FORCE}")


def _pristine(p: torch.Tensor) -> torch.Tensor:
    return getattr(p, "_ce_pristine", p)


@dataclass
class AppliedDelta:
    id: int
    params: dict[str, torch.nn.Parameter]

    def remove(self) -> None:
        for p in self.params.values():
            stack = getattr(p, "_ce_stack", None)
            if stack is None:
                continue
            stack[:] = [e for e in stack if e[0] != self.id]
            _recompute(p)


def _recompute(p: torch.nn.Parameter) -> None:
    with torch.no_grad():
        if not p._ce_stack:
            p.data.copy_(p._ce_pristine)
            del p._ce_pristine, p._ce_stack
            return
        acc = p._ce_pristine.to(torch.float32).clone()
        for _, up, down, scale in p._ce_stack:
            acc.addmm_(up, down, alpha=scale)
        p.data.copy_(acc.to(p.dtype))


def apply_delta(
    delta: ConceptDelta,
    weights: Mapping[str, torch.nn.Parameter],
    *,
    scale: float = 1.0,
    check_fingerprint: bool = True,
    model=None,
) -> AppliedDelta:
    """Add ``scale * delta`` to the named parameters in place; returns a handle to remove it.
    Pass the ``model`` the weights belong to so its text encoders are checked too."""
    scale = check_scale(scale)
    check_compatible(delta, weights, check_fingerprint=check_fingerprint, model=model)
    handle = AppliedDelta(next(_ids), {})
    for name, ld in delta.layers.items():
        p = weights[name]
        if not hasattr(p, "_ce_pristine"):
            p._ce_pristine = p.detach().clone()
            p._ce_stack = []
        dev = p.device
        p._ce_stack.append((handle.id, ld.up.to(dev, torch.float32), ld.down.to(dev, torch.float32), float(scale)))
        _recompute(p)
        handle.params[name] = p
    return handle
