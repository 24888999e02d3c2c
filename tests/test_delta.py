"""Delta objects: factor algebra, fingerprints, apply/remove bit-exactly in any order."""
import pytest
import torch
from concept_edit.core.apply import DeltaMismatchError, apply_delta
from concept_edit.core.delta import (
    ConceptDelta,
    LayerDelta,
    fingerprint,
    fingerprints_match,
)


def test_compact_is_exact_and_bounds_rank():
    ld = LayerDelta(torch.randn(6, 20), torch.randn(20, 9))
    c = ld.compact()
    assert c.rank == 6
    torch.testing.assert_close(c.dense(), ld.dense(), rtol=1e-4, atol=1e-4)


def test_truncation_error_is_reported_and_exact_when_rank_fits():
    up, down = torch.randn(30, 8), torch.randn(8, 40)
    ld = LayerDelta(up, down)
    same, err0 = ld.truncated(8)
    assert err0 == 0.0 and same is ld
    t, err = ld.truncated(3)
    assert t.rank == 3 and 0 < err < 1
    true_err = ((t.dense() - ld.dense()).norm() / ld.dense().norm()).item()
    assert abs(true_err - err) < 1e-4
    # SVD truncation is optimal: beats simply dropping factor columns
    naive = (up[:, :3] @ down[:3] - ld.dense()).norm() / ld.dense().norm()
    assert err <= naive.item()


def test_fingerprint_is_dtype_stable_and_content_sensitive():
    w = {"a": torch.randn(8, 8), "b": torch.randn(3, 5)}
    fp = fingerprint(w)
    for dt in (torch.float16, torch.bfloat16):  # a copy in either half precision matches
        assert fingerprints_match(fp, fingerprint({k: v.to(dt) for k, v in w.items()}))
    w2 = dict(w, a=w["a"] + 0.1)
    assert not fingerprints_match(fp, fingerprint(w2))


def _params():
    return {"x": torch.nn.Parameter(torch.randn(6, 5)), "y": torch.nn.Parameter(torch.randn(4, 5))}


def _delta(params, seed):
    g = torch.Generator().manual_seed(seed)
    layers = {k: LayerDelta(torch.randn(p.shape[0], 2, generator=g), torch.randn(2, p.shape[1], generator=g)) for k, p in params.items()}
    return ConceptDelta(layers, {"base_fingerprint": fingerprint(params)})


def test_apply_remove_bit_exact_any_order():
    params = _params()
    orig = {k: p.detach().clone() for k, p in params.items()}
    d1, d2 = _delta(params, 1), _delta(params, 2)
    h1 = apply_delta(d1, params)
    h2 = apply_delta(d2, params)  # computed on the same base: stacking is accepted
    expect = orig["x"] + d1.layers["x"].dense() + d2.layers["x"].dense()
    torch.testing.assert_close(params["x"].detach(), expect)
    h1.remove()  # out of order
    torch.testing.assert_close(params["x"].detach(), orig["x"] + d2.layers["x"].dense())
    h2.remove()
    for k in params:
        assert torch.equal(params[k].detach(), orig[k])


def test_scaled_apply():
    params = _params()
    d = _delta(params, 3)
    orig = params["y"].detach().clone()
    h = apply_delta(d, params, scale=-0.5)
    torch.testing.assert_close(params["y"].detach(), orig - 0.5 * d.layers["y"].dense())
    h.remove()


def test_mismatched_model_refused():
    params = _params()
    d = _delta(params, 4)
    other = {"x": torch.nn.Parameter(torch.randn(6, 5)), "y": torch.nn.Parameter(torch.randn(4, 5))}
    with pytest.raises(DeltaMismatchError, match="fingerprint"):
        apply_delta(d, other)
    apply_delta(d, other, check_fingerprint=False).remove()
    wrong_shape = {"x": torch.nn.Parameter(torch.randn(7, 5)), "y": other["y"]}
    with pytest.raises(DeltaMismatchError, match="shape"):
        apply_delta(d, wrong_shape, check_fingerprint=False)
    with pytest.raises(DeltaMismatchError, match="does not have"):
        apply_delta(d, {"x": other["x"]})


def test_nan_delta_rejected():
    with pytest.raises(ValueError, match="NaN"):
        ConceptDelta({"x": LayerDelta(torch.full((2, 1), float("nan")), torch.ones(1, 2))})


def test_stacked_delta_sums():
    params = _params()
    d1, d2 = _delta(params, 5), _delta(params, 6)
    s = d1.stacked(d2)
    torch.testing.assert_close(s.layers["x"].dense(), d1.layers["x"].dense() + d2.layers["x"].dense(), rtol=1e-4, atol=1e-4)
