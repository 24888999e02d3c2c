"""Weight deltas: the one currency every editing method produces and every host consumes.

A :class:`ConceptDelta` maps canonical layer names (diffusers module paths prefixed by the
pipeline component, e.g. ``unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k``
or ``text_encoder.text_model.encoder.layers.3.mlp.fc2``) to low-rank factors ``up @ down``
of the change of that layer's ``weight``, plus JSON-serialisable metadata.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Mapping

import torch

FINGERPRINT_SAMPLES = 4096


def check_rank(rank) -> int:
    """A rank limit is a positive integer (0 would write an empty LoRA, negatives slice wrongly)."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    return rank


@dataclass
class LayerDelta:
    up: torch.Tensor  # (out, r)
    down: torch.Tensor  # (r, in)

    def __post_init__(self):
        if self.up.ndim != 2 or self.down.ndim != 2 or self.up.shape[1] != self.down.shape[0]:
            raise ValueError(f"bad factor shapes up={tuple(self.up.shape)} down={tuple(self.down.shape)}")

    @property
    def shape(self) -> tuple[int, int]:
        return (self.up.shape[0], self.down.shape[1])

    @property
    def rank(self) -> int:
        return self.up.shape[1]

    def dense(self, dtype=torch.float32) -> torch.Tensor:
        return self.up.to(dtype) @ self.down.to(dtype)

    def compact(self, dtype=torch.float32) -> "LayerDelta":
        """Re-factor so the inner dimension never exceeds min(out, in) (exact, via QR)."""
        out, inn = self.shape
        if self.rank <= min(out, inn):
            return LayerDelta(self.up.to(dtype), self.down.to(dtype))
        # up @ down = Q (R down) with Q orthonormal (out x out) when out < r; symmetric case on down.
        if out <= inn:
            q, r = torch.linalg.qr(self.up.double())
            return LayerDelta(q.to(dtype), (r @ self.down.double()).to(dtype))
        q, r = torch.linalg.qr(self.down.double().mT)
        return LayerDelta((self.up.double() @ r.mT).to(dtype), q.mT.to(dtype))

    def truncated(self, rank: int) -> tuple["LayerDelta", float]:
        """Best rank-``rank`` approximation (SVD) and its relative Frobenius error."""
        check_rank(rank)
        if rank >= self.rank:
            return self, 0.0
        # SVD of the product through the thin QRs of each factor: never forms the dense matrix.
        qu, ru = torch.linalg.qr(self.up.double())
        qd, rd = torch.linalg.qr(self.down.double().mT)
        u, s, vh = torch.linalg.svd(ru @ rd.mT)
        total = s.pow(2).sum().item()
        err = (s[rank:].pow(2).sum().item() / total) ** 0.5 if total > 0 else 0.0
        sq = s[:rank].sqrt()
        up = (qu @ u[:, :rank]) * sq
        down = sq[:, None] * (vh[:rank] @ qd.mT)
        return LayerDelta(up.float(), down.float()), err


# What ``base_fingerprint`` covers, stored as ``fingerprint_scope``. Files without it (before
# this scope existed) hold fingerprint_v1 of the edited layers only.
FINGERPRINT_SCOPE = "layers+text_encoders/2"


def _sample(w: torch.Tensor) -> torch.Tensor:
    flat = w.detach().reshape(-1)
    step = max(1, flat.numel() // FINGERPRINT_SAMPLES)
    return flat[::step][:FINGERPRINT_SAMPLES].to(torch.float32).cpu()


def fingerprint(weights: Mapping[str, torch.Tensor]) -> str:
    """Hash of the named weights: names, shapes and a strided sample, as two 8-hex halves: the
    sample rounded to bfloat16, and to float16. Round-to-nearest is idempotent, so a bfloat16 copy
    of a model matches its original on the first half and a float16 copy on the second;
    :func:`fingerprints_match` accepts either half. Any other change of a sampled value beyond
    rounding (an edit) changes both."""
    hb, hh = hashlib.sha256(), hashlib.sha256()
    for name in sorted(weights):
        w = weights[name]
        s = _sample(w)
        for h, dt in ((hb, torch.bfloat16), (hh, torch.float16)):
            h.update(name.encode())
            h.update(str(tuple(w.shape)).encode())
            h.update(s.to(dt).view(torch.int16).numpy().tobytes())
    return hb.hexdigest()[:8] + hh.hexdigest()[:8]


def fingerprints_match(expected: str, got: str) -> bool:
    return expected == got or (len(expected) == len(got) == 16 and (expected[:8] == got[:8] or expected[8:] == got[8:]))


def fingerprint_v1(weights: Mapping[str, torch.Tensor]) -> str:
    """The fingerprint files written before ``fingerprint_scope`` carry (float16 rounding only)."""
    h = hashlib.sha256()
    for name in sorted(weights):
        w = weights[name]
        h.update(name.encode())
        h.update(str(tuple(w.shape)).encode())
        h.update(_sample(w).to(torch.float16).numpy().tobytes())
    return h.hexdigest()[:16]


@dataclass
class ConceptDelta:
    layers: dict[str, LayerDelta]
    metadata: dict = field(default_factory=dict)

    def __post_init__(self):
        for name, ld in self.layers.items():
            for part in (ld.up, ld.down):
                if not torch.isfinite(part).all():
                    raise ValueError(f"delta for layer {name} contains NaN/Inf")

    @property
    def max_rank(self) -> int:
        return max((ld.rank for ld in self.layers.values()), default=0)

    def stacked(self, other: "ConceptDelta") -> "ConceptDelta":
        """Sum of two deltas (factors concatenated, so still exact and low rank)."""
        layers = dict(self.layers)
        for name, ld in other.layers.items():
            if name in layers:
                a = layers[name]
                if a.shape != ld.shape:
                    raise ValueError(f"cannot stack deltas: {name} has shape {a.shape} vs {ld.shape}")
                layers[name] = LayerDelta(torch.cat([a.up, ld.up], 1), torch.cat([a.down, ld.down], 0)).compact()
            else:
                layers[name] = ld
        # Each part keeps its own fingerprint and the layers it covers, so the stack can be checked
        # part by part (core.apply.check_compatible) even when the parts were made on different
        # model states; a fingerprint shared by parts over the same layers is kept on the stack.
        parts = [dict(d.metadata, layer_names=sorted(d.layers)) for d in (self, other)]
        meta = {"method": "stack", "parts": parts}
        if self.metadata.get("family") == other.metadata.get("family"):
            meta["family"] = self.metadata.get("family")
        base = ("base_fingerprint", "encoder_fingerprint", "fingerprint_scope")
        if set(self.layers) == set(other.layers) and all(self.metadata.get(k) == other.metadata.get(k) for k in base):
            meta.update({k: self.metadata[k] for k in base if k in self.metadata})
        return ConceptDelta(layers, meta)

    def summary(self) -> dict:
        return {
            "method": self.metadata.get("method"),
            "edits": len(self.metadata.get("edits", [])),
            "layers": len(self.layers),
            "max_rank": self.max_rank,
            "family": self.metadata.get("family"),
            "base_fingerprint": self.metadata.get("base_fingerprint"),
        }
