"""EMCID: stage II against its objective, multi-layer spreading, stage I caching, layer selection."""
import pytest
import torch
from concept_edit.core.plan import Edit, EditPlan
from concept_edit.core.settings import build_settings
from concept_edit.solvers.emcid import (
    emcid_objective,
    emcid_solve_layer,
    spread_residual,
)


def _problem(seed=0, n=5, d=20, out=8):
    g = torch.Generator().manual_seed(seed)
    K1 = torch.randn(n, d, generator=g, dtype=torch.float64)
    V = torch.randn(n, out, generator=g, dtype=torch.float64)
    W0 = torch.randn(out, d, generator=g, dtype=torch.float64)
    K0 = torch.randn(50, d, generator=g, dtype=torch.float64)
    return K1, V, W0, K0.mT @ K0 / 50


@pytest.mark.parametrize("alpha", [0.1, 0.5, 0.9])
def test_stage_ii_is_optimal(alpha):
    K1, V, W0, C0 = _problem()
    R = V - K1 @ W0.mT
    sol = emcid_solve_layer(K1, R, C0, alpha=alpha)
    D = sol.dense()
    assert sol.up.shape == (8, 5) and sol.down.shape == (5, 20)
    Dv = D.clone().requires_grad_(True)
    emcid_objective(W0, Dv, K1, V, C0, alpha).backward()
    assert Dv.grad.abs().max() < 1e-8
    # eq. 5 written out: D = alpha R^T K1 [(1 - alpha) C0 + alpha K1^T K1]^-1
    M = (1 - alpha) * C0 + alpha * K1.mT @ K1
    torch.testing.assert_close(D, torch.linalg.solve(M, alpha * K1.mT @ R).mT)


def test_stage_ii_reaches_targets_as_alpha_goes_to_one():
    K1, V, W0, C0 = _problem()
    R = V - K1 @ W0.mT
    errs = [(K1 @ (W0 + emcid_solve_layer(K1, R, C0, alpha=a).dense()).mT - V).norm().item() for a in (0.5, 0.99, 1 - 1e-9)]
    assert errs[0] > errs[1] > errs[2] and errs[2] < 1e-5


def test_spread_residual():
    t, c = torch.ones(3, 4) * 6, torch.zeros(3, 4)
    assert torch.allclose(spread_residual(t, c, 0, 3), t / 3)
    assert torch.allclose(spread_residual(t, c, 2, 3), t)
    with pytest.raises(ValueError):
        spread_residual(t, c, 3, 3)


# -- layer selection ---------------------------------------------------------------------------
def test_layer_selection_per_family(tiny):
    from concept_edit.adapters.text_encoder import LayerSelectionError, resolve_layers

    assert resolve_layers(tiny("sd1")[1]) == {"text_encoder": [0, 1]}
    assert resolve_layers(tiny("sd2")[1]) == {"text_encoder": [0, 1]}
    xl = tiny("sdxl")[1]
    assert resolve_layers(xl) == {"text_encoder": [0], "text_encoder_2": [0]}  # penultimate reader
    assert resolve_layers(xl, "0-1") == {"text_encoder": [0, 1], "text_encoder_2": [0, 1]}
    assert resolve_layers(xl, {"text_encoder_2": [0]}) == {"text_encoder_2": [0]}
    with pytest.raises(LayerSelectionError):
        resolve_layers(xl, [2])  # SDXL never reads its last layer
    with pytest.raises(LayerSelectionError):
        resolve_layers(xl, [-1])
    assert resolve_layers(tiny("sd1")[1], [-1]) == {"text_encoder": [2]}  # SD1 reads the last layer


# -- engine ------------------------------------------------------------------------------------
def _plan(**options):
    opts = {"targets": "dest_hidden", "cov_weight": 1.0}
    opts.update(options)
    return EditPlan(
        edits=[Edit("replace", "cat", "dog"), Edit("replace", "car", "boat"), Edit("erase", "tree", "")],
        templates=["a photo of a {}", "{}"],
        method="emcid",
        settings=build_settings("emcid", opts),
    )


@pytest.mark.filterwarnings("ignore::concept_edit.solvers.linalg.IllConditionedWarning")
@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_multilayer_spread_reaches_target_as_alpha_to_one(tiny, family, tmp_path):
    from concept_edit.engines.emcid import emcid_delta


    _, model = tiny(family)
    res = {}
    for alpha in (0.5, 1 - 1e-9):
        plan = _plan(alpha=alpha, key_mode="each", layers="0-1", cov_cache_dir=str(tmp_path))
        W = model.weights([f"text_encoder.text_model.encoder.layers.{i}.mlp.fc2" for i in (0, 1)])
        snap = {n: w.detach().clone() for n, w in W.items()}
        d = emcid_delta(model, plan, progress=False)
        for n, w in W.items():
            assert torch.equal(w, snap[n])  # the model is left untouched
        res[alpha] = d.metadata["layers_report"]["text_encoder"]
        assert d.metadata["method"] == "emcid" and d.metadata["base_fingerprint"]
        assert d.max_rank <= 6
        assert len(d.layers) == (4 if family == "sdxl" else 2)
    assert res[0.5]["residual_after"] < res[0.5]["residual_before"]
    assert res[1 - 1e-9]["residual_after"] < 1e-4 * res[1 - 1e-9]["residual_before"]


def test_stage_i_cache_resume_counts_steps(tiny, tmp_path):
    from concept_edit.engines.stage_i import (
        StageIConfig,
        TargetRequest,
        compute_targets,
    )

    _, model = tiny("sd1")
    reqs = [TargetRequest("cat", "dog"), TargetRequest("car", "boat"), TargetRequest("tree", "")]
    cfg = StageIConfig(steps=4, gen_steps=2, images_per_concept=1, batch_concepts=2)
    layers = {"text_encoder": [0, 1]}
    a = compute_targets(model, reqs, ["a photo of a {}"], layers, cfg, cache_dir=tmp_path, progress=False)
    assert a.steps_run == 8 and a.computed == 3 and a.cached == 0  # two chunks x 4 steps
    assert a.losses[0][-1] < a.losses[0][0]  # the dual self-distillation loss goes down
    b = compute_targets(model, reqs, ["a photo of a {}"], layers, cfg, cache_dir=tmp_path, progress=False)
    assert b.steps_run == 0 and b.cached == 3
    torch.testing.assert_close(a.deltas["text_encoder"], b.deltas["text_encoder"])
    # an interrupted run: one concept's file missing -> only that one is optimised again
    victim = sorted(tmp_path.glob("car__boat__*.safetensors"))
    assert len(victim) == 1
    victim[0].unlink()
    c = compute_targets(model, reqs, ["a photo of a {}"], layers, cfg, cache_dir=tmp_path, progress=False)
    assert c.steps_run == 4 and c.cached == 2 and c.computed == 1
    # other hyper-parameters -> other cache entries
    d = compute_targets(model, reqs[:1], ["a photo of a {}"], layers, StageIConfig(steps=2, gen_steps=2, images_per_concept=1),
                        cache_dir=tmp_path, progress=False)
    assert d.steps_run == 2


def test_stage_i_image_variant_and_clamp(tiny):
    from concept_edit.engines.stage_i import (
        StageIConfig,
        TargetRequest,
        compute_targets,
    )

    _, model = tiny("sd2")  # v-prediction: the target is the velocity of the true noise
    lat = torch.randn(2, 4, 16, 16)
    reqs = [TargetRequest("cat", "", images=lat)]
    cfg = StageIConfig(mode="images", steps=3, clamp=0.05)
    r = compute_targets(model, reqs, ["a photo of a {}"], {"text_encoder": [0, 1]}, cfg, progress=False)
    assert r.steps_run == 3
    from concept_edit.adapters.text_encoder import subject_states, tokenize_prompts
    from concept_edit.core.prompts import expand

    h = subject_states(model, "text_encoder", tokenize_prompts(model, expand("cat", ["a photo of a {}"])), out_layers=[1])
    assert r.deltas["text_encoder"].norm() <= 0.05 * h[("out", 1)].norm() * (1 + 1e-5)


def test_emcid_with_distilled_targets_and_uce_combination(tiny, tmp_path):
    from concept_edit.engines.emcid import emcid_delta, emcid_uce_delta

    _, model = tiny("sdxl")
    plan = _plan(targets="distill", steps=2, gen_steps=2, images_per_concept=1, cov_cache_dir=str(tmp_path / "c"),
                 targets_cache_dir=str(tmp_path / "t"))
    d = emcid_delta(model, plan, progress=False)
    assert d.metadata["stage_i"]["steps_run"] == 2
    assert {n.split(".")[0] for n in d.layers} == {"text_encoder", "text_encoder_2"}
    assert all(".layers.0." in n for n in d.layers)  # SDXL: never layer 1 (last read) nor 2 (unread)
    import dataclasses

    s = {**plan.settings.effective(), "targets_cache_dir": str(tmp_path / "t"), "lambda": 0.5}
    both = emcid_uce_delta(model, dataclasses.replace(plan, method="emcid+uce", settings=build_settings("emcid+uce", s)),
                           progress=False)
    assert both.metadata["method"] == "emcid+uce"
    assert any(n.startswith("unet.") for n in both.layers) and any(n.startswith("text_encoder") for n in both.layers)


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_lora_export_of_text_encoder_edit(tiny, family, tmp_path):
    formats = pytest.importorskip("concept_edit.files.formats")
    from concept_edit.adapters.text_encoder import text_module
    from concept_edit.core.apply import apply_delta
    from concept_edit.engines.emcid import emcid_delta
    from concept_edit.testing.tiny_models import build_tiny_pipeline
    from safetensors import safe_open

    _, model = tiny(family)
    delta = emcid_delta(model, _plan(alpha=0.9, cov_cache_dir=str(tmp_path)), progress=False)
    path = tmp_path / "emcid.safetensors"
    formats.save_lora(delta, path)
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
    want = ("lora_te1_", "lora_te2_") if family == "sdxl" else ("lora_te_",)
    assert keys and all(k.startswith(want) for k in keys)
    assert {k.split("_text_model")[0] + "_" for k in keys} == set(want)

    W = model.weights(list(delta.layers))
    h = apply_delta(delta, W)
    edited = {n: w.detach().clone() for n, w in W.items()}
    h.remove()
    fresh = build_tiny_pipeline(family)
    fresh.load_lora_weights(str(path))
    fresh.fuse_lora()

    class _M:
        pipe = fresh

    for name, w in edited.items():
        torch.testing.assert_close(text_module(_M, name).weight.detach(), w, rtol=1e-5, atol=1e-6)


def test_stage_ii_matches_public_emcid_parametrisation():
    """The public EMCID code scales C0 by (1 - a) / 0.5 * w and keys / residuals by sqrt(a / 0.5),
    then solves (w' C0 + K K^T) X = K and takes resid X^T (column convention); with C0 = w * cov
    that is eq. 5 exactly (re-derived here independently of their code)."""
    K1, V, W0, cov = _problem(seed=3)
    R = V - K1 @ W0.mT
    w, a = 37.0, 0.3
    ks, rs = K1.mT * (a / 0.5) ** 0.5, R.mT * (a / 0.5) ** 0.5  # columns
    adj = torch.linalg.solve(w * cov * (1 - a) / 0.5 + ks @ ks.mT, ks)
    theirs = rs @ adj.mT
    ours = emcid_solve_layer(K1, R, w * cov, alpha=a).dense()
    torch.testing.assert_close(ours, theirs)


@pytest.mark.filterwarnings("error::FutureWarning")  # run_layers uses the current create_causal_mask API
@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_resumed_forward_equals_full_forward(tiny, family):
    from concept_edit.adapters.text_encoder import subject_states, tokenize_prompts
    from concept_edit.core.prompts import expand

    _, model = tiny(family)
    pr = tokenize_prompts(model, expand("cat", ["a photo of a {}", "{}", "a big red {} on a table"]))
    for comp in ("text_encoder", "text_encoder_2") if family == "sdxl" else ("text_encoder",):
        full = subject_states(model, comp, pr, fc2_layers=[1], out_layers=[1, 2], capture_input=1, batch_size=2)
        res = subject_states(model, comp, pr, fc2_layers=[1], out_layers=[1, 2], start=(1, full[("in", 1)]), batch_size=2)
        for k in [("fc2_in", 1), ("out", 1), ("out", 2)]:
            torch.testing.assert_close(res[k], full[k], rtol=1e-5, atol=1e-5)


def test_default_c0_weight_grows_with_the_edit(tiny, tmp_path):
    """With cov_weight unset the engine sets it per layer to cov_ratio x tr(K^T K) / tr(C0): the
    reported weight is the one used (a fixed cov_weight of that value gives the same delta), it
    scales with cov_ratio, and it grows with the number of edited concepts."""
    from concept_edit.engines.emcid import emcid_delta

    _, model = tiny("sd1")
    name = "text_encoder.text_model.encoder.layers.0.mlp.fc2"
    more = [Edit("replace", "house", "castle"), Edit("replace", "apple", "pear"), Edit("erase", "river", "")]

    def run(edits=None, **opts):
        settings = build_settings("emcid", {"targets": "dest_hidden", "layers": "0", "cov_cache_dir": str(tmp_path), **opts})
        plan = EditPlan(edits=_plan().edits + (edits or []), templates=["a photo of a {}", "{}"], method="emcid",
                        settings=settings)
        d = emcid_delta(model, plan, progress=False)
        return d, d.metadata["layers_report"][name]["cov_weight"]

    auto, w = run()
    assert "cov_ratio" in auto.metadata["hyperparameters"] and auto.metadata["hyperparameters"]["cov_weight"] is None
    fixed, w_fixed = run(cov_weight=w)
    assert w_fixed == w and "cov_ratio" not in fixed.metadata["hyperparameters"]
    torch.testing.assert_close(auto.layers[name].dense(), fixed.layers[name].dense(), rtol=1e-4, atol=1e-6)
    doubled, w2 = run(cov_ratio=20.0)
    assert w2 == pytest.approx(2 * w, rel=1e-3)
    assert not torch.allclose(doubled.layers[name].dense(), auto.layers[name].dense())
    _, w6 = run(edits=more)
    assert 1.5 * w < w6 < 3 * w  # six concepts' keys against three
