"""The FLUX-shaped testbed (testbed/flux_train.py): its tokenizer, the shipped FluxPipeline folder, and
a real erase through the context and pooled-text embedders, scored by the testbed classifier."""
import json

import pytest
import torch
from concept_edit.testbed import ASSETS, CLASSIFIER_PATH, FLUX_MODEL_DIR, get_world

needs_flux = pytest.mark.skipif(not (FLUX_MODEL_DIR / "model_index.json").exists() or not CLASSIFIER_PATH.exists(),
                                reason="FLUX testbed weights not present")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: generation on one thread


def test_t5_tokenizer_gives_one_token_per_word(tmp_path):
    from concept_edit.testbed.text_pretrain import word_id
    from concept_edit.testbed.tokenizer import all_words, write_t5_tokenizer
    from transformers import AutoTokenizer

    w = get_world(1000)
    tok = AutoTokenizer.from_pretrained(write_t5_tokenizer(tmp_path / "t5", all_words(w)))
    assert type(tok).__name__.startswith("T5") and (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    name = w.objects[5].name
    ids = tok(f"one {name}, a drawing").input_ids
    assert tok.convert_ids_to_tokens(ids) == ["▁one", "▁" + name, ",", "▁a", "▁drawing", "</s>"]
    assert word_id(tok, ",") == tok.convert_tokens_to_ids(",")
    assert all(len(tok(x, add_special_tokens=False).input_ids) == 1 for x in all_words(w) if x.isalnum())
    assert tok.unk_token_id in tok("an unknownword").input_ids


@needs_flux
def test_shipped_flux_testbed_loads_offline_and_fits_the_budget():
    from concept_edit.adapters.diffusers_model import editable_model
    from concept_edit.adapters.mmdit_model import MMDiTModel
    from concept_edit.testbed import load_flux_testbed_pipeline

    size = sum(f.stat().st_size for f in FLUX_MODEL_DIR.rglob("*") if f.is_file())
    assert size <= 30 * 2**20, f"{size / 2**20:.1f} MB"
    pipe = load_flux_testbed_pipeline()
    assert type(pipe).__name__ == "FluxPipeline" and not pipe.transformer.config.guidance_embeds
    assert all(p.dtype == torch.float32 for p in pipe.transformer.parameters())
    m = editable_model(pipe)
    assert isinstance(m, MMDiTModel) and m.family == "flux" and m.max_sequence_length == 32
    meta = json.loads((ASSETS / "flux_testbed.json").read_text())
    assert meta["evaluation"]["head_train_templates"]["top1"] >= 0.8


@needs_flux
def test_uce_erase_on_the_flux_testbed_forgets_the_object_and_keeps_a_holdout():
    """Erase one object through the context and pooled-text embedders; the classifier no longer
    sees it in its prompts (training and held-out templates), a holdout object is still drawn."""
    from concept_edit.adapters.diffusers_model import editable_model
    from concept_edit.core.apply import apply_delta
    from concept_edit.core.plan import plan_from_dict
    from concept_edit.engines.uce import uce_delta
    from concept_edit.testbed import load_classifier, load_flux_testbed_pipeline
    from concept_edit.testbed.evaluate import concept_hit, generate, head_probs

    pipe = load_flux_testbed_pipeline()
    clf = load_classifier()
    w = get_world()
    good = [w.object_by_name(n) for n in json.loads((ASSETS / "flux_testbed.json").read_text())["well_drawn_head_objects"]]
    good = [o for o in good if not o.alias]
    src, keep, hold = good[0], good[1], good[-1]
    templates = ["a photo of a {}", "the image of the {}", "a picture of a {}", "a painting showing a {}"]

    def hits(c):
        pr = head_probs(clf, generate(pipe, [t.format(c.name) for t in templates] * 2, 123))
        return float(concept_hit(pr, c).mean())

    before_src, before_hold = hits(src), hits(hold)
    assert before_src >= 0.75 and before_hold >= 0.75, "the unedited model should draw both objects"
    plan = plan_from_dict({"edits": [{"erase": src.name}], "preserve": [keep.name],
                           "templates": ["{}", "a photo of a {}", "a painting of a {}"]})
    model = editable_model(pipe)
    delta = uce_delta(model, plan, progress=False)
    assert set(delta.layers) == {"transformer.context_embedder", "transformer.time_text_embed.text_embedder.linear_1"}
    h = apply_delta(delta, model.weights(delta.layers))
    try:
        after_src, after_hold = hits(src), hits(hold)
    finally:
        h.remove()
    assert after_src <= 0.25, f"erased object still drawn in {after_src:.0%} of images"
    assert after_hold >= 0.75, f"holdout drawn in only {after_hold:.0%} of images after the edit"
