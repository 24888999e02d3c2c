"""Apply deltas to live weights and remove them again bit-exactly, in any order.

Each touched parameter remembers its pristine value the first time a delta lands on it;
its data is always recomputed as pristine + sum of the deltas still applied, so removing
the last one restores the original bytes exactly.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Mapping

import torch

from .delta import ConceptDelta, fingerprint

_ids = itertools.count()


class DeltaMismatchError(ValueError):
    pass


def check_compatible(delta: ConceptDelta, weights: Mapping[str, torch.Tensor], *, check_fingerprint: bool = True) -> None:
    """Raise if the delta names layers the model lacks, with other shapes, or another base model."""
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
    expected = delta.metadata.get("base_fingerprint")
    if check_fingerprint and expected:
        sub = {n: _pristine(weights[n]) for n in delta.layers}
        got = fingerprint(sub)
        if got != expected:
            raise DeltaMismatchError(
                f"delta was computed on a model with fingerprint {expected}, this one is {got}; "
                "pass check_fingerprint=False (CLI: --force) to apply it anyway"
            )


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
) -> AppliedDelta:
    """Add ``scale * delta`` to the named parameters in place; returns a handle to remove it."""
    check_compatible(delta, weights, check_fingerprint=check_fingerprint)
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
