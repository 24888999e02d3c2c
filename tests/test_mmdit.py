"""FLUX and SD3 (MMDiT) editing on tiny pipelines built from configs: the family table, keys as the
transformer reads them, UCE through the context and pooled-text embedders (biases kept out of the
solve), LoRA files diffusers loads, and the CLI end to end."""
from __future__ import annotations

import json

import pytest
import torch
from concept_edit.adapters.diffusers_model import editable_model
from concept_edit.adapters.mmdit_model import MMDiTModel
from concept_edit.core.apply import apply_delta
from concept_edit.core.plan import plan_from_dict
from concept_edit.core.prompts import Prompt
from concept_edit.engines.registry import compute_delta
from concept_edit.files.formats import load_delta, save_lora
from concept_edit.testing.tiny_models import build_tiny_mmdit_pipeline

MSL = 32  # T5 padding length for the tests (the real pipelines use 512 / 256)
CTX = "transformer.context_embedder"
POOL = "transformer.time_text_embed.text_embedder.linear_1"


@pytest.fixture(scope="module", params=["flux", "sd3"])
def mmdit(request):
    pipe = build_tiny_mmdit_pipeline(request.param)
    pipe.set_progress_bar_config(disable=True)
    return pipe, MMDiTModel(pipe, max_sequence_length=MSL)


def _plan(**kw):
    return plan_from_dict({"method": "uce", "edits": [{"erase": "Van Gogh", "guide": "art"}],
                           "preserve": ["Claude Monet", "a red apple"], **kw})


def test_family_and_keys_are_what_the_transformer_reads(mmdit):
    pipe, m = mmdit
    assert m.family == type(pipe).__name__.replace("Pipeline", "").replace("StableDiffusion3", "sd3").lower()
    assert isinstance(editable_model(pipe), MMDiTModel)
    text = "a painting by Van Gogh"
    states, pooled = m.encode([text])[text]
    if m.family == "flux":
        ref_states, ref_pooled, _ = pipe.encode_prompt(text, prompt_2=None, max_sequence_length=MSL)
    else:
        ref_states, _, ref_pooled, _ = pipe.encode_prompt(text, prompt_2=None, prompt_3=None,
                                                          do_classifier_free_guidance=False, max_sequence_length=MSL)
    torch.testing.assert_close(states, ref_states[0].float().detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pooled, ref_pooled[0].float().detach(), atol=1e-5, rtol=1e-5)
    p = Prompt(text, len(text))
    t5 = m.t5_tokenizer(text).input_ids
    assert m.t5_tokenizer.convert_ids_to_tokens(t5[m.t5_index(p)]) == "gh"  # "▁Go" "gh": the last piece of the name
    spaces = m.key_spaces()
    assert set(spaces["states"][0]) == {CTX} and set(spaces["pooled"][0]) == {POOL}
    assert len(spaces["states"][1]) == (1 if m.family == "flux" else 2)  # SD3: a CLIP row and a T5 row


def test_edit_reaches_its_target_and_keeps_preserved_outputs_biases_included(mmdit):
    """With a small ridge the edited readers map the concept's keys to the guide's outputs and
    leave the preserved prompts' outputs (weight and bias) where they were."""
    pipe, m = mmdit
    delta = compute_delta(m, _plan(**{"lambda": 1e-4}), progress=False)
    assert set(delta.layers) == {CTX, POOL}
    spaces = m.key_spaces()
    for space, (layers, encs) in spaces.items():
        (name, W), = layers.items()
        lin = pipe.transformer.get_submodule(name[len("transformer."):])
        assert lin.bias is not None
        D = delta.layers[name].dense()
        for enc in encs:
            (k_src, k_dst, k_keep1, k_keep2), _ = enc.last_token_keys(
                [Prompt("Van Gogh", 8), Prompt("art", 3), Prompt("Claude Monet", 12), Prompt("a red apple", 11)])
            out = lambda k, dW: (W.detach() + dW) @ k + lin.bias.detach()  # noqa: E731
            target = out(k_dst, 0)
            assert (out(k_src, D) - target).norm() < 1e-2 * target.norm(), (space, name)
            for k in (k_keep1, k_keep2):
                assert (out(k, D) - out(k, 0)).norm() < 1e-3 * out(k, 0).norm(), (space, name)
    assert delta.metadata["family"] == m.family and delta.metadata["max_sequence_length"] == MSL
    assert set(delta.metadata["key_spaces"]) == {"states", "pooled"}


def test_token_choices_move_every_selected_row_to_its_aligned_target(mmdit):
    """aligned: rows from the subject token on; all: also the template's rows before it. With a
    small ridge every selected source row reaches its destination row (outputs, bias included)."""
    pipe, m = mmdit
    tpl = {"templates": ["a painting by {}"], "lambda": 1e-4, "preserve": [], "preserve_empty": False}
    counts = {}
    for token in ("last", "aligned", "all"):
        plan = _plan(token=token, **tpl)
        delta = compute_delta(m, plan, progress=False)
        counts[token] = delta.metadata["key_spaces"]["states"]["n_edit_keys"]
        src, dst = Prompt("a painting by Van Gogh", 22), Prompt("a painting by art", 17)
        layers, encs = m.key_spaces()["states"]
        (name, W), = layers.items()
        D = delta.layers[name].dense()
        for enc in encs:
            K, T, _ = (enc.aligned_keys([src], [dst], prefix=token == "all") if token != "last" else
                       (enc.last_token_keys([src])[0], enc.last_token_keys([dst])[0], None))
            W0 = W.detach()
            err, before = ((W0 + D) @ K.T - W0 @ T.T).norm(), (W0 @ K.T - W0 @ T.T).norm()
            # exact while the space's rows fit its key width; SD3's CLIP + T5 rows do not: least squares
            exact = counts[token] < K.shape[1]
            assert err < (2e-2 if exact else 0.25) * before, (token, K.shape, err / before)
    assert counts["last"] < counts["aligned"] < counts["all"]
    if m.family == "flux":  # aligned: from the later subject token to the padded end; all: + the template's tokens
        last = max(m.t5_index(src), m.t5_index(dst))
        n_tpl = len(m.t5_tokenizer("a painting by", add_special_tokens=False).input_ids)
        assert (counts["aligned"], counts["all"]) == (MSL - last, MSL - last + n_tpl)


def test_bf16_encoders_cache_bf16_states_and_give_float32_keys():
    """A bf16 pipeline's token states stay bf16 in the encoding cache (half the memory: the cache
    holds every state of every prompt); the keys are those states cast to float32 and the edit
    solves in float32."""
    pipe = build_tiny_mmdit_pipeline("flux").to(torch.bfloat16)
    m = MMDiTModel(pipe, max_sequence_length=MSL)
    text = "a painting by Van Gogh"
    states, pooled = m.encode([text])[text]
    assert states.dtype == pooled.dtype == torch.bfloat16
    (enc,) = m.key_spaces()["states"][1]
    p = Prompt(text, len(text))
    (k,), _ = enc.last_token_keys([p])
    assert k.dtype == torch.float32 and torch.equal(k, states[m.t5_index(p)].float())
    K, _, _ = enc.aligned_keys([p], [Prompt("a painting by art", 17)])
    assert K.dtype == torch.float32
    delta = compute_delta(m, _plan(), progress=False)
    assert all(d.dense().dtype == torch.float32 and torch.isfinite(d.dense()).all() for d in delta.layers.values())


def test_last_token_edits_keep_only_the_rows_they_read():
    """token: last keeps each prompt's last-token rows and pooled vector, not its full states (1,000
    FLUX concepts' full states took ~17 GB); the rows are the full encoding's, the delta the same as
    with full states cached first, and an aligned selection reuses cached full states."""
    pipe = build_tiny_mmdit_pipeline("sd3")
    m = MMDiTModel(pipe, max_sequence_length=MSL)
    delta = compute_delta(m, _plan(), progress=False)
    assert m._cache == {} and len(m._rows) > 0
    texts = ["Van Gogh", "art", "Claude Monet", "a red apple"]
    prompts = [Prompt(t, len(t)) for t in texts]
    full = MMDiTModel(pipe, max_sequence_length=MSL)
    full.encode(texts)  # full states first: last_rows reads them instead of encoding again
    for (rows, pooled), p in zip(m.last_rows(prompts), prompts):
        st, pl = full.encode([p.text])[p.text]
        assert torch.equal(pooled, pl.float())
        assert torch.equal(rows[m.segments[0]], st[m.clip_index(p)].float())
        assert torch.equal(rows[m.segments[1]], st[m.max_tokens + m.t5_index(p)].float())
        for r in (*rows.values(), pooled):  # own storage: not views that keep a batch's states alive
            assert r.untyped_storage().nbytes() == r.numel() * 4
    again = compute_delta(full, _plan(), progress=False)
    for name, d in delta.layers.items():
        torch.testing.assert_close(again.layers[name].dense(), d.dense(), atol=1e-6, rtol=0)


def test_readers_choose_the_edited_embedders(mmdit):
    _, m = mmdit
    both = compute_delta(m, _plan(), progress=False)
    ctx = compute_delta(m, _plan(readers="context"), progress=False)
    pooled = compute_delta(m, _plan(readers="pooled"), progress=False)
    assert set(ctx.layers) == {CTX} and set(pooled.layers) == {POOL}
    torch.testing.assert_close(ctx.layers[CTX].dense(), both.layers[CTX].dense())  # independent solves
    torch.testing.assert_close(pooled.layers[POOL].dense(), both.layers[POOL].dense())


def test_unet_models_refuse_the_mmdit_only_choices(tiny):
    _, model = tiny("sd1")
    with pytest.raises(ValueError, match="readers"):
        compute_delta(model, _plan(readers="pooled"), progress=False)
    with pytest.raises(ValueError, match="causal CLIP"):
        compute_delta(model, _plan(token="all"), progress=False)


def test_settings_the_mmdit_readers_cannot_use_are_refused(mmdit):
    _, m = mmdit
    with pytest.raises(ValueError, match="layers"):
        compute_delta(m, _plan(layers="v"), progress=False)
    for method in ("emcid+uce", "rece", "speed"):  # emcid / nullspace: tests/test_mmdit_text_encoder.py
        with pytest.raises(ValueError, match=f"does not support {m.family} models yet; use uce"):
            compute_delta(m, plan_from_dict({"method": method, "edits": [{"erase": "Van Gogh"}]}), progress=False)


def test_lora_file_loads_in_diffusers_and_reproduces_the_edit(mmdit, tmp_path):
    pipe, m = mmdit
    delta = compute_delta(m, _plan(), progress=False)
    path = tmp_path / "edit.safetensors"
    save_lora(delta, path)
    back = load_delta(path)
    for n, ld in delta.layers.items():
        torch.testing.assert_close(back.layers[n].dense(), ld.dense())
    kw = dict(num_inference_steps=2, height=32, width=32, output_type="np", max_sequence_length=MSL, guidance_scale=1.0)
    handle = apply_delta(delta, m.weights(delta.layers), model=m)
    try:
        ours = pipe("a painting by Van Gogh", generator=torch.Generator().manual_seed(0), **kw).images
    finally:
        handle.remove()
    plain = pipe("a painting by Van Gogh", generator=torch.Generator().manual_seed(0), **kw).images
    pipe.load_lora_weights(str(path), adapter_name="ce")
    try:
        theirs = pipe("a painting by Van Gogh", generator=torch.Generator().manual_seed(0), **kw).images
    finally:
        pipe.unload_lora_weights()
    assert abs(ours - theirs).max() < 1e-4 and abs(ours - plain).max() > 1e-3


def test_cli_edit_info_apply_export(tmp_path):
    from concept_edit.adapters.diffusers_model import load_pipeline
    from concept_edit.cli.main import main

    pipe = build_tiny_mmdit_pipeline("flux")
    src = tmp_path / "flux"
    pipe.save_pretrained(str(src))
    out = tmp_path / "erase.safetensors"
    assert main(["edit", "--model", str(src), "--erase", "Van Gogh", "--preserve", "Monet", "-o", str(out)]) == 0
    info = load_delta(out)
    assert set(info.layers) == {CTX, POOL} and info.metadata["family"] == "flux"
    assert info.metadata["max_sequence_length"] == 512  # FluxPipeline's default
    assert main(["info", str(out)]) == 0
    grid = tmp_path / "grid.png"
    assert main(["apply", "--model", str(src), str(out), "--steps", "1", "-o", str(grid)]) == 0 and grid.exists()
    exported = tmp_path / "edited"
    assert main(["export", "--model", str(src), str(out), "-o", str(exported)]) == 0
    assert json.loads((exported / "model_index.json").read_text())["_class_name"] == "FluxPipeline"
    edited = load_pipeline(exported)
    for name, ld in info.layers.items():
        sub = name[len("transformer."):]
        w0 = pipe.transformer.get_submodule(sub).weight.detach()
        w1 = edited.transformer.get_submodule(sub).weight.detach()
        torch.testing.assert_close(w1 - w0, ld.dense(), atol=1e-5, rtol=0)


def _original_layout_file(pipe, family: str, path, prefix: str):
    """The transformer as an original-layout file: the text readers under their original names
    (FLUX txt_in / vector_in, SD3 context_embedder / y_embedder), the rest under a stand-in name."""
    from concept_edit.adapters.families import FAMILIES
    from safetensors.torch import save_file

    original = {r.module[len("transformer."):] + ".weight": r.original + ".weight" for r in FAMILIES[family].text_readers}
    sd = {prefix + original.get(k, "other." + k): v.detach().clone().contiguous()
          for k, v in pipe.transformer.state_dict().items()}
    save_file(sd, str(path))
    return sd


@pytest.mark.parametrize("family,prefix", [("flux", ""), ("sd3", "model.diffusion_model.")])
def test_single_file_reads_only_the_text_readers_and_bakes_them(family, prefix, tmp_path, monkeypatch):
    from concept_edit.adapters import safetensors_stream
    from concept_edit.adapters.mmdit_single_file import MMDiTSingleFile
    from concept_edit.cli.main import main
    from safetensors.torch import load_file

    pipe = build_tiny_mmdit_pipeline(family)
    folder = tmp_path / "pipe"
    pipe.save_pretrained(str(folder))
    src = tmp_path / f"{family}.safetensors"
    sd = _original_layout_file(pipe, family, src, prefix)
    read = []
    get = safetensors_stream.SafetensorsReader.get
    monkeypatch.setattr(safetensors_stream.SafetensorsReader, "get", lambda self, k, *a: read.append(k) or get(self, k, *a))
    lazy = MMDiTSingleFile(src, folder, max_sequence_length=MSL)
    assert not hasattr(lazy.pipe.transformer, "forward")  # config only: the transformer is never built
    plan = _plan()
    d_lazy = compute_delta(lazy, plan, progress=False)
    readers = {prefix + ("txt_in" if family == "flux" else "context_embedder") + ".weight",
               prefix + ("vector_in.in_layer" if family == "flux" else "y_embedder.mlp.0") + ".weight"}
    assert set(read) == readers
    d_full = compute_delta(MMDiTModel(pipe, max_sequence_length=MSL), plan, progress=False)
    assert d_lazy.metadata["base_fingerprint"] == d_full.metadata["base_fingerprint"]
    for n in d_full.layers:
        torch.testing.assert_close(d_lazy.layers[n].dense(), d_full.layers[n].dense(), atol=1e-6, rtol=1e-5)
    # CLI: edit the single file, bake into a new one; only the two readers change, by the delta
    lora, out = tmp_path / "e.safetensors", tmp_path / "baked.safetensors"
    common = ["--model", str(src), "--config", str(folder)]
    assert main(["edit", *common, "--erase", "Van Gogh", "-o", str(lora)]) == 0
    assert main(["export", *common, str(lora), "-o", str(out)]) == 0
    baked, delta = load_file(str(out)), load_delta(lora)
    changed = {k for k in sd if not torch.equal(baked[k], sd[k])}
    assert changed == readers and set(baked) == set(sd)
    for k in readers:
        name = next(n for n in delta.layers if lazy.file_key(n) == k)
        torch.testing.assert_close(baked[k] - sd[k], delta.layers[name].dense(), atol=1e-6, rtol=0)
