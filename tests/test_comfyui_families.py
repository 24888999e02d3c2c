"""SD 2.x and SDXL inside a real ComfyUI (in a subprocess with ComfyUI's Python, no server), on
random-weight checkpoints at the real architectures (``comfyui_checkpoints.py``, cached in
$COMFYUI_TEST_CACHE; SDXL's UNet loaded in float16, 5 GB instead of 10). Skipped unless COMFYUI_PATH is set.

UCE (``run_edit`` at the UNet site): ComfyUI detects the model (SD20 / SDXL); the adapter's family,
key width and text states (= ``clip.encode_from_tokens``: SD 2.x clip_h penultimate, SDXL
clip_l ‖ clip_g); exactly the cross-attention to_k/to_v are patched (32 / 140); the clone's
effective weights are W0 + delta; inputs untouched; the saved LoRA loads through ComfyUI's
``load_lora_for_models`` with no key left over and gives the same weights; a 1-step 64x64 sample
with the edited model is finite; a delta made on an SD 1.x model is refused.

Text-encoder methods (EMCID and the null-space text-encoder site, on one layer per encoder to
keep the CPU time bounded): the rebuilt transformers encoders read the states ComfyUI feeds the
UNet; CLIPSetLastLayer at the family's default is accepted, another layer or a masked CLIP refused; the CLIP
clone is patched with exactly the delta's layers (SDXL: EMCID on both encoders), W0 + delta, inputs
untouched; the erased concept's state moves and a preserved one's barely; the delta saved as
a LoRA loads through ComfyUI (kohya ``lora_te_`` on clip_h, ``lora_te1_``/``lora_te2_`` on SDXL).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("ce_comfyui_host", Path(__file__).resolve().parent / "comfyui_host.py")
host = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(host)

pytestmark = pytest.mark.skipif(host.comfy_path() is None, reason=host.SKIP_REASON)

COMMON = r'''
import logging, tempfile, torch
import comfy.sd, comfy.utils
FAM, CK = sys.argv[1], sys.argv[2]
CONFIG, KEY_DIM, N_XATTN = {"sd2": ("SD20", 1024, 32), "sdxl": ("SDXL", 2048, 140)}[FAM]
# SDXL's UNet in float16 (ComfyUI's --fp16-unet): 5 GB where ComfyUI's CPU default, float32, takes 10
opts = {"dtype": torch.float16} if FAM == "sdxl" else {}
model, clip = comfy.sd.load_checkpoint_guess_config(CK, output_vae=False, model_options=opts)[:2]
assert type(model.model.model_config).__name__ == CONFIG, type(model.model.model_config).__name__
ComfyEditableModel = import_module(pkg + ".adapters.comfy_model").ComfyEditableModel
run_edit = import_module(pkg + ".nodes.edit_nodes").run_edit
METHODS = import_module(pkg + ".nodes.edit_nodes").METHODS
common = import_module(pkg + ".nodes.common")
save_lora = import_module(pkg + ".files.formats").save_lora
em = ComfyEditableModel(model, clip)
assert em.family == FAM and em.key_dim == KEY_DIM and em.max_tokens == 77, (em.family, em.key_dim)
TEXT = "a painting by van gogh"


def states(c, text):
    return c.encode_from_tokens(c.tokenize(text))[0].float()


def warnings_of(fn, *args):
    """(fn(*args), the warnings ComfyUI logged meanwhile)."""
    got = []
    h = logging.Handler(logging.WARNING)
    h.emit = lambda r: got.append(r.getMessage())
    logging.getLogger().addHandler(h)
    try:
        return fn(*args), got
    finally:
        logging.getLogger().removeHandler(h)


def lora_round_trip(delta, strength_model, strength_clip):
    """The delta saved as a LoRA file and loaded by ComfyUI's own loader: (model, clip)."""
    path = os.path.join(tempfile.mkdtemp(), "delta.safetensors")
    save_lora(delta, path)
    out, logged = warnings_of(comfy.sd.load_lora_for_models, model, clip, comfy.utils.load_torch_file(path),
                              strength_model, strength_clip)
    assert not [m for m in logged if "lora key not loaded" in m or "NOT LOADED" in m], logged[:3]
    return out


def check_patched(clone_em, patches, delta, names):
    """A clone (seen through ``clone_em``) carries exactly the delta's layers (``patches``: its
    patch dict) and its effective weights are W0 + delta; returns them."""
    assert set(patches) == {em.comfy_key(n)[1] for n in names}, (len(patches), len(names))
    W0, W1 = em.weights(names), clone_em.weights(names)
    for n in names:
        assert torch.allclose(W1[n] - W0[n], delta.layers[n].dense(), atol=1e-5), n
    return W1
'''

UCE = COMMON + r'''
# 1. the adapter's states are what ComfyUI feeds the UNet; SDXL: clip_l's 768 columns, then clip_g's
ref = states(clip, TEXT)
full, prefix = em.encode_ids([em.padded_ids(TEXT), em.padded_ids(TEXT)[:6]])
assert full.shape == (77, KEY_DIM) and torch.allclose(full, ref, atol=1e-4), (full - ref).abs().max()
assert torch.allclose(prefix, ref[:6], atol=1e-4)
if FAM == "sdxl":
    l_out = clip.cond_stage_model.clip_l.encode_token_weights(clip.tokenize(TEXT)["l"])[0][0].float()
    assert l_out.shape == (77, 768) and torch.equal(ref[:, :768], l_out)

# 2. UCE through run_edit: exactly the cross-attention layers, clone = W0 + delta, inputs untouched
names = list(em.cross_attention_weights())
assert len(names) == N_XATTN and all(n.endswith(("attn2.to_k", "attn2.to_v")) for n in names), len(names)
plan = common.make_plan(common.erase_edits("Van Gogh", "style", ""), "uce", ["Monet"], ["{}"], {})
patches_before, clip_patches_before = {k: list(v) for k, v in model.patches.items()}, dict(clip.patcher.patches)
out = run_edit(model, clip, plan, site="unet")
m2, c2, delta = out["result"]
assert model.patches == patches_before and clip.patcher.patches == clip_patches_before
assert m2 is not model and c2 is clip and sorted(delta.layers) == sorted(names)
s = out["ui"]["concept_edit"][0]
assert s["family"] == FAM and s["layers"] == N_XATTN and s["residual_error"]["max"] < 0.1, s
W1 = check_patched(ComfyEditableModel(m2, clip), m2.patches, delta, names)

# 3. the saved LoRA through ComfyUI's LoraLoader path: every key loads, same weights
m3, _ = lora_round_trip(delta, 1.0, 0.0)
assert set(m3.patches) == set(m2.patches)
W3 = ComfyEditableModel(m3, clip).weights(names)
for n in names:
    assert torch.allclose(W3[n], W1[n], atol=1e-6), n

# 4. a 1-step 64x64 sample with the edited model
import comfy.sample
pos, pooled = clip.encode_from_tokens(clip.tokenize(TEXT), return_pooled=True)
neg, npooled = clip.encode_from_tokens(clip.tokenize(""), return_pooled=True)
latent = torch.zeros(1, 4, 8, 8)
x = comfy.sample.sample(m2, comfy.sample.prepare_noise(latent, 0), 1, 7.0, "euler", "normal",
                        [[pos, {"pooled_output": pooled}]], [[neg, {"pooled_output": npooled}]], latent, seed=0,
                        disable_pbar=True)
assert x.shape == latent.shape and torch.isfinite(x).all(), x

# 5. a delta made on an SD 1.x model (same layer names, 768-wide keys) is refused, not patched in
#    (ComfyUI would only log shape errors at sampling and draw the unedited model)
patches_mod = import_module(pkg + ".nodes.patches")
delta_mod = import_module(pkg + ".core.delta")
k_name = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
out_f = em.weights([k_name])[k_name].shape[0]
sd1_delta = delta_mod.ConceptDelta({k_name: delta_mod.LayerDelta(torch.zeros(out_f, 1), torch.zeros(1, 768))}, {"family": "sd1"})
try:
    patches_mod.apply_to_comfy(sd1_delta, model, clip)
    raise SystemExit("an SD 1.x delta was patched into an " + FAM + " model")
except patches_mod.UnloadedKeysError as e:
    assert "does not fit this model" in str(e) and "sd1" in str(e), e
print("OK")
'''

TEXT_ENCODER = COMMON + r'''
tem = import_module(pkg + ".adapters.comfy_text_encoder")
ComfyModelError = import_module(pkg + ".adapters.comfy_model").ComfyModelError
MONET = "a painting by monet"
ref = {t: states(clip, t) for t in (TEXT, MONET)}  # each ComfyUI encoding of SDXL costs seconds on a CPU

# 5. the rebuilt transformers encoders read the states ComfyUI feeds the UNet (ComfyUI computes
# in float32 from its float16 weights; the rebuilt ones hold float32 copies of those)
te = tem.text_encoder_model(clip, model)
assert te.family == FAM and te.key_dim == KEY_DIM
for t, x in ref.items():
    hf = te.encode_ids([te.padded_ids(t)])[0]
    assert hf.shape == x.shape and (hf - x).abs().max() < 1e-4, (t, (hf - x).abs().max())
del te

# 6. CLIPSetLastLayer: the family's default (-2) is what ComfyUI reads anyway; -1 is another layer, refused
at_default, at_last = clip.clone(), clip.clone()
at_default.clip_layer(-2)
at_last.clip_layer(-1)
assert torch.equal(states(at_default, TEXT), ref[TEXT])
for s in em._streams:
    enc = getattr(clip.cond_stage_model, "clip_" + s)
    assert tem.comfy_read(enc, -2) == tem.comfy_read(enc, None) != tem.comfy_read(enc, -1)
try:
    tem.text_encoder_model(at_last, model)
    raise SystemExit("CLIPSetLastLayer(-1) was accepted")
except ComfyModelError as e:
    assert "CLIPSetLastLayer(-1)" in str(e) and "(or set it to -2)" in str(e), e
# a CLIP ComfyUI would encode with an attention mask (positions after EOS differ) is refused too
enc = getattr(clip.cond_stage_model, "clip_" + em._streams[0])
enc.enable_attention_masks = True
try:
    tem.text_encoder_model(clip, model)
    raise SystemExit("a masked CLIP was accepted")
except ComfyModelError as e:
    assert "do not reproduce" in str(e), e
finally:
    enc.enable_attention_masks = False

# 7. EMCID and the null-space TE site through run_edit, on one layer per encoder. SDXL: EMCID edits
# both encoders; the null-space engine clip_l only (its projector is an eigendecomposition of the
# fc2 input width, 5120 on clip_g: minutes on two cores; the clip_g mapping is EMCID's to check)
LAYERS = {"sd2": {"emcid": [21], "nullspace_te": [21]},
          "sdxl": {"emcid": {"text_encoder": [9], "text_encoder_2": [29]}, "nullspace_te": {"text_encoder": [9]}}}[FAM]
clip_patches_before = dict(clip.patcher.patches)
for key, layers in LAYERS.items():
    _, engine, _, options, site = METHODS[key]
    plan = common.make_plan(common.erase_edits("Van Gogh", "style", ""), engine, ["Monet"], ["a painting by {}"],
                            {**options, "layers": layers})
    out = run_edit(model, clip, plan, site=site)
    m4, c4, d4 = out["result"]
    assert m4 is model and c4 is not clip and clip.patcher.patches == clip_patches_before, key
    names, comps = sorted(d4.layers), sorted(layers) if isinstance(layers, dict) else ["text_encoder"]
    assert sorted({n.split(".")[0] for n in names}) == comps and len(names) == len(comps), (key, names)
    assert out["ui"]["concept_edit"][0]["components"] == {c: 1 for c in comps}, out["ui"]
    W4 = check_patched(ComfyEditableModel(model, c4), c4.patcher.patches, d4, names)
    # the erased concept's state (at its last token) moves, the preserved one's barely
    moved = {}
    for t, x in ref.items():
        i = len(em.token_ids(t))  # BOS is position 0
        moved[t] = ((states(c4, t)[i] - x[i]).norm() / x[i].norm()).item()
    print(key, moved)
    assert moved[TEXT] > 0.05 and moved[MONET] < 0.1 * moved[TEXT], (key, moved)
    _, c5 = lora_round_trip(d4, 0.0, 1.0)
    W5 = ComfyEditableModel(model, c5).weights(names)
    for n in names:
        assert torch.allclose(W5[n], W4[n], atol=1e-6), (key, n)
print("OK")
'''


@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_uce(tmp_path, family):
    host.run_script(tmp_path, UCE, family, str(host.family_checkpoint(family)))


@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_text_encoder_methods(tmp_path, family):
    print(host.run_script(tmp_path, TEXT_ENCODER, family, str(host.family_checkpoint(family))))
