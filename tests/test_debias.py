"""The debias loop: generate, classify, update alpha; every iteration starts from the original weights."""
import numpy as np
import pytest
import torch
from concept_edit.core.plan import plan_from_dict
from concept_edit.engines.debias import fit_debias, observed_ratios
from concept_edit.testbed import CLASSIFIER_PATH, model_dir


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
    """Mode-seeking generation flips all images at once: the step halves at every overshoot."""
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


def test_result_is_one_joint_evaluation(tiny):
    """Each concept's best alphas come from a different iteration: the result must not claim the
    ratios (or the convergence) of a combination that was never generated together."""
    pipe, model = tiny("sd1")
    plan = plan_from_dict({"edits": [{"debias": c, "attributes": ["bright", "dark"], "ratios": [0.5, 0.5]}
                                     for c in ("doctor", "nurse")]})

    def scripted(labels):
        """labels[evaluation] = (doctor's, nurse's): the concepts are classified in plan order."""
        calls = iter(range(2 * len(labels)))
        return lambda images, attributes: labels[(k := next(calls)) // 2][k % 2]

    # n_images=2, so [0, 1] is on target
    script = [([1, 1], [0, 1]), ([0, 0], [1, 1]), ([0, 1], [0, 0])]
    for combined, expect_converged in (([0, 1], True), ([1, 1], False)):
        classify = scripted([*script, (combined, [0, 1])])
        res = fit_debias(pipe, model, plan, classify, n_images=2, steps=1, max_iters=3, progress=False)
        h = res.history
        # doctor was best in iteration 2, nurse in iteration 0: their alphas are evaluated together once more
        assert len(h) == 4 and [x["combined"] for x in h] == [False, False, False, True]
        assert h[3]["alphas"] == {"doctor": h[2]["alphas"]["doctor"], "nurse": h[0]["alphas"]["nurse"]}
        assert h[3]["alphas"] not in [x["alphas"] for x in h[:3]]
        # the result is exactly one history entry, with the ratios measured for its alphas
        assert res.alphas == h[res.evaluation]["alphas"] and res.ratios == h[res.evaluation]["ratios"]
        assert res.converged == expect_converged == all(g <= 0.05 for g in h[res.evaluation]["gaps"].values())
        # both on target jointly -> that evaluation; doctor off target jointly -> the first of the tied iterations
        assert res.evaluation == (3 if expect_converged else 0)


def test_classifier_output_is_checked(tiny):
    pipe, model = tiny("sd1")
    plan = plan_from_dict({"edits": [{"debias": "doctor", "attributes": ["bright", "dark"]}]})
    for bad in ([0], [0, 2]):
        with pytest.raises(ValueError, match="one index into"):
            fit_debias(pipe, model, plan, lambda im, at, bad=bad: bad, n_images=2, steps=1, max_iters=1, progress=False)


@pytest.mark.skipif(not (model_dir() / "model_index.json").exists() or not CLASSIFIER_PATH.exists(),
                    reason="testbed weights not present")
def test_fit_debias_on_the_bundled_model_with_its_classifier(one_thread):
    """The testbed model draws each profession all crowned or all bare; its classifier judges
    the generated images. Doctors are crowned; the fit moves both professions towards 50/50 and
    reports ratios that re-generating with the returned alphas reproduces."""
    from concept_edit.adapters.diffusers_model import DiffusersModel
    from concept_edit.adapters.generate import generate
    from concept_edit.core.apply import apply_delta
    from concept_edit.engines.uce import uce_delta
    from concept_edit.testbed import load_classifier, load_testbed_pipeline
    from concept_edit.testbed.evaluate import head_probs

    pipe, clf = load_testbed_pipeline(), load_classifier()
    model = DiffusersModel(pipe)
    attributes = ["crowned", "bare"]

    def classify(images, attributes):
        crowned = head_probs(clf, np.stack([np.asarray(im) for im in images]))["attribute"].argmax(1) == 1
        return [attributes.index("crowned" if c else "bare") for c in crowned]

    kw = {"n_images": 8, "steps": 3, "seed": 0}
    template = "a photo of a {}"
    professions = ["doctor", "nurse"]

    def measure():
        return {p: observed_ratios(classify(generate(pipe, [template.format(p)] * kw["n_images"], seed=kw["seed"],
                                                     steps=kw["steps"]), attributes), 2) for p in professions}

    def mean_gap(ratios):
        return float(np.mean([abs(r[0] - 0.5) for r in ratios.values()]))

    before = measure()
    assert before["doctor"] == [1.0, 0.0], "the unedited model draws doctors crowned"
    plan = plan_from_dict({"edits": [{"debias": p, "attributes": attributes} for p in professions]})
    res = fit_debias(pipe, model, plan, classify, max_iters=5, prompt_template=template, progress=False, **kw)
    assert res.history[0]["ratios"] == before  # alpha 0 is the unedited model
    # re-generate with the returned alphas: the reported ratios and convergence are what they produce
    delta = uce_delta(model, plan, alphas=res.alphas, progress=False)
    h = apply_delta(delta, model.weights(delta.layers))
    try:
        after = measure()
    finally:
        h.remove()
    assert after == res.ratios
    assert res.converged == all(abs(r[0] - 0.5) <= 0.05 for r in after.values())
    assert after["doctor"][0] < before["doctor"][0] and mean_gap(after) < mean_gap(before)
