"""Symmetric positive-definite solves shared by every closed-form editor."""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch


@dataclass
class SolveReport:
    """What happened inside a solve, so callers can surface it to users."""

    condition: float  # 2-norm condition number estimate of the system matrix
    jitter: float  # extra ridge added to make the factorization succeed (0 if none)


@dataclass
class LayerSolution:
    """One layer's closed-form update dW = up @ down (UCE per layer, EMCID stage II, null space).

    ``kept_rank`` / ``coverage``: for null-space solves, the dimension of the space the update
    may use and the share of the edit keys' energy inside it (None for the other solvers).
    """

    up: torch.Tensor  # (out, n)
    down: torch.Tensor  # (n, d)
    report: SolveReport
    kept_rank: int | None = None
    coverage: float | None = None

    def dense(self) -> torch.Tensor:
        return self.up @ self.down


class IllConditionedWarning(UserWarning):
    pass


def check_finite(name: str, t: torch.Tensor) -> None:
    if not torch.isfinite(t).all():
        bad = (~torch.isfinite(t)).sum().item()
        raise ValueError(f"{name} contains {bad} NaN/Inf values; refusing to solve with them")


def solve_spd(M: torch.Tensor, B: torch.Tensor, *, cond_limit: float = 1e10) -> tuple[torch.Tensor, SolveReport]:
    """Solve M X = B for symmetric positive-definite M by Cholesky (never an explicit inverse).

    The condition number is estimated from the Cholesky diagonal (cheap; a lower bound).
    If M is numerically singular or that estimate exceeds ``cond_limit``, a ridge is added
    (growing until the factorization is healthy) and reported, rather than returning garbage.
    """
    check_finite("system matrix", M)
    check_finite("right-hand side", B)
    M = 0.5 * (M + M.mT)  # accumulated outer products drift from exact symmetry
    eye = torch.eye(M.shape[-1], dtype=M.dtype, device=M.device)
    scale = M.diagonal().abs().max().item() or 1.0
    jitter = 0.0
    cond = float("inf")
    for _ in range(12):
        L, info = torch.linalg.cholesky_ex(M + jitter * eye if jitter else M)
        if int(info) == 0:
            d = L.diagonal()
            cond = (d.max() / d.min()).item() ** 2
            if cond <= cond_limit:
                if jitter:
                    warnings.warn(
                        f"edit system is ill-conditioned; regularized with ridge {jitter:.3g} "
                        f"(relative {jitter / scale:.1e}). Raise lambda or add preserve concepts to avoid this.",
                        IllConditionedWarning,
                        stacklevel=2,
                    )
                return torch.cholesky_solve(B, L), SolveReport(condition=cond, jitter=jitter)
        jitter = scale * 1e-10 if jitter == 0.0 else jitter * 10
    raise ValueError("edit system could not be factorized even after regularization; check the keys for degeneracy")
