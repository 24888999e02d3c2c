"""Unified Concept Editing (UCE) closed form, factored.

For a linear map W0 (out x d), edit keys c_i (rows of K) with targets v*_i and preserve keys
p_j (rows of P), UCE minimises

    sum_i s_e,i |W c_i - v*_i|^2 + sum_j s_p,j |W p_j - W0 p_j|^2 + lam |W - W0|_F^2

whose minimiser is W = (lam W0 + sum s_e v* c^T + sum s_p W0 p p^T) M^{-1} with
M = lam I + sum s_e c c^T + sum s_p p p^T. Subtracting W0 M / M gives the change

    dW = sum_i s_e,i (v*_i - W0 c_i) c_i^T M^{-1}   = up @ down,

rank <= number of edit keys. M depends only on the keys, which every cross-attention
to_k/to_v reads identically, so it is factorized once per edit. When v*_i = W0 t_i (erase,
replace, moderate, debias) dW = W0 (T - K)^T diag(s_e) K M^{-1}: one shared right factor.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .linalg import LayerSolution, SolveReport, check_finite, solve_spd


def _weights(w, n: int, dtype) -> torch.Tensor:
    if isinstance(w, torch.Tensor):
        w = w.to(dtype)
        if w.shape != (n,):
            raise ValueError(f"expected {n} weights, got shape {tuple(w.shape)}")
        return w
    return torch.full((n,), float(w), dtype=dtype)


def uce_system(
    edit_keys: torch.Tensor,
    preserve_keys: torch.Tensor | None,
    *,
    lam: float = 0.5,
    erase_scale: float | torch.Tensor = 1.0,
    preserve_scale: float | torch.Tensor = 1.0,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """M = lam I + K^T S_e K + P^T S_p P (d x d), accumulated in ``dtype``."""
    if lam < 0:
        raise ValueError(f"lambda must be >= 0, got {lam}")
    K = edit_keys.to(dtype)
    d = K.shape[1]
    se = _weights(erase_scale, K.shape[0], dtype)
    M = (K.mT * se) @ K
    if preserve_keys is not None and preserve_keys.shape[0]:
        P = preserve_keys.to(dtype)
        if P.shape[1] != d:
            raise ValueError(f"preserve keys have width {P.shape[1]}, edit keys {d}")
        sp = _weights(preserve_scale, P.shape[0], dtype)
        M = M + (P.mT * sp) @ P
    M.diagonal().add_(lam)
    return M


@dataclass
class UCESolution:
    """dW = W0 @ left @ right for every layer whose targets are W0 t (shared factorization).

    left = (T - K)^T (d x n); right = diag(s_e) K M^{-1} (n x d), in the accumulation dtype.
    """

    left: torch.Tensor
    right: torch.Tensor
    report: SolveReport

    def layer_factors(self, W0: torch.Tensor, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """(up, down) with up @ down = dW for the layer with original weight W0.

        The solve accumulates in float64; the per-layer products (the bulk of the FLOPs when
        many layers share one solve) run in ``dtype``.
        """
        left = self._cast(self.left, dtype)
        return W0.to(dtype) @ left, self._cast(self.right, dtype)

    def _cast(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        cache = self.__dict__.setdefault("_casts", {})
        key = (id(t), dtype)
        if key not in cache:
            cache[key] = t.to(dtype)
        return cache[key]


def _right_factor(K, M, se):
    # M is symmetric, so (K M^-1)^T = M^-1 K^T: one Cholesky solve with n right-hand sides.
    X, report = solve_spd(M, K.mT)
    return X.mT * se[:, None], report


def uce_solve(
    edit_keys: torch.Tensor,
    target_keys: torch.Tensor,
    preserve_keys: torch.Tensor | None = None,
    *,
    lam: float = 0.5,
    erase_scale: float | torch.Tensor = 1.0,
    preserve_scale: float | torch.Tensor = 1.0,
    dtype: torch.dtype = torch.float64,
) -> UCESolution:
    """Shared UCE solve for targets v*_i = W0 t_i (t_i = rows of ``target_keys``)."""
    if edit_keys.ndim != 2 or edit_keys.shape != target_keys.shape:
        raise ValueError(
            f"edit keys {tuple(edit_keys.shape)} and target keys {tuple(target_keys.shape)} must both be (n, d)"
        )
    if edit_keys.shape[0] == 0:
        raise ValueError("no edit keys: name at least one concept to edit")
    check_finite("edit keys", edit_keys)
    check_finite("target keys", target_keys)
    K = edit_keys.to(dtype)
    se = _weights(erase_scale, K.shape[0], dtype)
    M = uce_system(edit_keys, preserve_keys, lam=lam, erase_scale=se, preserve_scale=preserve_scale, dtype=dtype)
    right, report = _right_factor(K, M, se)
    left = (target_keys.to(dtype) - K).mT
    return UCESolution(left=left, right=right, report=report)


def uce_solve_layer(
    W0: torch.Tensor,
    edit_keys: torch.Tensor,
    target_values: torch.Tensor,
    preserve_keys: torch.Tensor | None = None,
    *,
    lam: float = 0.5,
    erase_scale: float | torch.Tensor = 1.0,
    preserve_scale: float | torch.Tensor = 1.0,
    dtype: torch.dtype = torch.float64,
    system: torch.Tensor | None = None,
) -> LayerSolution:
    """General UCE for one layer with arbitrary target values V (n x out).

    Pass ``system`` (from :func:`uce_system`) to reuse M across layers.
    """
    if target_values.shape != (edit_keys.shape[0], W0.shape[0]):
        raise ValueError(
            f"target values must be (n_edit={edit_keys.shape[0]}, out={W0.shape[0]}), got {tuple(target_values.shape)}"
        )
    check_finite("target values", target_values)
    K = edit_keys.to(dtype)
    se = _weights(erase_scale, K.shape[0], dtype)
    M = system if system is not None else uce_system(
        edit_keys, preserve_keys, lam=lam, erase_scale=se, preserve_scale=preserve_scale, dtype=dtype
    )
    X, report = solve_spd(M, K.mT)  # d x n
    resid = target_values.to(dtype) - K @ W0.to(dtype).mT  # n x out
    up = resid.mT * se[None, :]
    return LayerSolution(up=up, down=X.mT, report=report)
