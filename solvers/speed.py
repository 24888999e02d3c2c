"""SPEED (Li et al., Scalable, Precise, and Efficient Concept Erasure, ICLR 2026): null-space
constrained editing of a cross-attention projection with a refined retain set.

Row convention: keys are rows. For one projection W (out x d), edit keys K (n x d) with target
keys T (targets W t: erase to a guide, replace to a destination) and per-row weights s (the
official code averages over the edit keys: s = weight / n), SPEED solves

    min_D  sum_i s_i |(W + D) k_i - W t_i|^2 + retain_scale |D|^2
    s.t.   D = D P          (P: null space of the retain set's mean second moment, eigenvalues < threshold)
           D c = 0          for every invariant key c (IEC)

with the closed form of :func:`.nullspace.nullspace_solve_layer` (its ``invariant_keys``). D is
``W (T - K)^T @ down``: rank <= n, the ``up`` factor is the layer's weight times a shared matrix.

The retain set is refined per layer before its projector is built:

* **Influence-based Prior Filtering (IPF).** The unconstrained edit E = W (T-K)^T S K (I + K^T S K)^{-1}
  (UCE with ridge 1 and no preserve term, :func:`erase_map`) scores each retain key c by
  |E c|; only keys scoring above the mean are kept (the ones the edit would disturb most).
* **Directed Prior Augmentation (DPA).** For each kept key, ``aug_num`` copies c + z v with
  z ~ N(0, 1) and v the right singular vector of W's smallest singular value (reduced SVD: a
  direction W barely reads, so W (c + z v) ~ W c: the copy means what c means to this layer);
  the official code draws noise @ v v^T with d-dimensional noise, the same in distribution. Only
  copies scoring above the mean of all copies are kept.
* **Invariant Equality Constraints (IEC)** (:func:`invariant_keys`): the [SOT] state of the
  null text and k-means centres of its remaining (EOS / padding) states.

The refined second moment is (sum over kept keys and kept copies of x x^T) / their count. A copy is
c + z v, so the copies of one key add (n_c c c^T + a v^T + v a^T + b v v^T) with a = (sum z) c,
b = sum z^2: one weighted Gram of the kept keys per layer, however many copies.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .linalg import LayerSolution, check_finite
from .nullspace import NullSpaceProjector, null_space_projector, nullspace_solve_layer
from .uce import UCESolution, uce_solve


def kmeans(X: torch.Tensor, k: int, *, init: torch.Tensor | list[int] | None = None, tol: float = 1e-4,
           max_iter: int = 1000) -> torch.Tensor:
    """Lloyd's k-means of the rows of ``X`` (squared Euclidean distance), centres (k x d).

    The iteration of ``kmeans_pytorch`` (the official code's dependency): assign each row to its
    nearest centre, move each centre to the mean of its rows, stop when (sum of the centres' shifts)^2
    < ``tol``. ``init``: indices of the starting rows; None: deterministic farthest-point seeding (the
    first row, then repeatedly the row farthest from the centres chosen so far) instead of its random
    draw. A centre left without rows stays where it is (kmeans_pytorch would make it NaN)."""
    if X.ndim != 2 or not 1 <= k <= X.shape[0]:
        raise ValueError(f"k-means needs 1 <= k <= rows, got k={k} for {tuple(X.shape)}")
    check_finite("k-means input", X)
    if init is None:
        idx = [0]
        d2 = ((X - X[0]) ** 2).sum(1)
        for _ in range(k - 1):
            i = int(torch.argmax(d2))
            idx.append(i)
            d2 = torch.minimum(d2, ((X - X[i]) ** 2).sum(1))
    else:
        idx = [int(i) for i in init]
        if len(idx) != k or len(set(idx)) != k:
            raise ValueError(f"init must be {k} distinct row indices, got {idx}")
    C = X[idx].clone()
    for _ in range(max_iter):
        assign = torch.argmin(((X[:, None, :] - C[None]) ** 2).sum(-1), dim=1)
        prev = C.clone()
        for j in range(k):
            rows = X[assign == j]
            if rows.shape[0]:
                C[j] = rows.mean(0)
        if ((C - prev) ** 2).sum(1).sqrt().sum() ** 2 < tol:
            break
    return C


def invariant_keys(null_states: torch.Tensor, clusters: int = 3, *, init=None) -> torch.Tensor:
    """IEC keys from the null text's states (L x d, the full padded sequence the pipeline feeds):
    the [SOT] state (row 0: the same in every prompt, CLIP is causal) and ``clusters`` k-means centres
    of the other rows (its EOS and padding states); ``clusters`` 0: the [SOT] state only."""
    if null_states.ndim != 2 or null_states.shape[0] < 2:
        raise ValueError(f"null-text states must be (L >= 2, d), got {tuple(null_states.shape)}")
    if clusters < 0:
        raise ValueError(f"clusters must be >= 0, got {clusters}")
    rows = [null_states[:1]]
    if clusters:
        rows.append(kmeans(null_states[1:], clusters, init=init))
    return torch.cat(rows)


def least_direction(W: torch.Tensor) -> torch.Tensor:
    """Unit right singular vector of W's smallest singular value in the reduced SVD (d,), float64:
    for a wide W (out < d) the smallest of its ``out`` singular values, not a null direction."""
    _, _, Vh = torch.linalg.svd(W.detach().double(), full_matrices=False)
    return Vh[-1]


def erase_map(edit_keys: torch.Tensor, target_keys: torch.Tensor, weights: torch.Tensor) -> UCESolution:
    """The unconstrained edit whose effect scores the retain keys: W @ left @ right with
    left = (T - K)^T, right = S K (I + K^T S K)^{-1} (UCE, ridge 1, no preserve term)."""
    return uce_solve(edit_keys, target_keys, None, lam=1.0, erase_scale=weights)


def _above_mean(scores: torch.Tensor) -> torch.Tensor:
    """scores > their mean; every entry when none is (all equal: nothing to choose between)."""
    keep = scores > scores.mean()
    return keep if keep.any() else torch.ones_like(keep)


@dataclass
class RetainMoment:
    """A layer's refined retain set: its mean second moment and what went into it."""

    moment: torch.Tensor  # (d, d) float64
    n_retain: int  # retain keys given
    n_kept: int  # kept by IPF
    n_augmented: int  # DPA copies kept
    influence: torch.Tensor  # |E c| of every retain key (n_retain,)


def retain_moment(W: torch.Tensor, erase: UCESolution, retain: torch.Tensor | None, *, filter: bool = True,
                  noise: torch.Tensor | None = None) -> RetainMoment:
    """IPF and DPA for the layer with weight ``W`` (see the module docstring).

    ``retain``: the retain keys (m x d) or None; ``filter``: apply IPF; ``noise``: (m x aug) the
    z of each key's copies (rows of keys IPF drops are ignored), None or aug 0: no DPA."""
    dtype = torch.float64
    d = W.shape[1]
    if retain is None or retain.shape[0] == 0:
        z = torch.zeros(d, d, dtype=dtype)
        return RetainMoment(z, 0, 0, 0, torch.zeros(0, dtype=dtype))
    if retain.ndim != 2 or retain.shape[1] != d:
        raise ValueError(f"retain keys must be (m, {d}), got {tuple(retain.shape)}")
    check_finite("retain keys", retain)
    Rk = retain.to(dtype)
    WL = W.detach().to(dtype) @ erase.left.to(dtype)  # out x n
    H = WL.mT @ WL  # |E x|^2 = (right x)^T H (right x)
    right = erase.right.to(dtype)
    u = Rk @ right.mT  # m x n
    q = ((u @ H) * u).sum(1).clamp_min(0)
    influence = q.sqrt()
    keep = _above_mean(influence) if filter else torch.ones(Rk.shape[0], dtype=torch.bool)
    Kf = Rk[keep]
    counts = torch.ones(Kf.shape[0], dtype=dtype)
    extra = torch.zeros(d, d, dtype=dtype)
    n_aug = 0
    if noise is not None and noise.shape[1] > 0:
        if noise.shape[0] != Rk.shape[0]:
            raise ValueError(f"noise must have one row per retain key ({Rk.shape[0]}), got {tuple(noise.shape)}")
        z = noise.to(dtype)[keep]  # kept x aug
        v = least_direction(W)
        g = right @ v  # n
        uf = u[keep]
        p, h = uf @ (H @ g), g @ H @ g
        # |E (c + z v)|^2 = q + 2 z p + z^2 h for every copy
        scores = (q[keep][:, None] + 2 * z * p[:, None] + z * z * h).clamp_min(0).sqrt()
        take = _above_mean(scores.flatten()).reshape(z.shape).to(dtype)
        counts = counts + take.sum(1)
        zt = z * take
        a = zt.sum(1) @ Kf  # (sum over kept copies of z) c, summed over keys
        b = (zt * z).sum()
        extra = torch.outer(a, v) + torch.outer(v, a) + b * torch.outer(v, v)
        n_aug = int(take.sum().item())
    total = (Kf.mT * counts) @ Kf + extra
    return RetainMoment(total / (Kf.shape[0] + n_aug), int(Rk.shape[0]), int(Kf.shape[0]), n_aug, influence)


def speed_solve_layer(W: torch.Tensor, edit_keys: torch.Tensor, target_keys: torch.Tensor, weights: torch.Tensor,
                      projector: NullSpaceProjector, invariant: torch.Tensor | None = None, *,
                      retain_scale: float = 1.0, lamb: float = 0.0) -> LayerSolution:
    """The constrained edit of one layer: up = W (T - K)^T (out x n), down (n x d)."""
    if retain_scale <= 0 and projector.kept_rank:
        raise ValueError("retain_scale must be > 0")
    K = edit_keys.to(torch.float64)
    sol = nullspace_solve_layer(K, torch.zeros(K.shape[0], 1, dtype=K.dtype), projector, lam=retain_scale,
                                weights=weights.to(torch.float64), invariant_keys=invariant, invariant_ridge=lamb)
    up = W.detach().to(torch.float64) @ (target_keys.to(torch.float64) - K).mT
    return LayerSolution(up=up, down=sol.down, report=sol.report, kept_rank=sol.kept_rank, coverage=sol.coverage)


def retain_projector(moment: torch.Tensor, threshold: float) -> NullSpaceProjector:
    """Projector onto the eigenvectors of the refined second moment with eigenvalue < ``threshold``
    (absolute, as the official code's singular values of the PSD moment)."""
    return null_space_projector(moment, threshold=threshold)
