"""Null-space constrained editing: solver against its objective, projector, history, engines."""
import pytest
import torch
from concept_edit.core.plan import Edit, EditPlan
from concept_edit.core.settings import build_settings
from concept_edit.solvers.nullspace import (
    EditHistory,
    null_space_projector,
    nullspace_objective,
    nullspace_solve_layer,
    projector_from_keys,
)


def _problem(seed=0, n=4, d=24, out=10, n0=9, m=3):
    g = torch.Generator().manual_seed(seed)
    K1 = torch.randn(n, d, generator=g, dtype=torch.float64)
    R = torch.randn(n, out, generator=g, dtype=torch.float64)
    K0 = torch.randn(n0, d, generator=g, dtype=torch.float64)
    Kp = torch.randn(m, d, generator=g, dtype=torch.float64)
    return K1, R, K0, Kp


def test_projector_annihilates_preserved_keys_and_reports_rank():
    K1, R, K0, Kp = _problem()
    P = projector_from_keys(K0, threshold=1e-10)
    assert P.kept_rank == 24 - 9 and P.protected_rank == 9
    assert P.project(K0).abs().max() < 1e-10  # P K0 = 0
    assert P.leakage < 1e-12
    Pm = P.matrix()
    torch.testing.assert_close(Pm @ Pm, Pm)  # a projector
    # threshold semantics: eigenvalues strictly below the (relative) threshold are kept
    C = torch.diag(torch.tensor([1.0, 0.5, 1e-2, 1e-4, 0.0], dtype=torch.float64))
    assert null_space_projector(C, threshold=1e-3).kept_rank == 2
    assert null_space_projector(C, threshold=2e-2, relative=False).kept_rank == 3


def test_update_is_optimal_and_matches_alphaedit_closed_form():
    K1, R, K0, Kp = _problem()
    P = projector_from_keys(K0, threshold=1e-10)
    G = Kp.mT @ Kp
    lam = 0.3
    sol = nullspace_solve_layer(K1, R, P, history_gram=G, lam=lam)
    D = sol.dense()
    Pm = P.matrix()
    torch.testing.assert_close(D @ Pm, D)  # D lives in the null space: D = D P
    assert (D @ K0.mT).abs().max() < 1e-9  # preserved outputs do not move
    # first-order optimality within the constraint set {Y U^T}: dJ/dY = dJ/dD U = 0
    Dv = D.clone().requires_grad_(True)
    nullspace_objective(Dv, K1, R, P, G, lam).backward()
    assert (Dv.grad @ P.basis).abs().max() < 1e-8
    # AlphaEdit's (column-convention) formula: D = R K1^T P (K1 K1^T P + Kp Kp^T P + lam I)^-1
    Rc, K1c, Kpc = R.mT, K1.mT, Kp.mT
    A = K1c @ K1c.mT @ Pm + Kpc @ Kpc.mT @ Pm + lam * torch.eye(24, dtype=torch.float64)
    ref = torch.linalg.solve(A.mT, (Rc @ K1c.mT @ Pm).mT).mT
    torch.testing.assert_close(D, ref, rtol=1e-7, atol=1e-9)


@pytest.mark.filterwarnings("ignore::concept_edit.solvers.linalg.IllConditionedWarning")
def test_reaches_targets_as_lambda_vanishes():
    K1, R, K0, _ = _problem()
    P = projector_from_keys(K0, threshold=1e-10)
    sol = nullspace_solve_layer(K1, R, P, lam=1e-10)
    torch.testing.assert_close(K1 @ sol.dense().mT, R, rtol=1e-6, atol=1e-6)
    assert sol.up.shape == (10, 4) and sol.down.shape == (4, 24)  # factored, rank <= n


def test_history_protects_earlier_edits_and_resets():
    K1, R, K0, Kp = _problem()
    P = projector_from_keys(K0, threshold=1e-10)
    h = EditHistory()
    first = nullspace_solve_layer(Kp, torch.randn(3, 10, dtype=torch.float64), P, lam=1e-3)
    h.add("w", Kp)
    assert len(h) == 3
    free = nullspace_solve_layer(K1, R, P, lam=1e-3).dense()
    kept = nullspace_solve_layer(K1, R, P, history_gram=h.gram("w"), lam=1e-3).dense()
    assert (kept @ Kp.mT).norm() < 0.5 * (free @ Kp.mT).norm()
    del first
    h.reset()
    assert len(h) == 0 and h.gram("w") is None


def test_empty_null_space_gives_zero_edit():
    K1, R, _, _ = _problem()
    P = projector_from_keys(torch.randn(100, 24, dtype=torch.float64), threshold=1e-12)
    assert P.kept_rank == 0
    sol = nullspace_solve_layer(K1, R, P)
    assert sol.dense().abs().max() == 0 and sol.kept_rank == 0


# -- engines on tiny pipelines ------------------------------------------------------------------
PRESERVE = ["house", "bird"]


def _plan(**options):
    opts = {"projector": "preserve", "cov_positions": "tokens", "threshold": 1e-9, "lambda": 1e-4}
    opts.update(options)
    return EditPlan(
        edits=[Edit("replace", "cat", "dog"), Edit("erase", "tree", "")],
        preserve=PRESERVE,
        templates=["a photo of a {}", "{}"],
        method="nullspace",
        settings=build_settings("nullspace", opts),
    )


def _states(model, texts):
    from concept_edit.adapters import text_encoder as te
    from concept_edit.core.prompts import Prompt

    pr = te.tokenize_prompts(model, [Prompt(t, 0) for t in texts])
    ehs, _, _ = te.unet_conditioning(model, pr)
    return ehs, [len(p.ids) for p in pr]


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_text_encoder_site_keeps_preserved_prompts(tiny, family):
    from concept_edit.core.apply import apply_delta
    from concept_edit.engines.nullspace import nullspace_delta


    _, model = tiny(family)
    plan = _plan()
    delta = nullspace_delta(model, plan, progress=False)
    assert delta.metadata["method"] == "nullspace"
    from concept_edit.adapters.text_encoder import text_module

    for n, k in delta.metadata["kept_rank"].items():
        assert 0 < k < text_module(model, n).weight.shape[1] and delta.metadata["leakage"][n] < 1e-8
    keep = [p.replace("{}", c) for c in PRESERVE for p in plan.templates] + [""]
    edit = ["a photo of a cat", "cat"]
    before_k, lens = _states(model, keep)
    before_e, lens_e = _states(model, edit)
    W = model.weights(list(delta.layers))
    snap = {n: w.detach().clone() for n, w in W.items()}
    h = apply_delta(delta, W)
    try:
        after_k, _ = _states(model, keep)
        after_e, _ = _states(model, edit)
    finally:
        h.remove()
    for n, w in W.items():
        assert torch.equal(w, snap[n])  # removed bit-exactly
    for i, L in enumerate(lens):  # BOS..EOS of every preserved prompt: unchanged
        torch.testing.assert_close(after_k[i, :L], before_k[i, :L], rtol=0, atol=1e-4)
    moved = max((after_e[i, :L] - before_e[i, :L]).abs().max().item() for i, L in enumerate(lens_e))
    assert moved > 1e-2  # while the edited prompts do change


def test_cross_attention_site_projects_out_preserved_keys(tiny):
    from concept_edit.core.prompts import expand
    from concept_edit.engines.keys import KeyEncoder
    from concept_edit.engines.nullspace import nullspace_delta

    _, model = tiny("sd1")
    plan = _plan(site="cross_attention")
    hist = EditHistory()
    delta = nullspace_delta(model, plan, history=hist, progress=False)
    assert all(".attn2.to_" in n for n in delta.layers)
    assert len(hist) == 4  # 2 edits x 2 templates recorded for sequential editing
    enc = KeyEncoder(model)
    K0, _ = enc.last_token_keys([p for c in PRESERVE for p in expand(c, plan.templates)])
    Ke, _ = enc.last_token_keys([p for p in expand("cat", plan.templates)])
    for n, ld in delta.layers.items():
        D = ld.dense(torch.float64)
        assert (D @ K0.double().mT).abs().max() < 1e-5
        assert (D @ Ke.double().mT).abs().max() > 1e-3
    # a second, sequential edit sees the first one's keys
    plan2 = _plan(site="cross_attention")
    plan2.edits = [Edit("replace", "car", "boat")]
    nullspace_delta(model, plan2, history=hist, progress=False)
    assert len(hist) == 6


def test_history_file_carries_sequential_edits(tiny, tmp_path):
    from concept_edit.engines.nullspace import load_history, nullspace_delta

    _, model = tiny("sd1")
    hf = tmp_path / "history.safetensors"
    plan = _plan(site="cross_attention", history_file=str(hf))
    nullspace_delta(model, plan, progress=False)
    assert len(load_history(hf)) == 4
    plan.edits = [Edit("replace", "car", "boat")]
    nullspace_delta(model, plan, progress=False)
    assert len(load_history(hf)) == 6
