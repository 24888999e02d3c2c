"""UCE closed form: optimality, limits, shared factorization vs the published per-layer formula."""
import pytest
import torch
from concept_edit.solvers.linalg import IllConditionedWarning, solve_spd
from concept_edit.solvers.uce import uce_solve, uce_solve_layer


def R(*shape):
    return torch.randn(*shape, dtype=torch.float64)


def objective_grad(W, W0, K, V, P, lam, se=1.0, sp=1.0):
    g = 2 * se * (W @ K.T - V.T) @ K + 2 * lam * (W - W0)
    if P is not None:
        g = g + 2 * sp * (W @ P.T - W0 @ P.T) @ P
    return g


def reference_uce(W0, K, V, P, lam):
    """UCE's published per-layer update with an explicit inverse (the reference implementation)."""
    mat1 = lam * W0 + V.T @ K + W0 @ P.T @ P
    mat2 = lam * torch.eye(W0.shape[1], dtype=W0.dtype) + K.T @ K + P.T @ P
    return mat1 @ torch.inverse(mat2)


@pytest.fixture
def problem():
    d, out, n, m = 24, 16, 5, 7
    return R(out, d), R(n, d), R(n, out), R(m, d)


def test_gradient_vanishes_at_solution(problem):
    W0, K, V, P = problem
    sol = uce_solve_layer(W0, K, V, P, lam=0.5, erase_scale=1.0, preserve_scale=2.0)
    up, down = sol.up, sol.down
    W = W0 + up @ down
    g = objective_grad(W, W0, K, V, P, 0.5, 1.0, 2.0)
    assert g.abs().max() < 1e-9


def objective(W, W0, K, V, P, lam, se=1.0, sp=1.0):
    """UCE's objective written out term by term (independent of the solver)."""
    return se * ((W @ K.T - V.T) ** 2).sum() + sp * (((W - W0) @ P.T) ** 2).sum() + lam * ((W - W0) ** 2).sum()


def test_solution_is_the_minimum(problem):
    """The solve is the minimiser: it equals the stacked least-squares solution, and moving away from
    it in any direction D raises the objective by exactly its curvature t^2 q(D) (no linear term)."""
    W0, K, V, P = problem
    lam, se, sp = 0.5, 1.5, 2.0
    sol = uce_solve_layer(W0, K, V, P, lam=lam, erase_scale=se, preserve_scale=sp)
    up, down = sol.up, sol.down
    W = W0 + up @ down
    # the same problem as one least squares: [sqrt(se) K; sqrt(sp) P; sqrt(lam) I] W^T ~ [.. V; .. P W0^T; .. W0^T]
    A = torch.cat([se**0.5 * K, sp**0.5 * P, lam**0.5 * torch.eye(K.shape[1], dtype=K.dtype)])
    B = torch.cat([se**0.5 * V, sp**0.5 * P @ W0.T, lam**0.5 * W0.T])
    torch.testing.assert_close(W, torch.linalg.lstsq(A, B).solution.T, rtol=1e-9, atol=1e-9)
    f0 = objective(W, W0, K, V, P, lam, se, sp)
    gen = torch.Generator().manual_seed(1)
    for _ in range(20):
        D = torch.randn(W.shape, generator=gen, dtype=W.dtype)
        D /= D.norm()
        q = se * ((D @ K.T) ** 2).sum() + sp * ((D @ P.T) ** 2).sum() + lam * (D**2).sum()
        for t in (1e-3, -1e-3):
            rise = objective(W + t * D, W0, K, V, P, lam, se, sp) - f0
            assert rise > 0
            torch.testing.assert_close(rise, t * t * q, rtol=1e-5, atol=0)


def test_edit_keys_reach_targets_as_lambda_vanishes(problem):
    W0, K, V, P = problem
    errs = []
    for lam in (1e-1, 1e-3, 1e-6):
        sol = uce_solve_layer(W0, K, V, None, lam=lam)
        errs.append(((W0 + sol.dense()) @ K.T - V.T).abs().max().item())
    assert errs[0] > errs[1] > errs[2]
    assert errs[2] < 1e-4


def test_preserved_keys_stay_put(problem):
    W0, K, V, P = problem
    sol = uce_solve_layer(W0, K, V, P, lam=1e-8)
    up, down = sol.up, sol.down
    W = W0 + up @ down
    assert (W @ P.T - W0 @ P.T).abs().max() < 1e-5
    assert (W @ K.T - V.T).abs().max() < 1e-5


def test_shared_factorization_equals_per_layer_solve_and_reference(problem):
    _, K, _, P = problem
    T = torch.randn_like(K)
    sol = uce_solve(K, T, P, lam=0.5)
    for _ in range(3):
        W0 = R(11, K.shape[1])
        up, down = sol.layer_factors(W0, dtype=torch.float64)
        shared = W0 + up @ down
        sol2 = uce_solve_layer(W0, K, T @ W0.T, P, lam=0.5)
        up2, down2 = sol2.up, sol2.down
        torch.testing.assert_close(shared, W0 + up2 @ down2, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(shared, reference_uce(W0, K, T @ W0.T, P, 0.5), rtol=1e-8, atol=1e-8)
    assert sol.right.shape == (K.shape[0], K.shape[1])  # rank <= number of edit keys


def test_ill_conditioned_system_is_reported_and_regularized():
    K = R(1, 8).repeat(3, 1)  # rank 1, lambda 0: singular
    with pytest.warns(IllConditionedWarning):
        sol = uce_solve(K, torch.zeros_like(K), None, lam=0.0)
    assert torch.isfinite(sol.right).all() and sol.report.jitter > 0


def test_nan_keys_rejected():
    K = R(2, 4)
    K[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        uce_solve(K, torch.zeros_like(K))


def test_solve_spd_matches_dense_solve():
    A = R(10, 10)
    M = A @ A.T + torch.eye(10)
    B = R(10, 3)
    X, rep = solve_spd(M, B)
    torch.testing.assert_close(X, torch.linalg.solve(M, B))
    assert rep.jitter == 0 and rep.condition > 1
