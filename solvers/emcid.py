"""EMCID stage II: closed-form MLP editing with editing intensity alpha, and MEMIT-style spreading.

Row convention (as in :mod:`.uce`): keys are rows. For one linear layer with weight W0 (out x d),
edit keys K1 (n x d) with residuals R (n x out) = V1* - K1 W0^T, and the uncentered second moment
of the preserved keys C0 (d x d, already scaled by its weight), EMCID's eq. 5 minimises

    alpha * |(W0 + D) K1^T - V1*^T|^2 + (1 - alpha) * tr(D C0 D^T)

(the second term is |D K0^T|^2 with C0 = K0^T K0). Setting the gradient to zero gives

    D (alpha K1^T K1 + (1 - alpha) C0) = alpha R^T K1,
    D = alpha R^T K1 M^{-1},   M = (1 - alpha) C0 + alpha K1^T K1,

i.e. D = up @ down with up = alpha R^T (out x n) and down = K1 M^{-1} (n x d): rank <= n.

Two extensions keep the form: per-key weights W = diag(w) (the edit term becomes
alpha |W^(1/2) (D K1^T - R^T)|^2: K1^T K1 -> K1^T W K1, R^T K1 -> R^T W K1) and preserved keys
Kp held like edit keys with zero residual and weight s (M gains alpha s Kp^T Kp).
M is symmetric positive definite for alpha < 1 and C0 > 0, so it is factorized by Cholesky
(:func:`.linalg.solve_spd`), never inverted.

Multi-layer spreading (MEMIT): the target is a hidden state z* at the output of the *last*
edited layer L. Layers are edited shallow to deep; before editing layer l (the i-th of n
layers) the keys of layer l and the current z at layer L are recomputed with every earlier
layer already edited, and layer l receives the residual share (z* - z_cur) / (n - i).
:func:`spread_residual` is that share; the host-side driver does the recomputation.
"""
from __future__ import annotations

import torch

from .linalg import LayerSolution, check_finite, solve_spd


def emcid_system(keys: torch.Tensor, cov: torch.Tensor | None, *, alpha: float = 0.5, dtype=torch.float64,
                 weights: torch.Tensor | None = None, preserve_keys: torch.Tensor | None = None,
                 preserve_scale: float = 1.0) -> torch.Tensor:
    """M = (1 - alpha) C0 + alpha (K1^T W K1 + s Kp^T Kp) (d x d) in ``dtype``."""
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"editing intensity alpha must be in (0, 1], got {alpha}")
    K = keys.to(dtype)
    KW = K if weights is None else K * weights.to(dtype)[:, None]
    M = alpha * (KW.mT @ K)
    if preserve_keys is not None and preserve_scale:
        Kp = preserve_keys.to(dtype)
        M = M + alpha * preserve_scale * (Kp.mT @ Kp)
    if cov is not None:
        if cov.shape != (K.shape[1], K.shape[1]):
            raise ValueError(f"covariance has shape {tuple(cov.shape)}, keys have width {K.shape[1]}")
        M = M + (1.0 - alpha) * cov.to(dtype)
    return M


def emcid_solve_layer(
    keys: torch.Tensor,
    residuals: torch.Tensor,
    cov: torch.Tensor | None,
    *,
    alpha: float = 0.5,
    dtype: torch.dtype = torch.float64,
    weights: torch.Tensor | None = None,
    preserve_keys: torch.Tensor | None = None,
    preserve_scale: float = 1.0,
) -> LayerSolution:
    """Stage II update for one layer: D = alpha R^T W K1 [(1-alpha) C0 + alpha (K1^T W K1 + s Kp^T Kp)]^{-1}.

    ``weights`` (n,): per-key weights w (None: 1); ``preserve_keys`` (m x d): keys whose outputs
    are held like edit keys of weight ``preserve_scale`` with zero residual.

    ``keys`` (n x d) are the layer inputs at the edited tokens, ``residuals`` (n x out) the
    wanted change of its outputs there, ``cov`` (d x d) the preserved keys' second moment
    (scaled as the caller wants it weighted; None means no preservation term, which with
    alpha = 1 gives the minimum-norm-free least-squares fit regularized only by solve_spd).
    """
    if keys.ndim != 2 or residuals.ndim != 2 or keys.shape[0] != residuals.shape[0]:
        raise ValueError(f"keys {tuple(keys.shape)} and residuals {tuple(residuals.shape)} must be (n, d) and (n, out)")
    if keys.shape[0] == 0:
        raise ValueError("no edit keys")
    check_finite("edit keys", keys)
    check_finite("residuals", residuals)
    if weights is not None and (weights.shape != (keys.shape[0],) or (weights < 0).any()):
        raise ValueError(f"weights must be {keys.shape[0]} non-negative numbers")
    M = emcid_system(keys, cov, alpha=alpha, dtype=dtype, weights=weights, preserve_keys=preserve_keys, preserve_scale=preserve_scale)
    X, report = solve_spd(M, keys.to(dtype).mT)  # d x n = M^{-1} K1^T
    R = residuals.to(dtype) if weights is None else residuals.to(dtype) * weights.to(dtype)[:, None]
    up = alpha * R.mT
    return LayerSolution(up=up, down=X.mT, report=report)


def emcid_objective(W0, D, keys, targets, cov, alpha: float, weights=None, preserve_keys=None, preserve_scale=1.0) -> torch.Tensor:
    """Value of the stage II objective at W = W0 + D (for tests and diagnostics)."""
    W = (W0 + D).double()
    rows = ((keys.double() @ W.mT - targets.double()) ** 2).sum(1)
    fit = (rows * weights.double()).sum() if weights is not None else rows.sum()
    if preserve_keys is not None:
        fit = fit + preserve_scale * ((preserve_keys.double() @ D.double().mT) ** 2).sum()
    keep = torch.trace(D.double() @ cov.double() @ D.double().mT) if cov is not None else 0.0
    return alpha * fit + (1 - alpha) * keep


def spread_residual(target: torch.Tensor, current: torch.Tensor, layer_index: int, n_layers: int) -> torch.Tensor:
    """MEMIT's share of the residual for the ``layer_index``-th (0-based) of ``n_layers`` layers."""
    if not 0 <= layer_index < n_layers:
        raise ValueError(f"layer index {layer_index} outside 0..{n_layers - 1}")
    return (target - current) / (n_layers - layer_index)
