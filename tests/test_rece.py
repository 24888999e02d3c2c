"""RECE: the adversarial embedding's closed form, the attack it finds after UCE, the re-erasure
that defeats it, what the rounds leave alone, and a real efficacy check on the bundled model."""
from __future__ import annotations

import pytest
import torch
from concept_edit.core.plan import PlanError, plan_from_dict
from concept_edit.core.settings import SettingsError
from concept_edit.engines import compute_delta
from concept_edit.engines.rece import rece_delta
from concept_edit.engines.uce import edit_rows, preserve_keys
from concept_edit.solvers.rece import (
    adversarial_embeddings,
    output_distance,
    output_residual,
    rece_system,
    rece_system_factored,
)
from concept_edit.solvers.uce import uce_solve

pytestmark = pytest.mark.filterwarnings("ignore::concept_edit.solvers.linalg.IllConditionedWarning")

TEMPLATES = ["a photo of a {}", "{}"]
EDITS = [{"erase": "tree"}, {"replace": "cat", "with": "dog"}]
PRESERVE = ["house", "bird"]


def _pairs(seed=0, d=12, outs=(5, 9, 7, 16), rank=3):
    """Original weights and edited ones (a low-rank change of some of them), float64."""
    g = torch.Generator().manual_seed(seed)
    orig = [torch.randn(o, d, generator=g, dtype=torch.float64) for o in outs]
    edited = [W + (torch.randn(o, rank, generator=g, dtype=torch.float64) @ torch.randn(rank, d, generator=g,
               dtype=torch.float64) if i % 2 == 0 else 0) for i, (W, o) in enumerate(zip(orig, outs))]
    return edited, orig, g


@pytest.mark.parametrize("with_reference", [False, True], ids=["regzero", "reference"])
@pytest.mark.parametrize("lam", [1e-3, 0.7])
def test_closed_form_is_the_minimiser(with_reference, lam):
    """Gradient ~0 at the solution (float64) and agreement with a direct least-squares solve of the
    stacked problem [W'_1; ...; W'_L; sqrt(lam) I] x = [W_1 c; ...; W_L c; sqrt(lam) r]."""
    edited, orig, g = _pairs()
    c = torch.randn(3, 12, generator=g, dtype=torch.float64)
    r = torch.randn(3, 12, generator=g, dtype=torch.float64) if with_reference else None
    x, _ = adversarial_embeddings(rece_system(edited, orig), c, lam=lam, reference=r)
    ref = torch.zeros_like(c) if r is None else r

    xg = x.clone().requires_grad_(True)
    obj = sum(((xg @ We.T - c @ Wo.T) ** 2).sum() for We, Wo in zip(edited, orig)) + lam * ((xg - ref) ** 2).sum()
    (grad,) = torch.autograd.grad(obj, xg)
    scale = sum((We.T @ (c @ Wo.T).T).norm() for We, Wo in zip(edited, orig))
    assert grad.norm() / scale < 1e-12

    A = torch.cat([*edited, lam ** 0.5 * torch.eye(12, dtype=torch.float64)])
    for i in range(c.shape[0]):
        b = torch.cat([*(Wo @ c[i] for Wo in orig), lam ** 0.5 * ref[i]])
        direct = torch.linalg.lstsq(A, b[:, None]).solution[:, 0]
        torch.testing.assert_close(x[i], direct, rtol=1e-10, atol=1e-10)
    # the data term from the Gram sums is the explicit one
    explicit = torch.stack([sum(((We @ x[i] - Wo @ c[i]) ** 2).sum() for We, Wo in zip(edited, orig))
                            for i in range(3)])
    torch.testing.assert_close(output_residual(rece_system(edited, orig), x, c), explicit, rtol=1e-10, atol=1e-10)


def test_factored_system_is_the_explicit_one():
    """Edited layers W A and kept layers W: the Gram form equals the sums over explicit weights."""
    _, orig, g = _pairs(seed=1)
    A = torch.eye(12, dtype=torch.float64) + torch.randn(12, 2, generator=g, dtype=torch.float64) @ torch.randn(
        2, 12, generator=g, dtype=torch.float64)
    edited_idx = [0, 2, 3]
    edited = [W @ A if i in edited_idx else W for i, W in enumerate(orig)]
    Ge = sum(orig[i].T @ orig[i] for i in edited_idx)
    Gk = orig[1].T @ orig[1]
    a, b = rece_system(edited, orig), rece_system_factored(Ge, Gk, A)
    for name in ("EE", "EO", "OO"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=1e-12, atol=1e-10)


def _plan(**kw):
    d = {"method": "rece", "edits": [dict(e) for e in EDITS], "templates": TEMPLATES, "preserve": PRESERVE}
    return plan_from_dict(d | kw)


def _cross_attention(model, delta=None):
    """name -> float64 weight of every cross-attention to_k/to_v, with ``delta`` added."""
    out = {}
    for n, W in model.cross_attention_weights().items():
        W = W.detach().double()
        out[n] = W + delta.layers[n].dense(torch.float64) if delta is not None and n in delta.layers else W
    return out


def _attacked_rows(model, plan):
    _, K, T, _, owners = edit_rows(model, plan)
    sel = [i for i, o in enumerate(owners) if plan.edits[o].kind in ("erase", "replace")]
    return K[sel].double(), T[sel].double(), [owners[i] for i in sel], K, T


def _dist(W_new: dict, W_ref: dict, x, y):
    """sqrt(sum_l |W_new,l x - W_ref,l y|^2), summed over rows (explicit outputs)."""
    return sum(((x @ W_new[n].T - y @ W_ref[n].T) ** 2).sum() for n in W_new).sqrt().item()


def test_attack_after_uce_is_real_and_rece_sends_it_to_the_target(tiny):
    """The closed-form embedding found against the UCE-edited weights reproduces the erased outputs
    far better than the concept's own key does; after RECE it is mapped away from them and towards
    the target (the guide's / destination's original output)."""
    _, model = tiny("sd1")
    plan = _plan()
    uce = compute_delta(model, _plan(method="uce"), progress=False)
    rece = compute_delta(model, plan, progress=False)
    W0, Wu, Wr = _cross_attention(model), _cross_attention(model, uce), _cross_attention(model, rece)
    Kr, Tr, own, _, _ = _attacked_rows(model, plan)
    names = list(W0)
    sys_u = rece_system([Wu[n] for n in names], [W0[n] for n in names])
    C, _ = adversarial_embeddings(sys_u, Kr, lam=plan.settings.reg_lambda)

    adv_u, own_u = output_distance(sys_u, C, Kr), output_distance(sys_u, Kr, Kr)
    assert (adv_u < 0.2 * own_u).all(), (adv_u, own_u)  # the attack embedding is real
    sys_r = rece_system([Wr[n] for n in names], [W0[n] for n in names])
    adv_r = output_distance(sys_r, C, Kr)
    assert (adv_r > 5 * adv_u).all(), (adv_r, adv_u)  # ... and RECE moved it away from the erased outputs
    assert _dist(Wr, W0, C, Tr) < 0.5 * _dist(Wu, W0, C, Tr)  # ... towards the target's outputs

    # the metadata reports the same distances (its Gram sums are float32 products)
    meta = rece.metadata["rece_epochs"]
    assert len(meta) == 1 and meta[0]["n_adversarial_keys"] == Kr.shape[0] == rece.metadata["n_adversarial_keys"]
    for entry in meta[0]["concepts"]:
        o = next(i for i, e in enumerate(plan.edits) if e.source == entry["concept"])
        rows = [i for i, x in enumerate(own) if x == o]
        assert entry["adversarial_distance"] == pytest.approx(adv_u[rows].mean().item(), abs=1e-3)
        assert entry["concept_distance"] == pytest.approx(own_u[rows].mean().item(), abs=1e-3)
        assert entry["adversarial_distance_after"] == pytest.approx(adv_r[rows].mean().item(), abs=1e-3)


def test_resolve_is_one_uce_solve_with_the_adversarial_keys_added(tiny):
    """update: resolve = UCE from the original weights over the concept keys plus the adversarial keys."""
    _, model = tiny("sd1")
    plan = _plan(update="resolve")
    uce = compute_delta(model, _plan(method="uce"), progress=False)
    rece = compute_delta(model, plan, progress=False)
    W0, Wu = _cross_attention(model), _cross_attention(model, uce)
    Kr, Tr, _, K, T = _attacked_rows(model, plan)
    names = list(W0)
    C, _ = adversarial_embeddings(rece_system([Wu[n] for n in names], [W0[n] for n in names]), Kr,
                                  lam=plan.settings.reg_lambda)
    enc, *_ = edit_rows(model, plan)
    sol = uce_solve(torch.cat([K.double(), C]), torch.cat([T.double(), Tr]), preserve_keys(enc, plan), lam=0.5)
    for n, ld in rece.layers.items():
        want = W0[n] @ sol.left @ sol.right
        assert ((ld.dense(torch.float64) - want).norm() / want.norm()).item() < 1e-4, n


def test_more_epochs_continue_the_first_and_grow_the_rank(tiny):
    _, model = tiny("sd1")
    one = compute_delta(model, _plan(), progress=False)
    three = compute_delta(model, _plan(epochs=3), progress=False)
    assert three.metadata["rece_epochs"][0] == one.metadata["rece_epochs"][0]
    n_edit, n_adv = one.metadata["n_edit_keys"], one.metadata["n_adversarial_keys"]
    assert three.metadata["n_adversarial_keys"] == 3 * n_adv
    assert one.max_rank == n_edit + n_adv and three.max_rank == n_edit + 3 * n_adv
    # each round attacks the weights the previous one left: the first round's attack is defeated
    r = three.metadata["rece_epochs"]
    for c0, c1 in zip(r[0]["concepts"], r[1]["concepts"]):
        assert c1["adversarial_distance"] > 2 * c0["adversarial_distance"]


def test_preserved_outputs_stay_close(tiny):
    """Relative output change of the preserved keys (all cross-attention to_k/to_v). The rounds keep
    them at their current outputs with weight adv_preserve_scale (0.1), so RECE adds some drift to
    UCE's: measured on the tiny model 0.119 vs UCE's 0.082, against 0.45 for the edited keys (the
    replaced concept's keys move by UCE's change only: the rounds keep them); with adv_preserve_scale
    1 (the UCE stage's weight) the rounds add almost none (0.085)."""
    _, model = tiny("sd1")
    plan = _plan()
    W0 = _cross_attention(model)
    enc, K, *_ = edit_rows(model, plan)
    P, K = preserve_keys(enc, plan).double(), K.double()

    def drift(delta, keys):
        W = _cross_attention(model, delta)
        return _dist(W, W0, keys, keys) / _dist(W0, W0, keys, torch.zeros_like(keys))

    p_uce = drift(compute_delta(model, _plan(method="uce"), progress=False), P)
    rece = compute_delta(model, plan, progress=False)
    p_rece, k_rece = drift(rece, P), drift(rece, K)
    p_full = drift(compute_delta(model, _plan(adv_preserve_scale=1.0), progress=False), P)
    assert p_rece < 0.3 * k_rece and p_rece < 1.6 * p_uce, (p_uce, p_rece, k_rece)
    assert p_full < 1.1 * p_uce < p_rece, (p_uce, p_full, p_rece)


def test_epochs_must_be_at_least_one_and_round_settings_apply():
    with pytest.raises(SettingsError, match=r"epochs.*>= 1"):
        _plan(epochs=0)
    with pytest.raises(SettingsError, match="no effect with update: resolve"):
        _plan(update="resolve", adv_ridge=1.0)
    with pytest.raises(SettingsError, match="UNet cross-attention"):
        _plan(readers="pooled")
    with pytest.raises(SettingsError, match="must be one of last, aligned"):
        _plan(token="all")
    hp = _plan(update="resolve").settings.effective()
    assert "adv_ridge" not in hp and "adv_preserve_scale" not in hp and hp["reg_lambda"] == 1e-3


def test_plans_rece_cannot_attack_and_mmdit_models_are_refused(tiny):
    from concept_edit.adapters.mmdit_model import MMDiTModel
    from concept_edit.testing.tiny_models import build_tiny_mmdit_pipeline

    _, model = tiny("sd1")
    with pytest.raises(PlanError, match="erase and replace edits"):
        compute_delta(model, _plan(edits=[{"moderate": "cat"}]), progress=False)
    flux = MMDiTModel(build_tiny_mmdit_pipeline("flux"), max_sequence_length=32)
    with pytest.raises(PlanError, match="does not support flux models yet; use uce"):
        compute_delta(flux, _plan(), progress=False)
    with pytest.raises(PlanError, match="rece: flux"):
        rece_delta(flux, _plan(), progress=False)


def test_mixed_plans_attack_only_erase_and_replace(tiny):
    """A moderate edit is solved as UCE does, without adversarial keys."""
    _, model = tiny("sd1")
    d = compute_delta(model, _plan(edits=[*EDITS, {"moderate": "bird"}], preserve=["house"]), progress=False)
    assert d.metadata["n_adversarial_keys"] == 2 * len(TEMPLATES)
    assert [c["concept"] for c in d.metadata["rece_epochs"][0]["concepts"]] == ["tree", "cat"]


@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_other_unet_families(tiny, family):
    """SD 2.x and SDXL (2048-wide concatenated keys): the round sends the attack away from the erased outputs."""
    _, model = tiny(family)
    d = compute_delta(model, _plan(), progress=False)
    assert d.metadata["family"] == family and d.metadata["n_adversarial_keys"] == 2 * len(TEMPLATES)
    for c in d.metadata["rece_epochs"][0]["concepts"]:
        assert c["adversarial_distance"] < c["concept_distance"] < c["adversarial_distance_after"] + 0.1, c
        assert c["adversarial_distance_after"] > 3 * c["adversarial_distance"], c


def test_single_file_model_gives_the_same_delta(full_and_single_file_deltas):
    """The CLI computes RECE lazily on a single file (text encoders and cross-attention weights only)."""
    full, lazy = full_and_single_file_deltas(_plan())
    assert lazy.metadata["base_fingerprint"] == full.metadata["base_fingerprint"]


def test_cli_edits_with_rece(tiny_sd1_dir, tmp_path):
    from concept_edit.cli.main import main
    from concept_edit.files.formats import read_metadata

    out = tmp_path / "rece.safetensors"
    assert main(["edit", "--model", str(tiny_sd1_dir), "--method", "rece", "--erase", "cat", "--preserve", "dog",
                 "--set", "epochs=2", "--set", "reg_lambda=0.01", "-o", str(out)]) == 0
    meta = read_metadata(out)
    assert meta["method"] == "rece" and meta["hyperparameters"]["epochs"] == 2
    assert meta["hyperparameters"]["reg_lambda"] == 0.01 and len(meta["rece_epochs"]) == 2


# -- the bundled model ---------------------------------------------------------------------------
def _testbed_ready() -> bool:
    from concept_edit.testbed import CLASSIFIER_PATH, model_dir

    return (model_dir() / "model_index.json").exists() and CLASSIFIER_PATH.exists()


@pytest.mark.skipif(not _testbed_ready(), reason="testbed weights not present")
def test_rece_defeats_the_attack_that_undoes_uce_on_the_testbed(one_thread):
    """Erase one object (towards another, as the UCE efficacy test: erasing towards "" moves unrelated
    objects on this model already under UCE). The closed-form attack (every token of the prompts'
    text states mapped through RECE's closed form against the UCE weights) brings the object back
    under UCE; under RECE neither it nor a fresh attack against RECE's own weights does. The prompts
    stay forgotten and a held-out object is kept."""
    from concept_edit.adapters.diffusers_model import DiffusersModel
    from concept_edit.core.apply import apply_delta
    from concept_edit.testbed import (
        demo_holdout,
        demo_plan,
        get_world,
        load_classifier,
        load_testbed_pipeline,
    )
    from concept_edit.testbed.evaluate import (
        concept_hit,
        generate,
        head_probs,
        pipe_kwargs,
    )

    pipe, clf, w = load_testbed_pipeline(), load_classifier(), get_world()
    pipe.set_progress_bar_config(disable=True)
    demo = demo_plan()
    src, dst = w.object_by_name(demo["edits"][1]["replace"]), w.object_by_name(demo["edits"][1]["with"])
    keep, hold = w.object_by_name(demo["preserve"][1]), w.object_by_name(demo_holdout())
    prompts = ["a photo of a {}", "the image of the {}", "a picture of a {}", "a painting showing a {}"]
    P_src, P_hold = [t.format(src.name) for t in prompts], [t.format(hold.name) for t in prompts]
    model = DiffusersModel(pipe)
    with torch.no_grad():
        states = pipe.encode_prompt(P_src, "cpu", 1, False)[0].double()

    def hits(concept, prompts=None, embeds=None):
        if embeds is None:
            return concept_hit(head_probs(clf, generate(pipe, prompts, 123, steps=12)), concept).mean()
        gens = [torch.Generator().manual_seed(123 + i) for i in range(len(embeds))]
        with torch.no_grad():
            im = pipe(prompt_embeds=embeds.float(), generator=gens, output_type="np",
                      **pipe_kwargs(pipe, len(embeds), 12, 4.0)).images
        return concept_hit(head_probs(clf, (im * 255).round().clip(0, 255).astype("uint8")), concept).mean()

    W0 = _cross_attention(model)

    def attack(delta):
        W = _cross_attention(model, delta)
        system = rece_system([W[n] for n in W0], list(W0.values()))
        x, _ = adversarial_embeddings(system, states.reshape(-1, states.shape[-1]), lam=1e-3)
        return x.reshape(states.shape)

    def run(method):
        plan = plan_from_dict({"method": method, "edits": [{"erase": src.name, "guide": dst.name}],
                               "preserve": [keep.name], "templates": ["{}", "a photo of a {}", "a painting of a {}"]})
        return compute_delta(model, plan, progress=False)

    uce, rece = run("uce"), run("rece")
    x_uce, x_rece = attack(uce), attack(rece)
    h = apply_delta(uce, model.weights(uce.layers))
    try:
        uce_src, uce_attacked = hits(src, P_src), hits(src, embeds=x_uce)
    finally:
        h.remove()
    h = apply_delta(rece, model.weights(rece.layers))
    try:
        r_src, r_hold = hits(src, P_src), hits(hold, P_hold)
        r_attacked, r_adaptive = hits(src, embeds=x_uce), hits(src, embeds=x_rece)
    finally:
        h.remove()
    assert uce_src <= 0.25 and uce_attacked >= 0.75, "UCE forgets the prompts, but the attack brings the object back"
    assert r_src <= 0.25, "RECE forgets the prompts"
    assert r_attacked <= 0.25 and r_adaptive <= 0.25, "the attack embeddings no longer draw the object"
    assert r_hold >= 0.75, "the held-out object is kept"


@pytest.mark.skipif(not _testbed_ready(), reason="testbed weights not present")
@pytest.mark.parametrize("token", ["last", "aligned"])
def test_replaced_object_still_draws_the_destination_on_the_testbed(one_thread, token):
    """A replace edit through RECE: the rounds keep the concept's own keys at their UCE outputs, so
    its prompts draw the destination as under UCE (left free, the round's edit of the adversarial
    keys pulled them off it: the source drew neither object)."""
    from concept_edit.adapters.diffusers_model import DiffusersModel
    from concept_edit.core.apply import apply_delta
    from concept_edit.testbed import demo_plan, get_world, load_classifier, load_testbed_pipeline
    from concept_edit.testbed.evaluate import concept_hit, generate, head_probs

    pipe, clf, w = load_testbed_pipeline(), load_classifier(), get_world()
    pipe.set_progress_bar_config(disable=True)
    demo = demo_plan()
    src, dst = w.object_by_name(demo["edits"][1]["replace"]), w.object_by_name(demo["edits"][1]["with"])
    model = DiffusersModel(pipe)
    plan = plan_from_dict({"method": "rece", "token": token, "edits": [{"replace": src.name, "with": dst.name}],
                           "preserve": [o.name for o in w.objects[200:300]],
                           "templates": ["{}", "a photo of a {}", "a painting of a {}"]})
    delta = compute_delta(model, plan, progress=False)
    prompts = [t.format(src.name) for t in ("a photo of a {}", "the image of the {}", "a picture of a {}", "a {} photo")]
    h = apply_delta(delta, model.weights(delta.layers))
    try:
        probs = head_probs(clf, generate(pipe, prompts, 7, steps=12))
    finally:
        h.remove()
    assert concept_hit(probs, src).mean() == 0 and concept_hit(probs, dst).mean() >= 0.75
