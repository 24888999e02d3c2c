"""The debias loop: generate, classify, update alpha; every iteration starts from the original weights."""
import numpy as np
import torch
from concept_edit.core.plan import plan_from_dict
from concept_edit.engines.debias import fit_debias, observed_ratios


def test_observed_ratios():
    assert observed_ratios([0, 1, 1, 1], 2) == [0.25, 0.75]


def test_fit_debias_updates_alphas_and_leaks_nothing(tiny):
    pipe, model = tiny("sd1")
    plan = plan_from_dict({"edits": [{"debias": "doctor", "attributes": ["bright", "dark"], "ratios": [0.5, 0.5]},
                                     {"erase": "cat"}]})
    W = model.cross_attention_weights()
    before = {n: w.detach().clone() for n, w in W.items()}
    seen_weights = []

    # A real (if simple) attribute classifier: bright vs dark by mean intensity against a fixed threshold.
    def classify(images, attributes):
        seen_weights.append(next(iter(W.values())).detach().clone())
        return [0 if np.asarray(im, dtype=np.float32).mean() > 1e9 else 1 for im in images]  # always "dark"

    res = fit_debias(pipe, model, plan, classify, n_images=2, steps=1, max_iters=3, tol=0.05, progress=False)
    assert not res.converged and len(res.history) == 3
    # observed is always [0, 1] against desired [.5, .5]: alpha for "bright" rises, "dark" falls, each iteration
    a = [h["alphas"]["doctor"] for h in res.history]
    assert a[0] == [0.0, 0.0] and a[1] == [0.5, -0.5] and a[2] == [1.0, -1.0]
    # each iteration's weights are the original + that iteration's edit only (no accumulation)
    d1 = (seen_weights[1] - before[next(iter(W))]).norm()
    d2 = (seen_weights[2] - before[next(iter(W))]).norm()
    assert d1 > 0 and d2 > d1 and d2 < 3 * d1
    assert all(torch.equal(W[n].detach(), before[n]) for n in W)


def test_fit_debias_bisects_a_step_response(tiny):
    """Mode-seeking generation flips all images at once: the step halves at every overshoot and
    the best alphas per concept are returned."""
    pipe, model = tiny("sd1")
    plan = plan_from_dict({"edits": [{"debias": "doctor", "attributes": ["bright", "dark"], "ratios": [0.5, 0.5]}]})
    W = model.cross_attention_weights()
    name = next(iter(W))
    w0 = W[name].detach().clone()
    calls = []

    def classify(images, attributes):
        # every image is "bright" once the edit moves the weights by more than the first step did
        # half-way: a step response in alpha, like a model that draws one attribute or the other
        d = float((W[name].detach() - w0).norm())
        calls.append(d)
        return [0 if d > THRESH[0] else 1 for _ in images]

    THRESH = [float("inf")]
    fit_debias(pipe, model, plan, classify, n_images=2, steps=1, max_iters=2, progress=False)
    THRESH[0] = calls[1] * 0.4  # between alpha 0 and the first step
    res = fit_debias(pipe, model, plan, classify, n_images=2, steps=1, max_iters=5, progress=False)
    a = [h["alphas"]["doctor"][0] for h in res.history]
    assert a[:3] == [0.0, 0.5, 0.25]  # overshoot at 0.5 -> the step halves
    assert [h["steps"]["doctor"] for h in res.history][:3] == [1.0, 1.0, 0.5]
    assert all(x < 0.5 for x in a[2:])
