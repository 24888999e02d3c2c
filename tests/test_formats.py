"""Delta files: LoRA round trip through diffusers' own loader, diff files, truncation, refusals."""

import pytest
import torch
from concept_edit.core.apply import apply_delta
from concept_edit.core.atomic import OutputExistsError
from concept_edit.core.plan import plan_from_dict
from concept_edit.engines.uce import uce_delta
from concept_edit.files.formats import load_delta, read_metadata, save_diff, save_lora
from safetensors import safe_open

PLAN = {"edits": [{"replace": "cat", "with": "dog"}, {"erase": "Van Gogh", "type": "style"}, {"moderate": "gore"}],
        "preserve": ["horse"]}


def _weights_snapshot(W):
    return {n: w.detach().clone() for n, w in W.items()}


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_lora_loads_in_diffusers_and_reproduces_edit(tiny, family, tmp_path):
    from concept_edit.testing.tiny_models import build_tiny_pipeline

    pipe, model = tiny(family)
    delta = uce_delta(model, plan_from_dict(PLAN), progress=False)
    path = tmp_path / "edit.safetensors"
    save_lora(delta, path)
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("lora_unet_") for k in keys)
    assert any(k.endswith("attn2_to_k.lora_down.weight") for k in keys)

    W = model.weights(delta.layers)
    h = apply_delta(delta, W)
    edited = _weights_snapshot(W)
    h.remove()

    fresh = build_tiny_pipeline(family)  # same seed -> same base weights, untouched by other tests
    fresh.load_lora_weights(str(path))
    fresh.fuse_lora()
    for name, w in edited.items():
        comp, _, sub = name.partition(".")
        got = getattr(fresh, comp).get_submodule(sub).weight.detach()
        torch.testing.assert_close(got, w, rtol=1e-5, atol=1e-6)


def test_round_trip_and_metadata(tiny, tmp_path):
    _, model = tiny("sd1")
    delta = uce_delta(model, plan_from_dict(PLAN), progress=False)
    path = tmp_path / "d.safetensors"
    save_lora(delta, path)
    back = load_delta(path)
    assert set(back.layers) == set(delta.layers)
    for n in delta.layers:
        torch.testing.assert_close(back.layers[n].dense(), delta.layers[n].dense())
    meta = read_metadata(path)
    assert meta["method"] == "uce" and meta["base_fingerprint"] == delta.metadata["base_fingerprint"]
    assert [e["source"] for e in meta["edits"]] == ["cat", "Van Gogh", "gore"]
    assert meta["file_format"]["max_rel_error"] == 0.0


def test_truncated_lora_records_error(tiny, tmp_path):
    _, model = tiny("sd1")
    delta = uce_delta(model, plan_from_dict(PLAN), progress=False)
    assert delta.max_rank == 3
    info = save_lora(delta, tmp_path / "r1.safetensors", rank=1)
    assert 0 < info["max_rel_error"] < 1
    assert read_metadata(tmp_path / "r1.safetensors")["file_format"]["max_rel_error"] == pytest.approx(info["max_rel_error"])
    assert load_delta(tmp_path / "r1.safetensors").max_rank == 1


def test_diff_format(tiny, tmp_path):
    _, model = tiny("sdxl")
    delta = uce_delta(model, plan_from_dict(PLAN), progress=False)
    save_diff(delta, tmp_path / "d.safetensors")
    with safe_open(str(tmp_path / "d.safetensors"), "pt") as f:
        assert all(k.endswith(".diff") for k in f.keys())
    back = load_delta(tmp_path / "d.safetensors")
    for n in delta.layers:
        torch.testing.assert_close(back.layers[n].dense(), delta.layers[n].dense(), rtol=1e-4, atol=1e-5)


def test_no_silent_overwrite_and_no_partial_file(tiny, tmp_path):
    _, model = tiny("sd1")
    delta = uce_delta(model, plan_from_dict(PLAN), progress=False)
    path = tmp_path / "d.safetensors"
    path.write_bytes(b"user data")
    with pytest.raises(OutputExistsError):
        save_lora(delta, path)
    assert path.read_bytes() == b"user data"
    save_lora(delta, path, overwrite=True)
    assert load_delta(path).layers
    assert [p.name for p in tmp_path.iterdir()] == ["d.safetensors"]  # no temp files left behind


def test_foreign_lora_resolved_against_model(tiny, tmp_path):
    from safetensors.torch import save_file

    _, model = tiny("sd1")
    name = next(iter(model.cross_attention_weights()))
    W = model.cross_attention_weights()[name]
    key = "lora_unet_" + name.partition(".")[2].replace(".", "_")
    save_file({f"{key}.lora_up.weight": torch.ones(W.shape[0], 1), f"{key}.lora_down.weight": torch.ones(1, W.shape[1]),
               f"{key}.alpha": torch.tensor(0.5)}, str(tmp_path / "f.safetensors"))
    with pytest.raises(ValueError, match="layer map"):
        load_delta(tmp_path / "f.safetensors")
    d = load_delta(tmp_path / "f.safetensors", known_layers=model.all_weights())
    torch.testing.assert_close(d.layers[name].dense(), torch.full(tuple(W.shape), 0.5))


def _random_delta(model, g, *, text_layers=(0, 1)):
    """Rank-2 changes of every cross-attention to_k/to_v and of some text-encoder fc2 layers."""
    from concept_edit.adapters.text_encoder import encoder_components, fc2_name
    from concept_edit.core.delta import ConceptDelta, LayerDelta

    names = list(model.cross_attention_weights()) + [fc2_name(c, i) for c in encoder_components(model) for i in text_layers]
    W = model.weights(names)
    layers = {n: LayerDelta(torch.randn(W[n].shape[0], 2, generator=g), torch.randn(2, W[n].shape[1], generator=g)) for n in names}
    return ConceptDelta(layers, {})


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_foreign_lora_with_sgm_block_names_loads(tiny, family, tmp_path):
    """A kohya LoRA naming UNet layers by the original (SGM/ldm) blocks, as kohya's SDXL trainer and
    A1111 write them, resolves onto the same layers (through diffusers' converters)."""
    from concept_edit.adapters.ldm_keymap import (
        UNET_PREFIX,
        canonical_to_single_file_keys,
    )
    from safetensors.torch import save_file

    pipe, model = tiny(family)
    delta = _random_delta(model, torch.Generator().manual_seed(1))
    single = canonical_to_single_file_keys(pipe)
    tensors = {}
    for name, ld in delta.layers.items():
        comp, _, sub = name.partition(".")
        if comp == "unet":  # model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight
            key = "lora_unet_" + single[name][len(UNET_PREFIX): -len(".weight")].replace(".", "_")
        else:  # kohya names text encoders by their transformers paths
            prefix = {"text_encoder": "lora_te1_" if family == "sdxl" else "lora_te_", "text_encoder_2": "lora_te2_"}[comp]
            key = prefix + sub.replace(".", "_")
        tensors |= {f"{key}.lora_up.weight": ld.up, f"{key}.lora_down.weight": ld.down, f"{key}.alpha": torch.tensor(4.0)}
    assert any("input_blocks" in k for k in tensors) and any("output_blocks" in k for k in tensors)
    path = tmp_path / "sgm.safetensors"
    save_file(tensors, str(path))
    back = load_delta(path, known_layers=model.all_weights())
    assert set(back.layers) == set(delta.layers)
    for n, ld in delta.layers.items():
        torch.testing.assert_close(back.layers[n].dense(), ld.dense() * 2.0)  # alpha 4 / rank 2


def test_foreign_lora_with_unknown_names_is_refused(tiny, tmp_path):
    from safetensors.torch import save_file

    _, model = tiny("sd1")
    key = "lora_unet_input_blocks_1_1_transformer_blocks_7_attn2_to_k"  # no 8th transformer block here
    save_file({f"{key}.lora_up.weight": torch.ones(32, 1), f"{key}.lora_down.weight": torch.ones(1, 32)}, str(tmp_path / "f.safetensors"))
    with pytest.raises(ValueError, match="match no layer of the model.*input_blocks_1_1"):
        load_delta(tmp_path / "f.safetensors", known_layers=model.all_weights())


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_lora_saved_by_diffusers_loads(family, tmp_path):
    """A peft LoRA written by diffusers' own ``save_lora_weights`` (``unet.….lora_A.weight``, with
    lora_alpha != rank in its adapter metadata) loads as exactly the change diffusers applies."""
    from concept_edit.adapters.diffusers_model import DiffusersModel
    from concept_edit.testing.tiny_models import build_tiny_pipeline
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    pipe = build_tiny_pipeline(family, seed=3)
    unet_cfg = LoraConfig(r=2, lora_alpha=6, target_modules=["to_k", "to_v"], init_lora_weights=False)
    # (diffusers cannot load a text-encoder LoRA on fc2 alone: it infers the key style from attention keys)
    te_cfg = LoraConfig(r=3, lora_alpha=3, target_modules=["q_proj", "fc2"], init_lora_weights=False)
    pipe.unet.add_adapter(unet_cfg)
    # transformers' add_adapter wants a newer peft than diffusers does; inject with peft itself
    inject_adapter_in_model(te_cfg, pipe.text_encoder)
    te_layers = {k.replace(".default", ""): v for k, v in pipe.text_encoder.state_dict().items() if ".lora_" in k}
    type(pipe).save_lora_weights(
        str(tmp_path), weight_name="peft.safetensors",
        unet_lora_layers=get_peft_model_state_dict(pipe.unet), text_encoder_lora_layers=te_layers,
        unet_lora_adapter_metadata=unet_cfg.to_dict(), text_encoder_lora_adapter_metadata=te_cfg.to_dict(),
    )
    path = tmp_path / "peft.safetensors"
    with safe_open(str(path), "pt") as f:
        assert all(".lora_A." in k or ".lora_B." in k for k in f.keys())

    fresh = build_tiny_pipeline(family, seed=3)
    model = DiffusersModel(fresh)
    W0 = {n: w.detach().clone() for n, w in model.all_weights().items()}
    delta = load_delta(path, known_layers=W0)
    fresh.load_lora_weights(str(path))
    fresh.fuse_lora()
    fresh.unload_lora_weights()  # keeps the fused weights, drops peft's wrappers
    W1 = model.all_weights()
    n_unet = sum(n.startswith("unet.") for n in delta.layers)
    assert n_unet == sum(n.startswith("unet.") and n.endswith(("to_k", "to_v")) for n in W0)  # attn1 and attn2
    assert len(delta.layers) - n_unet == 6  # q_proj and fc2 of 3 layers
    changed = {n for n in W0 if not torch.equal(W0[n], W1[n])}
    assert changed == set(delta.layers)
    for n in delta.layers:
        torch.testing.assert_close(W1[n] - W0[n], delta.layers[n].dense(), rtol=1e-4, atol=1e-5)
