"""ComfyEditableModel and the delta -> patch conversion inside a real ComfyUI (in a subprocess with
ComfyUI's Python). Skipped unless COMFYUI_PATH is set; uses the e2e test's cached SD 1.5-shaped
random checkpoint.

Checks: the text states equal ComfyUI's own encoding; canonical layer names; an edit node never
mutates its inputs and its clone's effective weights are exactly W0 + delta; ``base`` patched vs
original with a LoRA on the MODEL; a delta applied through ComfyUI's LoraLoader equals the node's;
a delta of another family's shapes and a non-finite strength are refused.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("ce_comfyui_host", Path(__file__).resolve().parent / "comfyui_host.py")
host = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(host)

pytestmark = pytest.mark.skipif(host.comfy_path() is None, reason=host.SKIP_REASON)

SCRIPT = r'''
import tempfile, torch
import comfy.sd, comfy.utils, comfy.lora
ComfyEditableModel = import_module(pkg + ".adapters.comfy_model").ComfyEditableModel
apply_to_comfy = import_module(pkg + ".nodes.patches").apply_to_comfy
save_lora = import_module(pkg + ".files.formats").save_lora

model, clip, vae = comfy.sd.load_checkpoint_guess_config(sys.argv[1], output_vae=False, output_clip=True)[:3]
em = ComfyEditableModel(model, clip)
assert em.family == "sd1" and em.key_dim == 768 and em.max_tokens == 77

# 1. text states = what ComfyUI feeds the UNet
text = "a painting by van gogh"
ref = clip.encode_from_tokens(clip.tokenize(text))[0].float()
full, prefix = em.encode_ids([em.padded_ids(text), em.padded_ids(text)[:6]])
assert full.shape == (77, 768) and torch.allclose(full, ref, atol=1e-4), (full - ref).abs().max()
assert torch.allclose(prefix, ref[:6], atol=1e-4)

# 2. canonical names
names = list(em.cross_attention_weights())
assert len(names) == 32 and "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k" in names, names[:3]
assert "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_v" in names

# 3. the edit node: inputs untouched, clone = W0 + delta
import asyncio
ext = asyncio.run(ce.comfy_entrypoint())
NODES = {n.GET_SCHEMA().node_id: n for n in asyncio.run(ext.get_node_list())}
UCE_ERASE = dict(concepts="Van Gogh", concept_type="style", guide="", preserve="Monet", lambda_=0.5, strength=1.0)
patches_before = {k: list(v) for k, v in model.patches.items()}
clip_patches_before = dict(clip.patcher.patches)
out = NODES["ConceptEditUCEErase"].execute(model=model, clip=clip, **UCE_ERASE)
m2, c2, delta = out.args
assert model.patches == patches_before and clip.patcher.patches == clip_patches_before
assert m2 is not model and c2 is clip and len(m2.patches) == 32
s = out.ui["concept_edit"][0]
assert s["layers"] == 32 and s["residual_error"]["max"] < 0.1, s
W0 = em.weights(names)
W1 = ComfyEditableModel(m2, clip).weights(names)
for n in names:
    assert torch.allclose(W1[n] - W0[n], delta.layers[n].dense(), atol=1e-5), n

# 4. base: a LoRA on the MODEL changes W0 for "patched" but not for "original"
lora_sd = {}
for n in names[:4]:
    key = "lora_unet_" + n[len("unet."):].replace(".", "_")
    out_f, in_f = W0[n].shape
    lora_sd[key + ".lora_up.weight"] = torch.randn(out_f, 2) * 0.1
    lora_sd[key + ".lora_down.weight"] = torch.randn(2, in_f) * 0.1
ml, cl = comfy.sd.load_lora_for_models(model, clip, lora_sd, 1.0, 1.0)
Wp = ComfyEditableModel(ml, cl, base="patched").weights(names[:4])
Wo = ComfyEditableModel(ml, cl, base="original").weights(names[:4])
for n in names[:4]:
    assert torch.equal(Wo[n], W0[n]) and not torch.allclose(Wp[n], W0[n])

# 5. the saved LoRA through ComfyUI's own loader gives the same weights as the node's patches
d = tempfile.mkdtemp()
save_lora(delta, os.path.join(d, "x.safetensors"))
sd = comfy.utils.load_torch_file(os.path.join(d, "x.safetensors"))
key_map = comfy.lora.model_lora_keys_unet(model.model, {})
loaded = comfy.lora.load_lora(sd, key_map, log_missing=False)
assert len(loaded) == 32
m3, _ = comfy.sd.load_lora_for_models(model, clip, sd, 1.0, 0.0)
W3 = ComfyEditableModel(m3, clip).weights(names)
for n in names:
    assert torch.allclose(W3[n], W1[n], atol=1e-6), n

# 6. text-encoder methods: the rebuilt HF encoder reads what ComfyUI reads; the nodes patch the CLIP
text_encoder_model = import_module(pkg + ".adapters.comfy_text_encoder").text_encoder_model
te = text_encoder_model(clip, model)
assert te.family == "sd1" and te.key_dim == 768
hf = te.encode_ids([em.padded_ids(text)])[0]
assert (hf - ref).abs().max() < 0.05 * ref.abs().max(), (hf - ref).abs().max()  # ComfyUI's CLIP runs fp16 on CPU
edit_nodes = import_module(pkg + ".nodes.edit_nodes")
common = import_module(pkg + ".nodes.common")
for node_name in ("ConceptEditEMCIDErase", "ConceptEditNullspaceTEErase"):
    if node_name == "ConceptEditEMCIDErase":
        res = NODES[node_name].execute(model=model, clip=clip, concepts="Van Gogh", concept_type="style", guide="",
                                       preserve="Monet", strength=1.0)
        out = {"result": res.args, "ui": res.ui}
    else:  # same path as the node, on one layer (11 eigendecompositions of 3072x3072 are slow on a busy CPU)
        _, engine, _, options, site = edit_nodes.METHODS["nullspace_te"]
        plan = common.make_plan(common.erase_edits("Van Gogh", "style", ""), engine, ["Monet"], ["{}"],
                                {**options, "layers": [10]})
        out = edit_nodes.run_edit(model, clip, plan, site=site)
    m4, c4, d4 = out["result"]
    assert m4 is model and c4 is not clip and clip.patcher.patches == clip_patches_before, node_name
    assert d4.layers and all(k.startswith("text_encoder.") for k in d4.layers)
    assert len(c4.patcher.patches) == len(d4.layers), (node_name, len(c4.patcher.patches), len(d4.layers))
    s4 = out["ui"]["concept_edit"][0]
    assert s4["components"] == {"text_encoder": len(d4.layers)}, s4
    e_new = c4.encode_from_tokens(c4.tokenize(text))[0].float()
    assert (e_new - ref).abs().max() > 1e-3, node_name  # the concept's states moved

# 7. bad inputs are refused with a message, never patched in (ComfyUI would only log errors at sampling)
patches_mod = import_module(pkg + ".nodes.patches")
delta_mod = import_module(pkg + ".core.delta")
k_name = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
sd2_like = delta_mod.ConceptDelta({k_name: delta_mod.LayerDelta(torch.zeros(320, 1), torch.zeros(1, 1024))}, {"family": "sd2"})
try:
    patches_mod.apply_to_comfy(sd2_like, model, clip)
    raise SystemExit("an SD 2.x-shaped delta was patched into an SD 1.x model")
except patches_mod.UnloadedKeysError as e:
    assert "does not fit this model" in str(e) and "sd2" in str(e), e
for bad in (float("nan"), float("inf")):
    try:
        NODES["ConceptEditUCEErase"].execute(model=model, clip=clip, **{**UCE_ERASE, "strength": bad})
        raise SystemExit(f"strength {bad} was accepted")
    except ValueError as e:
        assert "finite" in str(e), e
print("ADAPTER OK")
'''


def test_adapter_in_real_comfyui(tmp_path):
    host.run_script(tmp_path, SCRIPT, str(host.e2e.ensure_checkpoint()), ok="ADAPTER OK")
