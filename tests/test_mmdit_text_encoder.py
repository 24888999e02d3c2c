"""EMCID and null-space on the text encoders of FLUX and SD3 (tiny pipelines built from configs, real
CLIP tokenizer, offline T5 tokenizer): the CLIP ``mlp.fc2`` and T5 ``DenseReluDense.wo`` sites, layer
selection and naming, the closed form on the edited layers (edit keys reach their targets, preserved
keys keep their outputs), files, export, the CLI, and refusals."""
from __future__ import annotations

import warnings

import pytest
import torch
from concept_edit.adapters import text_encoder as te
from concept_edit.adapters.mmdit_model import MMDiTModel
from concept_edit.core.apply import apply_delta
from concept_edit.core.plan import plan_from_dict
from concept_edit.core.prompts import Prompt, expand
from concept_edit.engines.registry import compute_delta
from concept_edit.files.formats import load_delta, save_diff, save_lora
from concept_edit.testing.tiny_models import build_tiny_mmdit_pipeline

MSL = 32
T5 = {"flux": "text_encoder_2", "sd3": "text_encoder_3"}
TEMPLATES = ["a photo of a {}", "{}"]
EDITS = [{"replace": "cat", "with": "dog"}, {"erase": "tree"}]
PRESERVE = ["house"]


@pytest.fixture(scope="module", params=["flux", "sd3"])
def mmdit(request):
    pipe = build_tiny_mmdit_pipeline(request.param)
    pipe.set_progress_bar_config(disable=True)
    return pipe, MMDiTModel(pipe, max_sequence_length=MSL)


def _plan(method, **settings):
    return plan_from_dict({"method": method, "edits": EDITS, "preserve": PRESERVE, "templates": TEMPLATES, **settings})


def _sites(m):
    """(component, layer) pairs: the T5 wo site and a CLIP fc2 site (SD3: CLIP-G's)."""
    return [(T5[m.family], 0), ("text_encoder" if m.family == "flux" else "text_encoder_2", 0)]


def test_layers_names_and_weights(mmdit):
    _, m = mmdit
    t5 = T5[m.family]
    if m.family == "flux":  # CLIP-L (3 layers) feeds only the pooled vector: its last layer is read
        assert te.resolve_layers(m) == {"text_encoder": [0, 1], "text_encoder_2": [0]}
    else:  # SD3 reads CLIP-L / CLIP-G's penultimate layer (as SDXL) and T5's last
        assert te.resolve_layers(m) == {"text_encoder": [0], "text_encoder_2": [0], "text_encoder_3": [0]}
        with pytest.raises(te.LayerSelectionError, match="penultimate"):
            te.resolve_layers(m, {"text_encoder_2": [2]})
    assert te.resolve_layers(m, {t5: [-1]}) == {t5: [1]}  # T5: every layer is read
    name = te.fc2_name(t5, 1, m)
    assert name == f"{t5}.encoder.block.1.layer.1.DenseReluDense.wo"
    assert te.parse_fc2_name(name) == (t5, 1)
    assert te.fc2_name("text_encoder", 0, m) == "text_encoder.text_model.encoder.layers.0.mlp.fc2"
    w = m.weights([name])[name]
    assert w is getattr(m.pipe, t5).encoder.block[1].layer[1].DenseReluDense.wo.weight


def test_t5_keys_are_full_padded_states(mmdit):
    """The T5 key of a prompt is the wo input at the concept's last T5 token of the sequence the
    pipeline feeds (padded to max_sequence_length, no mask); the layer output there is the state."""
    pipe, m = mmdit
    t5 = T5[m.family]
    enc = getattr(pipe, t5)
    p = Prompt("a photo of a cat", 16)
    st = te.subject_states(m, t5, te.tokenize_prompts(m, [p]), fc2_layers=[1], out_layers=[1])
    ids = m.t5_tokenizer(p.text, padding="max_length", max_length=MSL, return_tensors="pt").input_ids
    seen = {}
    hs = [enc.encoder.block[1].layer[1].DenseReluDense.wo.register_forward_pre_hook(lambda mod, inp: seen.update(k=inp[0])),
          enc.encoder.block[1].register_forward_hook(lambda mod, inp, out: seen.update(out=out[0]))]
    with torch.no_grad():
        enc(ids)
    for h in hs:
        h.remove()
    i = m.t5_index(p)
    torch.testing.assert_close(st[("fc2_in", 1)][0], seen["k"][0, i].float())
    torch.testing.assert_close(st[("out", 1)][0], seen["out"][0, i].float())


@pytest.mark.filterwarnings("ignore::concept_edit.solvers.linalg.IllConditionedWarning")
@pytest.mark.parametrize("method", ["emcid", "nullspace"])
def test_closed_form_maps_edit_keys_to_targets_and_keeps_preserved(mmdit, method, tmp_path):
    """One edited layer per site (T5 wo, CLIP fc2), near-exact settings: after the edit each edited
    prompt's state after that layer at its subject token is the target z* = z + (mean destination
    state - mean source state) (dest_hidden), and the preserved prompts' states stay put (EMCID:
    at their subject tokens; null-space: at every real token, through the projector)."""
    pipe, m = mmdit
    for comp, layer in _sites(m):
        opts = {"layers": {comp: [layer]}, "targets": "dest_hidden", "key_mode": "each"}
        if method == "emcid":
            opts.update(alpha=1 - 1e-9, cov_weight=1e-6, preserve_scale=1.0, cov_cache_dir=str(tmp_path))
        else:
            opts.update(projector="preserve", cov_positions="tokens", threshold=1e-9, **{"lambda": 1e-6})
        delta = compute_delta(m, _plan(method, **opts), progress=False)
        name = te.fc2_name(comp, layer, m)
        assert set(delta.layers) == {name}
        assert delta.metadata["family"] == m.family and delta.metadata["max_sequence_length"] == MSL

        def states(prompts, full=False):
            tp = te.tokenize_prompts(m, prompts)
            if full:
                return te.run_encoder(m, comp, te.encoder_batch(m, comp, tp, "tokens")[0], None, out_layers=[layer])[1]
            return te.subject_states(m, comp, tp, out_layers=[layer])[("out", layer)]

        src = [p for e in ("cat", "tree") for p in expand(e, TEMPLATES)]
        dst = [p for e in ("dog", "") for p in expand(e, TEMPLATES)]
        kept = [p for c in PRESERVE for p in expand(c, TEMPLATES)] + [Prompt("", 0)]
        z, zd, zk = states(src), states(dst), states(kept)
        offset = (zd - z).view(2, 2, -1).mean(1).repeat_interleave(2, 0)
        full_k = states(kept, full=True)[("out", layer)]
        h = apply_delta(delta, m.weights([name]), model=m)
        try:
            z1, zk1, full_k1 = states(src), states(kept), states(kept, full=True)[("out", layer)]
        finally:
            h.remove()
        target = z + offset
        assert (z1 - target).norm() < 1e-3 * offset.norm(), (comp, (z1 - target).norm() / offset.norm())
        assert (zk1 - zk).norm() < 1e-3 * offset.norm(), comp
        if method == "nullspace":  # every real token of the preserved prompts (BOS..EOS / content..EOS)
            _, mask = te.encoder_batch(m, comp, te.tokenize_prompts(m, kept), "tokens")
            assert (full_k1 - full_k)[mask].abs().max() < 1e-3 * offset.norm(), comp
            assert delta.metadata["kept_rank"][name] > 0 and delta.metadata["preserve_drift"] is not None


def test_delta_applies_round_trips_and_exports(mmdit, tmp_path):
    from concept_edit.files.export import export_diffusers

    pipe, m = mmdit
    t5 = T5[m.family]
    plan = _plan("emcid", targets="dest_hidden", cov_weight=1.0, cov_cache_dir=str(tmp_path / "c0"))
    delta = compute_delta(m, plan, progress=False)
    assert {n.split(".")[0] for n in delta.layers} == set(te.resolve_layers(m))
    # C0 was cached per (model, corpus, positions); a second run loads it
    again = compute_delta(m, plan, progress=False)
    assert again.metadata["covariance"]["cache_file"] == delta.metadata["covariance"]["cache_file"]
    for n in delta.layers:
        torch.testing.assert_close(again.layers[n].dense(), delta.layers[n].dense())
    # LoRA: kohya / OneTrainer names ComfyUI maps; diffusers does not load them (warned)
    lora = tmp_path / "te.safetensors"
    with pytest.warns(UserWarning, match="does not load the text-encoder layers"):
        info = save_lora(delta, lora)
    assert info["diffusers_loads_all"] is False
    from safetensors import safe_open

    with safe_open(str(lora), "pt") as f:
        keys = {k.split(".")[0] for k in f.keys()}
    t5_prefix = "lora_te2_" if m.family == "flux" else "lora_te3_"
    assert f"{t5_prefix}encoder_block_0_layer_1_DenseReluDense_wo" in keys
    assert "lora_te1_text_model_encoder_layers_0_mlp_fc2" in keys
    diff = tmp_path / "te_diff.safetensors"
    save_diff(delta, diff)
    for path in (lora, diff):
        back = load_delta(path)
        assert set(back.layers) == set(delta.layers) and back.metadata["base_fingerprint"] == delta.metadata["base_fingerprint"]
        for n, ld in delta.layers.items():
            torch.testing.assert_close(back.layers[n].dense(), ld.dense(), atol=1e-6, rtol=1e-5)
    # a LoRA without our layer map resolves against the model's layer names (kohya names)
    from concept_edit.files.formats import resolve_foreign

    with safe_open(str(lora), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    _, names = resolve_foreign(tensors, list(m.text_encoder_weights()), family=m.family)
    assert set(names.values()) == set(delta.layers)
    # apply / remove bit-exactly, with the model's fingerprint checks
    W = m.weights(list(delta.layers))
    snap = {n: w.detach().clone() for n, w in W.items()}
    h = apply_delta(load_delta(lora), W, model=m)
    for n, w in W.items():
        torch.testing.assert_close(w.detach() - snap[n], delta.layers[n].dense(), atol=1e-6, rtol=0)
    h.remove()
    assert all(torch.equal(w, snap[n]) for n, w in W.items())
    # export to a diffusers folder: the T5 wo and CLIP fc2 weights carry the delta
    out = export_diffusers(pipe, m, delta, tmp_path / "edited")
    cls = type(pipe)
    edited = cls.from_pretrained(str(out), local_files_only=True)
    for n, ld in delta.layers.items():
        comp, _, sub = n.partition(".")
        w1 = getattr(edited, comp).get_submodule(te.text_module_path(getattr(edited, comp), sub)).weight.detach()
        torch.testing.assert_close(w1 - snap[n], ld.dense(), atol=1e-5, rtol=0)
    assert any(n.startswith(t5) for n in delta.layers)


def test_encoding_cache_follows_text_encoder_weights(mmdit):
    """Keys come from the encoders as they are: a text-encoder delta applied in place (or removed)
    drops the cached encodings instead of serving the unedited ones."""
    _, m = mmdit
    text = "a photo of a cat"
    before = m.encode([text])[text][0].clone()
    (before_rows, _), = m.last_rows([Prompt(text, len(text))])
    w = m.text_encoder_weights()[f"{T5[m.family]}.encoder.block.0.layer.1.DenseReluDense.wo"]
    snap = w.detach().clone()
    with torch.no_grad():
        w.add_(0.5 * torch.randn_like(w))
    try:
        edited = m.encode([text])[text][0]
        assert not torch.allclose(edited, before)
        torch.testing.assert_close(edited, m.encode([text], cached=False)[text][0])
        (rows, _), = m.last_rows([Prompt(text, len(text))])  # the last-token rows follow too
        assert not torch.allclose(rows[m.segments[-1]], before_rows[m.segments[-1]])  # the T5 row
    finally:
        with torch.no_grad():
            w.copy_(snap)
    torch.testing.assert_close(m.encode([text])[text][0], before)


def test_refusals(mmdit):
    from concept_edit.adapters.base import PromptTooLongError

    _, m = mmdit
    with pytest.raises(ValueError, match="targets: dest_hidden"):
        compute_delta(m, _plan("emcid"), progress=False)  # default targets: distill (stage I through a UNet)
    for targets in ("text", "refine"):
        with pytest.raises(ValueError, match="stage I"):
            compute_delta(m, _plan("nullspace", targets=targets), progress=False)
    with pytest.raises(ValueError, match="site: text_encoder"):
        compute_delta(m, _plan("nullspace", site="cross_attention"), progress=False)
    for method in ("emcid+uce", "rece", "speed"):
        with pytest.raises(ValueError, match=f"does not support {m.family} models yet"):
            compute_delta(m, plan_from_dict({"method": method, "edits": EDITS}), progress=False)
    long = " ".join(["cat"] * (MSL + 4))
    with pytest.raises(PromptTooLongError):
        te.t5_batch(m, te.tokenize_prompts(m, [Prompt(long, 3)]))


def test_cli_edits_t5_of_a_flux_folder_and_exports(tmp_path):
    from concept_edit.adapters.diffusers_model import load_pipeline
    from concept_edit.cli.main import main

    pipe = build_tiny_mmdit_pipeline("flux")
    src = tmp_path / "flux"
    pipe.save_pretrained(str(src))
    out = tmp_path / "t5.safetensors"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["edit", "--model", str(src), "--method", "emcid", "--replace", "cat=dog", "--set", "targets=dest_hidden",
                     "--set", "layers={text_encoder_2: [0]}", "--set", f"cov_cache_dir={tmp_path / 'c0'}", "-o", str(out)]) == 0
    delta = load_delta(out)
    assert set(delta.layers) == {"text_encoder_2.encoder.block.0.layer.1.DenseReluDense.wo"}
    assert delta.metadata["method"] == "emcid" and delta.metadata["max_sequence_length"] == 512
    exported = tmp_path / "edited"
    assert main(["export", "--model", str(src), str(out), "-o", str(exported)]) == 0
    edited = load_pipeline(exported)
    (name, ld), = delta.layers.items()
    w0 = pipe.text_encoder_2.encoder.block[0].layer[1].DenseReluDense.wo.weight.detach()
    w1 = edited.text_encoder_2.encoder.block[0].layer[1].DenseReluDense.wo.weight.detach()
    torch.testing.assert_close(w1 - w0, ld.dense(), atol=1e-5, rtol=0)
