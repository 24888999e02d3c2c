"""The testbed: concept world, tokenizer, classifier and a real edit-efficacy check on the bundled model."""
import numpy as np
import pytest
import torch
from concept_edit.testbed import CLASSIFIER_PATH, get_world, model_dir
from concept_edit.testbed.grammar import (
    HOLDOUT_STYLE_TEMPLATES,
    HOLDOUT_TEMPLATES,
    TRAIN_STYLE_TEMPLATES,
    TRAIN_TEMPLATES,
)
from concept_edit.testbed.world import build_world

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: generation on one thread


needs_assets = pytest.mark.skipif(not (model_dir() / "model_index.json").exists() or not CLASSIFIER_PATH.exists(),
                                  reason="testbed weights not present")


def test_world_is_deterministic_and_complete():
    w = build_world(1000)
    assert len(w.objects) == 1000 and len({o.name for o in w.objects}) == 1000
    assert len({o.visual for o in w.objects + w.professions}) == 1010  # every concept is a distinct picture
    assert len(w.artists) >= 30 and len({(s.background, s.frame) for s in w.artists}) == len(w.artists)
    assert len(w.aliased) >= 50 and len(w.rare_aliased) == 20
    assert len(w.professions) >= 10
    assert sorted({p.p_attribute for p in w.professions}) == [0.15, 0.85]
    build_world.cache_clear()
    assert build_world(1000).objects[17] == w.objects[17]
    # smaller worlds are prefixes sharing aliases and professions
    assert build_world(100).objects == w.objects[:100] and build_world(100).professions == w.professions


def test_holdout_templates_never_used_in_training():
    assert not set(HOLDOUT_TEMPLATES) & set(TRAIN_TEMPLATES)
    assert not set(HOLDOUT_STYLE_TEMPLATES) & set(TRAIN_STYLE_TEMPLATES)


def test_caption_corpus_and_rare_aliases_absent():
    from concept_edit.testbed.data import caption_corpus

    w = build_world(1000)
    caps = caption_corpus(50_000, world=w)
    assert len(caps) == 50_000 and len(set(caps)) > 10_000
    words = {x for c in caps for x in c.split()}
    assert not words & {o.alias for o in w.rare_aliased}
    assert {o.alias for o in w.common_aliased} <= words


def test_tokenizer_gives_one_token_per_word(tmp_path):
    from concept_edit.testbed.tokenizer import all_words, write_tokenizer
    from transformers import CLIPTokenizer

    w = build_world(1000)
    words = all_words(w)
    tok = CLIPTokenizer.from_pretrained(write_tokenizer(tmp_path, words))
    assert all(len(tok(x, add_special_tokens=False).input_ids) == 1 for x in words)


def test_identity_vae_roundtrip():
    from concept_edit.testbed.render import render
    from concept_edit.testbed.vae import make_identity_vae

    vae = make_identity_vae().eval()
    x = torch.from_numpy(np.stack([render(i % 11, i % 10, i % 10, i % 6, i % 5, i % 2) for i in range(8)]))
    x = x.permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        rec = vae.decode(vae.encode(x).latent_dist.sample()).sample
    assert (rec - x).abs().max() < 2e-3


@pytest.mark.skipif(not CLASSIFIER_PATH.exists(), reason="classifier weights not present")
def test_classifier_on_fresh_renders():
    from concept_edit.testbed import load_classifier
    from concept_edit.testbed.classifier import heldout_accuracy

    acc = heldout_accuracy(load_classifier(), build_world(1000), n=300, seed=4242)
    assert acc["object"] >= 0.9 and acc["style"] >= 0.9 and acc["attribute"] >= 0.95


@needs_assets
@pytest.mark.filterwarnings("error:.*torch_dtype:FutureWarning")  # the pipeline loads with dtype=
def test_uce_edit_forgets_source_and_keeps_holdout():
    """Real efficacy: replace one object by another on the bundled model, classify generations."""
    from concept_edit.adapters.diffusers_model import DiffusersModel
    from concept_edit.core.apply import apply_delta
    from concept_edit.core.plan import plan_from_dict
    from concept_edit.engines.uce import uce_delta
    from concept_edit.testbed import (
        demo_holdout,
        demo_plan,
        load_classifier,
        load_testbed_pipeline,
    )
    from concept_edit.testbed.evaluate import concept_hit, generate, head_probs

    pipe = load_testbed_pipeline()
    clf = load_classifier()
    w = get_world()
    plan_d = demo_plan()
    src = w.object_by_name(plan_d["edits"][1]["replace"])
    dst = w.object_by_name(plan_d["edits"][1]["with"])
    keep = w.object_by_name(plan_d["preserve"][1])
    hold = w.object_by_name(demo_holdout())
    prompts = ["a photo of a {}", "the image of the {}", "a picture of a {}", "a painting showing a {}"]
    P_src = [t.format(src.name) for t in prompts]
    P_hold = [t.format(hold.name) for t in prompts]

    def hits(P, c):
        pr = head_probs(clf, generate(pipe, P, 123, steps=12))
        return concept_hit(pr, c).mean()

    before_src, before_hold = hits(P_src, src), hits(P_hold, hold)
    assert before_src >= 0.75 and before_hold >= 0.75, "unedited model should draw both concepts"
    plan = plan_from_dict({"edits": [{"replace": src.name, "with": dst.name}],
                           "preserve": [keep.name], "templates": ["{}", "a photo of a {}", "a painting of a {}"]})
    model = DiffusersModel(pipe)
    delta = uce_delta(model, plan, progress=False)
    h = apply_delta(delta, model.weights(delta.layers))
    try:
        after_src, after_dst, after_hold = hits(P_src, src), hits(P_src, dst), hits(P_hold, hold)
    finally:
        h.remove()
    assert after_src <= 0.25, "source should be forgotten"
    assert after_dst >= 0.5, "source prompts should now draw the destination"
    assert after_hold >= 0.75, "holdout concept should be kept"


@needs_assets
def test_uce_erases_artist_and_keeps_holdout_artist():
    """Real efficacy on styles: erase one artist with UCE; its prompts lose the style, another artist keeps hers."""
    from concept_edit.adapters.diffusers_model import DiffusersModel
    from concept_edit.core.apply import apply_delta
    from concept_edit.core.plan import plan_from_dict
    from concept_edit.testbed import load_classifier, load_testbed_pipeline
    from concept_edit.testbed.evaluate import generate, head_probs

    pipe = load_testbed_pipeline()
    clf = load_classifier()
    w = get_world()
    src, hold, keep = w.artists[ERASE_ARTIST], w.artists[HOLDOUT_ARTIST], w.artists[KEEP_ARTIST]
    objs = [o.name for o in w.objects[:4]]

    def rate(artist):
        P = [t.format(o, artist.name) for o in objs for t in ("a painting of a {} by {}", "a {} in the style of {}")]
        return float((head_probs(clf, generate(pipe, P, 321, steps=10))["style"].argmax(1) == artist.index).mean())

    before_src, before_hold = rate(src), rate(hold)
    assert before_src >= 0.75 and before_hold >= 0.75, "unedited model should draw both styles"
    plan = plan_from_dict({"edits": [{"erase": src.name, "type": "style"}], "preserve": [keep.name],
                           "templates": ["{}", "art by {}", "a painting by {}"]})
    model = DiffusersModel(pipe)
    delta = uce_delta_(model, plan)
    h = apply_delta(delta, model.weights(delta.layers))
    try:
        after_src, after_hold = rate(src), rate(hold)
    finally:
        h.remove()
    assert after_src <= 0.25, f"erased style still drawn in {after_src:.0%} of images"
    assert after_hold >= 0.75, f"holdout style drawn in only {after_hold:.0%} of images after the edit"


def uce_delta_(model, plan):
    from concept_edit.engines.uce import uce_delta

    return uce_delta(model, plan, progress=False)


ERASE_ARTIST, HOLDOUT_ARTIST, KEEP_ARTIST = 0, 7, 13


def test_text_pretraining_targets_and_learning(tmp_path):
    """Phase 1 reads the right token positions and its probe learns the factors."""
    import random

    from concept_edit.testbed import train
    from concept_edit.testbed.text_pretrain import _batch, pretrain_text_encoder
    from concept_edit.testbed.tokenizer import all_words, write_tokenizer
    from transformers import CLIPTokenizer

    w = build_world(1000)
    tok = CLIPTokenizer.from_pretrained(write_tokenizer(tmp_path, all_words(w), model_max_length=32))
    ids, subj, sty, eos, tg = _batch(random.Random(0), w, tok, 64)
    vocab = {v: k for k, v in tok.get_vocab().items()}
    for i in range(len(ids)):
        name = vocab[int(ids[i, subj[i]])].removesuffix("</w>")
        c = w.object_by_name(name)
        assert (tg["shape"][i], tg["colour"][i], tg["pattern"][i]) == c.visual
        assert int(ids[i, eos[i]]) == tok.eos_token_id and eos[i] > subj[i]
        if tg["style"][i]:
            assert vocab[int(ids[i, sty[i]])].removesuffix("</w>") == w.styles[int(tg["style"][i])].name
        else:
            assert sty[i] == -1
    te = train.make_text_encoder(tok, 128, 2, 256)  # small: this checks the objective, not the shipped size
    torch.set_num_threads(2)
    acc = pretrain_text_encoder(te, tok, w, steps=60, batch=64, log=lambda m: None)
    # 60 steps cannot learn 1,000 names, but the artists (31) and attribute words are frequent
    assert acc["eos_style"] > 0.5 and acc["subject_word"] > 0.8
