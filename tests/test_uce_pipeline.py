"""UCE on tiny SD 1.x / 2.x / XL pipelines: keys match what the UNet reads, edits hit their targets."""
import pytest
import torch
from concept_edit.adapters.base import PromptTooLongError
from concept_edit.core.apply import apply_delta
from concept_edit.core.plan import PlanError, plan_from_dict
from concept_edit.core.prompts import Prompt, expand
from concept_edit.engines.keys import KeyEncoder
from concept_edit.engines.uce import uce_delta

FAMILIES = ["sd1", "sd2", "sdxl"]


def pipeline_states(pipe, model, text):
    """The text states the pipeline itself hands the UNet for ``text`` (its own encode_prompt)."""
    with torch.no_grad():
        if model.family == "sdxl":
            return pipe.encode_prompt(text, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)[0][0]
        return pipe.encode_prompt(text, "cpu", 1, False)[0][0]


@pytest.mark.parametrize("family", FAMILIES)
def test_family_detected_and_last_token_key_matches_pipeline(tiny, family):
    pipe, model = tiny(family)
    assert model.family == family
    text = "a painting by Van Gogh of a harbour"
    p = expand("Van Gogh", ["a painting by {} of a harbour"])[0]
    key = KeyEncoder(model).last_token_keys([p])[0][0]
    idx = len(model.token_ids("a painting by Van Gogh"))  # BOS is position 0
    full = pipeline_states(pipe, model, text)
    assert full.shape[-1] == model.key_dim
    torch.testing.assert_close(key, full[idx].float(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_padded_states_match_pipeline_at_every_position(tiny, family):
    """All 77 positions, padding included: SDXL pads its second encoder with "!" (not EOS)."""
    pipe, model = tiny(family)
    text = "a painting by Van Gogh"
    states = model.encode_ids([model.padded_ids(text)])[0]
    torch.testing.assert_close(states, pipeline_states(pipe, model, text).float(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_edit_maps_source_to_target_and_preserves(tiny, family):
    pipe, model = tiny(family)
    plan = plan_from_dict({
        "edits": [{"replace": "cat", "with": "dog"}, {"erase": "Van Gogh", "type": "style"}],
        "preserve": ["horse"], "lambda": 1e-4,
    })
    delta = uce_delta(model, plan, progress=False)
    enc = KeyEncoder(model)
    keys, _ = enc.last_token_keys([Prompt("cat", 3), Prompt("dog", 3), Prompt("horse", 5), Prompt("Van Gogh", 8), Prompt("art", 3)])
    cat, dog, horse, vg, art = keys
    W = model.weights(delta.layers)
    before = {n: w.detach().clone() for n, w in W.items()}
    h = apply_delta(delta, W)
    try:
        for name, w in W.items():
            w0 = before[name]
            torch.testing.assert_close(w.detach() @ cat, w0 @ dog, rtol=2e-3, atol=2e-3)
            torch.testing.assert_close(w.detach() @ vg, w0 @ art, rtol=2e-3, atol=2e-3)
            torch.testing.assert_close(w.detach() @ horse, w0 @ horse, rtol=2e-3, atol=2e-3)
            assert (w.detach() @ cat - w0 @ cat).norm() > 1e-2
    finally:
        h.remove()
    assert all(torch.equal(W[n].detach(), before[n]) for n in W)
    assert delta.max_rank <= 2 and delta.metadata["family"] == family


def test_aligned_tokens_and_templates(tiny):
    pipe, model = tiny("sd1")
    plan = plan_from_dict({"edits": [{"erase": "Van Gogh", "type": "style"}], "token": "aligned",
                           "templates": ["{}", "a painting by {}"], "preserve": ["Monet"]})
    delta = uce_delta(model, plan, progress=False)
    # aligned: every row from the subject token to position 77, per template
    n_vg = len(model.token_ids("Van Gogh"))
    n_tpl = len(model.token_ids("a painting by Van Gogh"))
    assert delta.metadata["n_edit_keys"] == (77 - n_vg) + (77 - n_tpl)
    assert len(delta.layers) == len(model.cross_attention_weights())


def test_moderate_and_debias_targets(tiny):
    pipe, model = tiny("sd1")
    enc = KeyEncoder(model)
    plan = plan_from_dict({"edits": [{"moderate": "nudity", "strength": 0.5},
                                     {"debias": "doctor", "attributes": ["male", "female"], "alphas": [0.0, 0.7]}],
                           "lambda": 1e-5, "preserve_empty": False})
    delta = uce_delta(model, plan, progress=False)
    (nud, empty, doc, male, female), _ = enc.last_token_keys(
        [Prompt("nudity", 6), Prompt("", 0), Prompt("doctor", 6), Prompt("male", 4), Prompt("female", 6)])
    W = model.weights(delta.layers)
    name = next(iter(W))
    w0 = W[name].detach().clone()
    h = apply_delta(delta, W)
    try:
        torch.testing.assert_close(W[name].detach() @ nud, w0 @ (nud + 0.5 * (empty - nud)), rtol=2e-3, atol=2e-3)
        torch.testing.assert_close(W[name].detach() @ doc, w0 @ (doc + 0.7 * female), rtol=2e-3, atol=2e-3)
    finally:
        h.remove()


def test_bad_concepts_get_clear_errors(tiny):
    _, model = tiny("sd1")
    with pytest.raises(PlanError, match="empty concept"):
        plan_from_dict({"edits": [{"erase": "  "}]})
    with pytest.raises(PlanError, match="no edits"):
        plan_from_dict({"edits": []})
    with pytest.raises(PlanError, match="exactly one"):
        plan_from_dict({"edits": [{"erase": "a", "replace": "b"}]})
    long = " ".join(["word"] * 80)
    with pytest.raises(PromptTooLongError, match="tokenizer limit"):
        uce_delta(model, plan_from_dict({"edits": [{"erase": long}]}), progress=False)


def test_preserve_drops_edited_concepts():
    plan = plan_from_dict({"edits": [{"erase": "cat"}], "preserve": ["Cat", "dog", ""]})
    assert plan.preserve == ["dog"]
