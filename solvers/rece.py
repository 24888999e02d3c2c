"""RECE's adversarial embedding in closed form (Gong et al., Reliable and Efficient Concept Erasure, ECCV 2024).

After an erasing edit W_l -> W'_l of the cross-attention projections (to_k and to_v of every
cross-attention layer, l = 1..L), RECE asks which text embedding x the *edited* projections still
map to what the *original* ones produced for the erased concept's embedding c:

    x* = argmin_x  sum_l |W'_l x - W_l c|^2 + lam |x - r|^2

with r = 0 (the official default, "regzero") or a reference embedding r (the official "standard"
regulariser, r = the embedding of the concept's guide). The objective is a ridge least-squares
problem; its gradient 2 (sum W'^T W' + lam I) x - 2 (sum W'^T W c + lam r) vanishes at

    x* = (EE + lam I)^{-1} (EO c + lam r),   EE = sum_l W'_l^T W'_l,  EO = sum_l W'_l^T W_l,

so only d x d Gram sums enter, and one Cholesky factorization serves every key row c. With
OO = sum_l W_l^T W_l the objective's data term is x^T EE x - 2 x^T EO c + c^T OO c.

When the edited layers change as W'_l = W_l A (A = I + D, D the key-space factor every UCE-style
delta shares) and the others are kept, EE = A^T G_e A + G_k, EO = A^T G_e + G_k, OO = G_e + G_k with
G_e, G_k the original Gram sums of the edited and kept layers (:func:`rece_system_factored`):
the layers' weights are read once however many rounds of attack and re-erasure follow.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .linalg import SolveReport, check_finite, solve_spd


@dataclass
class RECESystem:
    """The Gram sums of the closed form (d x d, accumulation dtype)."""

    EE: torch.Tensor  # sum W'^T W'  (edited, edited)
    EO: torch.Tensor  # sum W'^T W   (edited, original)
    OO: torch.Tensor  # sum W^T W    (original, original): only for distances and objective values


def gram(weights: Sequence[torch.Tensor], *, dtype: torch.dtype = torch.float64,
         compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """sum_l W_l^T W_l (d x d) in ``dtype``; each product runs in ``compute_dtype`` (default ``dtype``)."""
    compute_dtype = compute_dtype or dtype
    out = None
    for W in weights:
        W = W.detach().to(compute_dtype)
        g = (W.mT @ W).to(dtype=dtype, device="cpu")
        out = g if out is None else out + g
    if out is None:
        raise ValueError("no weights given")
    return out


def rece_system(edited: Sequence[torch.Tensor], original: Sequence[torch.Tensor], *,
                dtype: torch.dtype = torch.float64) -> RECESystem:
    """The system of explicit weight pairs (W'_l, W_l): every projection the model reads the text
    through, edited or not (an unedited projection has W'_l = W_l)."""
    if len(edited) != len(original) or not edited:
        raise ValueError(f"need one original weight per edited weight, got {len(edited)} and {len(original)}")
    d = edited[0].shape[1]
    EE = torch.zeros(d, d, dtype=dtype)
    EO = torch.zeros(d, d, dtype=dtype)
    OO = torch.zeros(d, d, dtype=dtype)
    for We, Wo in zip(edited, original):
        if We.shape != Wo.shape or We.shape[1] != d:
            raise ValueError(f"weight shapes {tuple(We.shape)} and {tuple(Wo.shape)} do not match (input width {d})")
        We, Wo = We.detach().to(dtype), Wo.detach().to(dtype)
        EE += We.mT @ We
        EO += We.mT @ Wo
        OO += Wo.mT @ Wo
    return RECESystem(EE, EO, OO)


def rece_system_factored(gram_edited: torch.Tensor, gram_kept: torch.Tensor | None,
                         transform: torch.Tensor) -> RECESystem:
    """The system when each edited layer's weight is W_l @ ``transform`` (A, d x d) and the kept
    layers are unchanged; ``gram_edited`` / ``gram_kept`` are their original Gram sums."""
    A = transform.to(gram_edited.dtype)
    GeA = gram_edited @ A
    EE = A.mT @ GeA
    EO = A.mT @ gram_edited
    OO = gram_edited
    if gram_kept is not None:
        EE, EO, OO = EE + gram_kept, EO + gram_kept, OO + gram_kept
    return RECESystem(0.5 * (EE + EE.mT), EO, OO)


def adversarial_embeddings(system: RECESystem, keys: torch.Tensor, *, lam: float,
                           reference: torch.Tensor | None = None) -> tuple[torch.Tensor, SolveReport]:
    """x* for each row c of ``keys`` (n x d): rows of (EE + lam I)^{-1} (EO c + lam r).

    ``reference``: None (regularise towards 0, the official default) or rows r (n x d, or one row)."""
    if lam < 0:
        raise ValueError(f"the regulariser weight must be >= 0, got {lam}")
    if keys.ndim != 2 or keys.shape[1] != system.EE.shape[0]:
        raise ValueError(f"keys must be (n, {system.EE.shape[0]}), got {tuple(keys.shape)}")
    check_finite("keys", keys)
    dtype = system.EE.dtype
    rhs = system.EO @ keys.to(dtype).mT  # d x n
    if reference is not None and lam:
        check_finite("reference", reference)
        rhs = rhs + lam * torch.broadcast_to(reference.to(dtype), keys.shape).mT
    M = system.EE.clone()
    M.diagonal().add_(lam)
    X, report = solve_spd(M, rhs)
    return X.mT, report


def output_residual(system: RECESystem, x: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """sum_l |W'_l x - W_l c|^2 per row pair (x_i, c_i), from the Gram sums (clamped at 0)."""
    dtype = system.EE.dtype
    x, c = x.to(dtype), keys.to(dtype)
    r = (x @ system.EE * x).sum(1) - 2 * (x @ system.EO * c).sum(1) + (c @ system.OO * c).sum(1)
    return r.clamp_min(0)


def output_distance(system: RECESystem, x: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Relative distance of the edited outputs of x from the original outputs of c, per row:
    sqrt(sum_l |W'_l x - W_l c|^2 / sum_l |W_l c|^2)."""
    c = keys.to(system.OO.dtype)
    ref = (c @ system.OO * c).sum(1).clamp_min(1e-300)
    return (output_residual(system, x, keys) / ref).sqrt()
