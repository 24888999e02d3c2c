"""Null-space constrained editing (AlphaEdit, adapted to CLIP text-encoder / cross-attention layers).

Row convention: keys are rows. C0 (d x d) is the uncentered second moment of the keys whose
outputs must not move. Its eigenvectors with eigenvalues below a threshold span (numerically)
the null space of the preserved keys; with U (d x k) those eigenvectors, P = U U^T and P k0 ~ 0
for every preserved key k0.

The update is constrained to D = Y U^T, so D k0 = Y U^T k0: a preserved output moves only by
the part of its key inside the kept subspace, whose share of the preserved energy is the
projector's ``leakage`` (small, not zero: the kept eigenvalues are below the threshold, not 0). For edit keys K1 (n x d) with residuals R (n x out), earlier edits' keys
Kp (m x d) (whose outputs must stay as those edits left them) and ridge lam, AlphaEdit minimises

    |D K1^T - R^T|^2 + |D Kp^T|^2 + lam |D|^2        over D = Y U^T,

whose normal equations in the k-dimensional subspace are symmetric positive definite:

    Y (U^T (K1^T K1 + Kp^T Kp) U + lam I_k) = R^T K1 U.

So D = up @ down with up = R^T (out x n) and down = K1 U M^{-1} U^T (n x d), M = U^T A U + lam I.
This is exactly AlphaEdit's D = R K1^T P (K1 K1^T P + Kp Kp^T P + lam I)^{-1} (column
convention): that D satisfies D = D P, and restricted to range(P) the two systems coincide.
Solving the k x k SPD system by Cholesky avoids the non-symmetric d x d solve.

Equality constraints (SPEED's invariant keys, rows of Kc): D Kc^T = 0 exactly. With Z = U^T Kc^T
the Lagrangian gives Y = R^T K1 U [M^{-1} - M^{-1} Z (Z^T M^{-1} Z)^{-1} Z^T M^{-1}], which is
SPEED's d x d form R K1^T P (I - M' K2 (K2^T P M' K2)^{-1} K2^T P) M', M' = (K1 K1^T P + lam I)^{-1}
(P M' = U M^{-1} U^T). The hard constraint depends only on the span of Z, so Z is replaced by an
orthonormal basis of it (well conditioned even when Kc lies almost inside the protected space);
a ridge ``invariant_ridge`` > 0 (SPEED's ``lamb``) softens it to (Z^T M^{-1} Z + ridge I)^{-1} on Z itself.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .linalg import LayerSolution, SolveReport, check_finite, solve_spd


@dataclass
class NullSpaceProjector:
    basis: torch.Tensor  # (d, k) orthonormal: eigenvectors of C0 with eigenvalue below the threshold
    eigenvalues: torch.Tensor  # all eigenvalues of C0, ascending
    threshold: float  # absolute threshold actually applied
    dim: int

    @property
    def kept_rank(self) -> int:
        """Dimension of the subspace edits may use (k)."""
        return int(self.basis.shape[1])

    @property
    def protected_rank(self) -> int:
        return self.dim - self.kept_rank

    @property
    def leakage(self) -> float:
        """Fraction of the preserved keys' energy inside the editable subspace: |K0 P|^2 / |K0|^2."""
        ev = self.eigenvalues.clamp_min(0)
        tot = ev.sum().item()
        return ev[: self.kept_rank].sum().item() / tot if tot > 0 else 0.0

    def matrix(self) -> torch.Tensor:
        """P = U U^T (d x d)."""
        return self.basis @ self.basis.mT

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Rows of ``x`` projected onto the editable subspace: x P."""
        U = self.basis.to(x.dtype)
        return (x @ U) @ U.mT

    def coverage(self, keys: torch.Tensor) -> float:
        """Fraction of the keys' energy inside the editable subspace (0: the edit cannot act)."""
        k = keys.to(self.basis.dtype)
        tot = k.pow(2).sum().item()
        return (k @ self.basis).pow(2).sum().item() / tot if tot > 0 else 0.0


def null_space_projector(
    cov: torch.Tensor, *, threshold: float = 2e-2, relative: bool = False, dtype: torch.dtype = torch.float64
) -> NullSpaceProjector:
    """Projector onto the eigenvectors of ``cov`` whose eigenvalues fall below ``threshold``.

    The default is AlphaEdit's: an absolute 2e-2 on a mean second moment (``nullspace_threshold``
    in its hparams). With ``relative`` the threshold is a fraction of the largest eigenvalue instead. Eigenvalues come ascending from ``eigh``, so the
    kept ones are the first ``kept_rank``; ``leakage`` reports how much preserved energy they hold.
    """
    if cov.ndim != 2 or cov.shape[0] != cov.shape[1]:
        raise ValueError(f"covariance must be square, got {tuple(cov.shape)}")
    check_finite("covariance", cov)
    C = cov.to(dtype)
    C = 0.5 * (C + C.mT)
    evals, evecs = torch.linalg.eigh(C)
    top = evals[-1].clamp_min(0).item()
    thr = threshold * top if relative else threshold
    keep = evals < thr
    return NullSpaceProjector(basis=evecs[:, keep].contiguous(), eigenvalues=evals, threshold=float(thr), dim=C.shape[0])


def projector_from_keys(keys: torch.Tensor, **kw) -> NullSpaceProjector:
    """Projector from a preserve set given as key rows (n x d): C0 = K^T K / n."""
    K = keys.to(torch.float64)
    return null_space_projector(K.mT @ K / max(1, K.shape[0]), **kw)


def nullspace_solve_layer(
    keys: torch.Tensor,
    residuals: torch.Tensor,
    projector: NullSpaceProjector,
    *,
    history_gram: torch.Tensor | None = None,
    lam: float = 1.0,
    dtype: torch.dtype = torch.float64,
    weights: torch.Tensor | None = None,
    invariant_keys: torch.Tensor | None = None,
    invariant_ridge: float = 0.0,
) -> LayerSolution:
    """Constrained update for one layer (see module docstring). ``history_gram`` is Kp^T Kp;
    ``weights`` (n,) weight each edit key's fit (|W^(1/2) (D K1^T - R^T)|^2; None: 1);
    ``invariant_keys`` (m, d): rows whose outputs the update must leave exactly unchanged
    (D Kc^T = 0; with ``invariant_ridge`` > 0 only approximately)."""
    if keys.ndim != 2 or residuals.ndim != 2 or keys.shape[0] != residuals.shape[0]:
        raise ValueError(f"keys {tuple(keys.shape)} and residuals {tuple(residuals.shape)} must be (n, d) and (n, out)")
    if keys.shape[1] != projector.dim:
        raise ValueError(f"keys have width {keys.shape[1]}, projector {projector.dim}")
    if lam < 0:
        raise ValueError("lambda must be >= 0")
    check_finite("edit keys", keys)
    check_finite("residuals", residuals)
    K = keys.to(dtype)
    U = projector.basis.to(dtype)
    k = U.shape[1]
    n = K.shape[0]
    if k == 0:  # the preserved keys span everything: no edit is possible without moving them
        zeros_up = torch.zeros(residuals.shape[1], n, dtype=dtype)
        return LayerSolution(zeros_up, torch.zeros(n, K.shape[1], dtype=dtype), SolveReport(1.0, 0.0), kept_rank=0, coverage=0.0)
    if weights is not None and (weights.shape != (n,) or (weights < 0).any()):
        raise ValueError(f"weights must be {n} non-negative numbers")
    KU = K @ U  # n x k
    KUw = KU if weights is None else KU * weights.to(dtype)[:, None]
    M = KUw.mT @ KU
    if history_gram is not None:
        M = M + U.mT @ history_gram.to(dtype) @ U
    M.diagonal().add_(lam)
    Z = _invariant_basis(invariant_keys, U, invariant_ridge, dtype)
    if Z is None:
        X, report = solve_spd(M, KUw.mT)  # k x n = M^{-1} U^T K1^T W
    else:  # one factorization for both right-hand sides
        XG, report = solve_spd(M, torch.cat([KUw.mT, Z], 1))
        X, G = XG[:, :n], XG[:, n:]  # M^{-1} U^T K1^T W, M^{-1} Z
        S = Z.mT @ G
        S.diagonal().add_(invariant_ridge)
        L, _ = solve_spd(S, Z.mT @ X)
        X = X - G @ L  # [M^{-1} - M^{-1} Z S^{-1} Z^T M^{-1}] U^T K1^T W
    down = (U @ X).mT  # n x d = W K1 U M^{-1} U^T
    return LayerSolution(
        up=residuals.to(dtype).mT, down=down, report=report, kept_rank=k, coverage=projector.coverage(keys)
    )


def _invariant_basis(keys, U, ridge: float, dtype, rcond: float = 1e-12):
    """Z = U^T Kc^T (k x m), or with ridge 0 an orthonormal basis of its span (None: no constraint)."""
    if keys is None or keys.shape[0] == 0:
        return None
    if keys.ndim != 2 or keys.shape[1] != U.shape[0]:
        raise ValueError(f"invariant keys must be (m, {U.shape[0]}), got {tuple(keys.shape)}")
    if ridge < 0:
        raise ValueError("the invariant ridge must be >= 0")
    check_finite("invariant keys", keys)
    Kc = keys.to(dtype)
    Z = U.mT @ Kc.mT
    if ridge:
        return Z
    # components below rcond x the keys' own size are rounding, not directions to hold
    Q, sv, _ = torch.linalg.svd(Z, full_matrices=False)
    keep = sv > rcond * Kc.norm(dim=1).max()
    return Q[:, keep] if keep.any() else None


def nullspace_objective(D, keys, residuals, projector, history_gram=None, lam: float = 1.0, weights=None) -> torch.Tensor:
    """|W^(1/2) (D K1^T - R^T)|^2 + tr(D Kp^T Kp D^T) + lam |D|^2 (for tests and diagnostics)."""
    D = D.double()
    rows = ((keys.double() @ D.mT - residuals.double()) ** 2).sum(1)
    val = (rows * weights.double()).sum() if weights is not None else rows.sum()
    val = val + lam * D.pow(2).sum()
    if history_gram is not None:
        val = val + torch.trace(D @ history_gram.double() @ D.mT)
    return val


@dataclass
class EditHistory:
    """Keys of earlier edits per layer (Kp), kept as Gram matrices Kp^T Kp; resettable.

    Sequential null-space editing passes ``history.gram(name)`` to the solver so that a new
    edit does not undo the ones before it, then ``history.add(name, keys)``.
    """

    grams: dict[str, torch.Tensor] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    def add(self, name: str, keys: torch.Tensor) -> None:
        K = keys.detach().to(torch.float64).cpu()
        g = K.mT @ K
        self.grams[name] = self.grams[name] + g if name in self.grams else g
        self.counts[name] = self.counts.get(name, 0) + int(K.shape[0])

    def gram(self, name: str) -> torch.Tensor | None:
        return self.grams.get(name)

    def reset(self, name: str | None = None) -> None:
        if name is None:
            self.grams.clear()
            self.counts.clear()
        else:
            self.grams.pop(name, None)
            self.counts.pop(name, None)

    def __len__(self) -> int:
        return sum(self.counts.values())

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.grams.items()}

    @classmethod
    def from_state_dict(cls, grams: dict[str, torch.Tensor], counts: dict[str, int] | None = None) -> "EditHistory":
        return cls(grams={k: v.to(torch.float64) for k, v in grams.items()}, counts=dict(counts or {k: 0 for k in grams}))
