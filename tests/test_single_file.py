"""Original-layout single files: write, load back through diffusers, edit lazily, bake."""
import hashlib

import pytest
import torch
from concept_edit.adapters.base import text_module_path
from concept_edit.adapters.diffusers_model import DiffusersModel, load_pipeline
from concept_edit.adapters.ldm_convert import canonical_state_dict, save_single_file
from concept_edit.adapters.ldm_keymap import (
    TEXT_ENCODERS,
    canonical_to_single_file_keys,
)
from concept_edit.adapters.single_file_model import SingleFileModel
from concept_edit.core.atomic import OutputExistsError
from concept_edit.core.delta import ConceptDelta, LayerDelta
from concept_edit.core.plan import plan_from_dict
from concept_edit.engines.uce import uce_delta
from concept_edit.files.export import export_single_file
from concept_edit.testing.tiny_models import build_tiny_pipeline
from safetensors import safe_open

FAMILIES = ["sd1", "sd2", "sdxl"]
PLAN = {"edits": [{"erase": "cat"}], "preserve": ["tree"]}


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """family -> (pipeline, its diffusers folder, its original-layout single file)."""
    cache = {}

    def get(family):
        if family not in cache:
            pipe = build_tiny_pipeline(family)
            root = tmp_path_factory.mktemp(f"single_{family}")
            pipe.save_pretrained(str(root / "config"))
            path = save_single_file(pipe, root / f"{family}.safetensors")
            cache[family] = (pipe, root / "config", path)
        return cache[family]

    return get


@pytest.fixture(scope="module")
def full_delta(single):
    """family -> the UCE delta of PLAN computed on the fully loaded pipeline."""
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = uce_delta(DiffusersModel(single(family)[0]), plan_from_dict(PLAN), progress=False)
        return cache[family]

    return get


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_same_weights(a, b):
    sa, sb = canonical_state_dict(a), canonical_state_dict(b)
    assert sa.keys() == sb.keys()
    bad = [k for k in sa if sa[k].shape != sb[k].shape or not torch.equal(sa[k], sb[k])]
    assert not bad, f"{len(bad)} tensors differ, e.g. {bad[:3]}"


@pytest.mark.parametrize("family", FAMILIES)
def test_diffusers_loads_written_file_exactly(single, family):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    pipe, cfg, path = single(family)
    if family == "sdxl":
        loaded = StableDiffusionXLPipeline.from_single_file(str(path), config=str(cfg), local_files_only=True)
    else:
        loaded = StableDiffusionPipeline.from_single_file(
            str(path), config=str(cfg), local_files_only=True, safety_checker=None, requires_safety_checker=False)
    assert_same_weights(pipe, loaded)
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
    prefixes = {"sd1": "cond_stage_model.transformer.text_model.", "sd2": "cond_stage_model.model.transformer.resblocks.",
                "sdxl": "conditioner.embedders.1.model.transformer.resblocks."}
    assert any(k.startswith(prefixes[family]) for k in keys)
    assert all(k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "conditioner.")) for k in keys)


@pytest.mark.parametrize("family", FAMILIES)
def test_canonical_keys(single, family):
    pipe, cfg, path = single(family)
    keys = canonical_to_single_file_keys(pipe)
    assert keys == canonical_to_single_file_keys(cfg)  # from the configs alone
    n_te = sum(k.startswith("text_encoder") for k in keys)
    assert n_te == 2 * sum(getattr(pipe, c).config.num_hidden_layers for c in TEXT_ENCODERS if getattr(pipe, c, None) is not None)
    model = DiffusersModel(pipe)
    assert {k for k in keys if k.startswith("unet.")} == set(model.cross_attention_weights())
    with safe_open(str(path), framework="pt") as f:
        for name, key in keys.items():
            comp, _, sub = name.partition(".")
            enc = getattr(pipe, comp)
            w = enc.get_submodule(text_module_path(enc, sub)).weight
            assert torch.equal(f.get_tensor(key), w), name
    if family != "sd1":  # OpenCLIP names
        assert any(v.endswith("mlp.c_proj.weight") for v in keys.values())


@pytest.mark.parametrize("family", FAMILIES)
def test_single_file_model_matches_full_pipeline(single, full_delta, family):
    pipe, cfg, path = single(family)
    full = full_delta(family)
    lazy_model = SingleFileModel(path, cfg)
    lazy = uce_delta(lazy_model, plan_from_dict(PLAN), progress=False)
    assert lazy_model.family == family
    assert list(lazy.layers) == list(full.layers)
    for name in full.layers:
        assert torch.equal(lazy.layers[name].up, full.layers[name].up), name
        assert torch.equal(lazy.layers[name].down, full.layers[name].down), name
    assert lazy.metadata["base_fingerprint"] == full.metadata["base_fingerprint"]
    # nothing of the UNet beyond the cross-attention weights was read
    assert not hasattr(lazy_model.pipe.unet, "parameters") and getattr(lazy_model.pipe, "vae", None) is None
    with pytest.raises(AttributeError, match="needs the full pipeline"):
        lazy_model.pipe.unet.named_parameters()
    assert set(lazy_model._cache) == set(full.layers)
    assert set(lazy_model.all_weights()) == set(DiffusersModel(pipe).all_weights())


@pytest.mark.parametrize("family", FAMILIES)
def test_export_from_single_file(single, full_delta, family, tmp_path):
    pipe, cfg, path = single(family)
    before = sha(path)
    model = SingleFileModel(path, cfg)
    delta = full_delta(family)
    # one text-encoder layer too (OpenCLIP: c_proj; SDXL: encoder 2's fused q in in_proj)
    comp = "text_encoder_2" if family == "sdxl" else "text_encoder"
    te = getattr(pipe, comp)
    extra = {f"{comp}.text_model.encoder.layers.1.mlp.fc2": te.config.hidden_size}
    if family == "sdxl":
        extra[f"{comp}.text_model.encoder.layers.0.self_attn.q_proj"] = te.config.hidden_size
    g = torch.Generator().manual_seed(1)
    layers = dict(delta.layers)
    for name, width in extra.items():
        w = text_module_path(te, name.partition(".")[2])
        shape = te.get_submodule(w).weight.shape
        layers[name] = LayerDelta(torch.randn(shape[0], 2, generator=g), torch.randn(2, shape[1], generator=g) * 0.01)
    delta = ConceptDelta(layers, dict(delta.metadata, base_fingerprint=None))

    out = tmp_path / "edited.safetensors"
    export_single_file(path, None, model, delta, out)
    assert sha(path) == before  # the source is never written to
    new = load_pipeline(out, config=cfg)
    src = canonical_state_dict(pipe)
    got = canonical_state_dict(new)
    edited = {n + ".weight": n for n in delta.layers}  # canonical parameter names
    assert set(edited) <= set(src)
    for key, t in src.items():
        if key in edited:
            name = edited[key]
            torch.testing.assert_close(got[key], t + delta.layers[name].dense(), rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(got[key], t), key
    # unedited tensors are byte-identical, header metadata records the bake
    with safe_open(str(path), framework="pt") as a, safe_open(str(out), framework="pt") as b:
        assert set(a.keys()) == set(b.keys())
        assert b.metadata()["concept_edit"].startswith("baked:")
    with pytest.raises(OutputExistsError):
        export_single_file(path, None, model, delta, out)
    with pytest.raises(ValueError, match="source"):
        export_single_file(path, None, model, delta, path, overwrite=True)
    assert sha(path) == before


def test_export_from_pipeline(single, full_delta, tmp_path):
    pipe, cfg, _ = single("sd1")
    model = DiffusersModel(pipe)
    delta = full_delta("sd1")
    pristine = {n: w.detach().clone() for n, w in model.weights(delta.layers).items()}
    out = tmp_path / "from_pipe.safetensors"
    export_single_file(None, pipe, model, delta, out, dtype=torch.float16)
    for n, w in model.weights(delta.layers).items():  # the pipeline is restored
        assert torch.equal(w, pristine[n])
    new = load_pipeline(out, config=cfg)
    for n, ld in delta.layers.items():
        w = new.unet.get_submodule(n.partition(".")[2]).weight
        assert w.dtype == torch.float32  # load_pipeline's dtype; the file holds float16
        torch.testing.assert_close(w, (pristine[n] + ld.dense()).half().float())
    with pytest.raises(OutputExistsError):
        save_single_file(pipe, out)


def test_refusals(single, tmp_path):
    from concept_edit.adapters.diffusers_model import ModelLoadError

    _, cfg1, p1 = single("sd1")
    _, cfg2, _ = single("sd2")
    with pytest.raises(ModelLoadError, match="sd1 checkpoint but config"):
        SingleFileModel(p1, cfg2)
    with pytest.raises(ModelLoadError, match="does not exist"):
        SingleFileModel(tmp_path / "nope.safetensors", cfg1)
    with pytest.raises(KeyError, match="does not have"):
        SingleFileModel(p1, cfg1).weights(["unet.nope.to_k"])


def test_cli_single_file_edit_and_export(single, tmp_path):
    """CLI on a single file: the edit never builds the UNet; exports go file->file and folder->file."""
    from concept_edit.cli.main import main
    from concept_edit.files.formats import load_delta

    pipe, config, path = single("sd1")
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    d = tmp_path / "e.safetensors"
    assert main(["edit", "--model", str(path), "--config", str(config), "--erase", "cat", "-o", str(d)]) == 0
    assert main(["edit", "--model", str(path), "--erase", "cat", "-o", str(tmp_path / "x.safetensors")]) == 2
    delta = load_delta(d)
    for out, src in ((tmp_path / "a.safetensors", path), (tmp_path / "b.safetensors", config)):
        assert main(["export", "--model", str(src), "--config", str(config), str(d), "-o", str(out)]) == 0
        with safe_open(str(out), "pt") as f, safe_open(str(path), "pt") as g:
            keys = canonical_to_single_file_keys(pipe)
            for name, ld in delta.layers.items():
                k = keys[name]
                torch.testing.assert_close(f.get_tensor(k), g.get_tensor(k) + ld.dense(), rtol=1e-5, atol=1e-6)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before
