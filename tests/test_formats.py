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
