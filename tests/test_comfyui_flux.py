"""The UCE edit nodes on ComfyUI's own FLUX.1 MODEL and CLIP objects, inside a real ComfyUI (a
subprocess with ComfyUI's Python, no server). Skipped unless COMFYUI_PATH is set.

The checkpoint is the smallest FLUX ComfyUI still detects (``comfyui_checkpoints.py flux``: one
double block at the fixed width 3072, CLIP-L, and T5 at XXL's width 4096 with one layer, which
ComfyUI builds from its ``te_model_options``; random float16 weights, 1.3 GB, cached in
``$COMFYUI_TEST_CACHE``), loaded by ComfyUI's ``load_checkpoint_guess_config``.

Checks: the adapter's token layout equals ``clip.tokenize``; its keys (ComfyUI's T5 states at 256
rows and CLIP-L pooled, through ``encode_from_tokens``) equal those the diffusers adapter computes
on a FluxPipeline holding the same weights and tokenizers at ``max_sequence_length=256``, and so do
the deltas; every UCE node (erase, replace, moderate, debias) patches exactly ``txt_in`` and
``vector_in.in_layer`` of a MODEL clone by the delta, leaves its inputs and the CLIP untouched;
``layers: v`` is refused with a message, and so are the RECE, SPEED and EMCID nodes; the saved LoRA loads through ComfyUI's loader with every
key used; a 1-step sample of the edited model is finite and differs from the unedited one's.
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
import asyncio, copy, logging, tempfile, torch
import comfy.sd, comfy.utils, comfy.sample
from safetensors import safe_open
sys.path.insert(0, os.path.join(ce_root, "tests"))
import comfyui_checkpoints as ck

model, clip = comfy.sd.load_checkpoint_guess_config(sys.argv[1], output_vae=False, te_model_options=ck.FLUX_TE_OPTIONS)[:2]
assert type(model.model.model_config).__name__ == "FluxSchnell", type(model.model.model_config).__name__
assert type(clip.cond_stage_model).__name__.startswith("FluxClipModel"), type(clip.cond_stage_model)
cm = import_module(pkg + ".adapters.comfy_mmdit")
em = cm.ComfyMMDiTModel(model, clip)
assert em.family == "flux" and em.key_dim == 4096 and em.max_sequence_length == 256 and em.max_tokens == 77

# 1. the token layout is ComfyUI's own
for text in ("a painting by Van Gogh", "", "a photo of a cat, 16:9"):
    ours, theirs = em.tokens(text), clip.tokenize(text)
    assert set(ours) == set(theirs) == {"l", "t5xxl"}, (set(ours), set(theirs))
    for s in ours:
        assert [[t for t, _ in r] for r in ours[s]] == [[t for t, _ in r] for r in theirs[s]], (text, s)
assert em.tokens("(cat:1.5)")["l"][0][1:6] != clip.tokenize("(cat:1.5)")["l"][0][1:6]  # no prompt syntax: the characters

# 2. keys = ComfyUI's encoding = the diffusers adapter's on the same weights and tokenizers
TEXTS = ["a painting by Van Gogh", "art", "", "a photo of a cat"]
enc = em.encode(TEXTS)
for t in TEXTS:
    cond, pooled = clip.encode_from_tokens(clip.tokenize(t), return_pooled=True)
    assert torch.equal(enc[t][0], cond[0].float()) and torch.equal(enc[t][1], pooled[0].float()), t
    assert enc[t][0].shape == (256, 4096) and enc[t][1].shape == (768,)

from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from transformers import CLIPTextConfig, CLIPTextModel, T5EncoderModel
with safe_open(sys.argv[1], "pt") as f:
    def part(prefix):
        return {k[len(prefix):]: f.get_tensor(k).float() for k in f.keys() if k.startswith(prefix)}
    clip_sd, t5_sd, dm = part("text_encoders.clip_l.transformer."), part("text_encoders.t5xxl.transformer."), \
        part("model.diffusion_model.")
te = CLIPTextModel(CLIPTextConfig(**ck.CLIP_L))
getattr(te, "text_model", te).load_state_dict({k[len("text_model."):]: v for k, v in clip_sd.items()}, strict=False)
t5 = T5EncoderModel(ck.t5_config(**ck.TINY_T5))
missing, unexpected = t5.load_state_dict(t5_sd, strict=False)
assert not unexpected and set(missing) <= {"encoder.embed_tokens.weight"}, (missing, unexpected)
with torch.device("meta"):  # only the two readers are read; the rest stays unallocated
    tr = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=0, attention_head_dim=128,
                                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                                guidance_embeds=False, axes_dims_rope=(16, 56, 56))
for mod, src in ((tr.context_embedder, "txt_in"), (tr.time_text_embed.text_embedder.linear_1, "vector_in.in_layer")):
    mod.weight = torch.nn.Parameter(dm[src + ".weight"], requires_grad=False)
    mod.bias = torch.nn.Parameter(dm[src + ".bias"], requires_grad=False)
tok_l = copy.deepcopy(clip.tokenizer.clip_l.tokenizer)
tok_l.model_max_length = 77  # ComfyUI's copy says 8192; diffusers pads CLIP to model_max_length
pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=te.eval(), tokenizer=tok_l,
                    text_encoder_2=t5.eval(), tokenizer_2=copy.deepcopy(clip.tokenizer.t5xxl.tokenizer), transformer=tr)
MMDiTModel = import_module(pkg + ".adapters.mmdit_model").MMDiTModel
dm_em = MMDiTModel(pipe, max_sequence_length=256)
ref = dm_em.encode(TEXTS)
for t in TEXTS:
    for i in (0, 1):
        a, b = enc[t][i], ref[t][i]
        assert (a - b).abs().max() <= 1e-4 * b.abs().max(), (t, i, (a - b).abs().max().item(), b.abs().max().item())
# diffusers' own default (512 T5 rows) gives other states: T5 runs unmasked, so the padding length matters
s512 = MMDiTModel(pipe, max_sequence_length=512).encode(TEXTS[:1])[TEXTS[0]][0][:256]
assert (s512 - ref[TEXTS[0]][0]).abs().max() > 1e-2 * ref[TEXTS[0]][0].abs().max()

common = import_module(pkg + ".nodes.common")
compute_delta = import_module(pkg + ".engines.registry").compute_delta
plan = common.make_plan(common.erase_edits("Van Gogh", "style", "") + common.replace_edits("cat -> dog"), "uce",
                        ["Monet"], ["{}", "a painting by {}"], {"lambda": 0.5, "token": "aligned"})
d_comfy, d_diff = compute_delta(em, plan, progress=False), compute_delta(dm_em, plan, progress=False)
assert set(d_comfy.layers) == set(d_diff.layers) == {"transformer.context_embedder",
                                                      "transformer.time_text_embed.text_embedder.linear_1"}
for n in d_comfy.layers:
    a, b = d_comfy.layers[n].dense(), d_diff.layers[n].dense()
    assert (a - b).abs().max() <= 1e-3 * b.abs().max(), (n, (a - b).abs().max().item(), b.abs().max().item())
assert d_comfy.metadata["max_sequence_length"] == 256 and d_comfy.metadata["family"] == "flux"

# 3. every UCE node on the FLUX MODEL and CLIP
ext = asyncio.run(ce.comfy_entrypoint())
NODES = {n.GET_SCHEMA().node_id: n for n in asyncio.run(ext.get_node_list())}
KEYS = {"transformer.context_embedder": "diffusion_model.txt_in.weight",
        "transformer.time_text_embed.text_embedder.linear_1": "diffusion_model.vector_in.in_layer.weight"}
W0 = em.weights(list(KEYS))
patches_before = {k: list(v) for k, v in model.patches.items()}
clip_patches_before = dict(clip.patcher.patches)
KINDS = {
    "ConceptEditUCEErase": dict(concepts="Van Gogh", concept_type="style", guide="", preserve="Monet", lambda_=0.5),
    "ConceptEditUCEReplace": dict(replacements="cat -> dog", preserve="", lambda_=0.5, token="aligned"),
    "ConceptEditUCEModerate": dict(concepts="gore", moderation=0.8, preserve="", lambda_=0.5),
    "ConceptEditUCEDebias": dict(concepts="doctor", attributes="male, female", ratios="0.5, 0.5", alphas="", preserve="",
                                 lambda_=0.5),
}
outs = {}
for node_id, kw in KINDS.items():
    out = NODES[node_id].execute(model=model, clip=clip, strength=1.0, **kw)
    m2, c2, delta = out.args
    assert model.patches == patches_before and clip.patcher.patches == clip_patches_before, node_id  # inputs untouched
    assert m2 is not model and c2 is clip, node_id  # the CLIP is not edited: returned as given
    assert set(m2.patches) == set(KEYS.values()), (node_id, sorted(m2.patches))
    s = out.ui["concept_edit"][0]
    assert s["family"] == "flux" and s["layers"] == 2 and s["components"] == {"transformer": 2}, (node_id, s)
    W1 = cm.ComfyMMDiTModel(m2, clip).weights(list(KEYS))
    for n in KEYS:
        assert torch.allclose(W1[n] - W0[n], delta.layers[n].dense(), atol=1e-5 * W0[n].abs().max().item()), (node_id, n)
    outs[node_id] = out.args
print("nodes ok")

# a widget that has no meaning here is refused, naming it
try:
    NODES["ConceptEditUCEErase"].execute(model=model, clip=clip, strength=1.0, layers="v", **KINDS["ConceptEditUCEErase"])
    raise SystemExit("layers 'v' was accepted on FLUX")
except ValueError as e:
    assert "'layers'" in str(e) and "readers" in str(e), e

# the nodes of methods that have no FLUX form refuse it with a message
for node_id, kw, msg in (("ConceptEditRECEErase", dict(KINDS["ConceptEditUCEErase"]), "does not support flux"),
                         ("ConceptEditSPEEDErase", {k: v for k, v in KINDS["ConceptEditUCEErase"].items() if k != "lambda_"},
                          "does not support flux"),
                         ("ConceptEditEMCIDErase", {k: v for k, v in KINDS["ConceptEditUCEErase"].items() if k != "lambda_"},
                          "edited with the UCE nodes")):
    try:
        NODES[node_id].execute(model=model, clip=clip, strength=1.0, **kw)
        raise SystemExit(f"{node_id} ran on FLUX")
    except ValueError as e:
        assert msg in str(e), (node_id, e)

# base: a LoRA on the MODEL is included (patched) or not (original)
m2, _, delta = outs["ConceptEditUCEErase"]
Wp = cm.ComfyMMDiTModel(m2, clip, base="patched").weights(list(KEYS))
Wo = cm.ComfyMMDiTModel(m2, clip, base="original").weights(list(KEYS))
assert all(torch.equal(Wo[n], W0[n]) and not torch.equal(Wp[n], W0[n]) for n in KEYS)

# 4. the delta saved as a LoRA loads through ComfyUI's own loader with every key used, same weights
save_lora = import_module(pkg + ".files.formats").save_lora
path = os.path.join(tempfile.mkdtemp(), "flux_delta.safetensors")
save_lora(delta, path)
logged = []
h = logging.Handler(logging.WARNING)
h.emit = lambda r: logged.append(r.getMessage())
logging.getLogger().addHandler(h)
m3, _ = comfy.sd.load_lora_for_models(model, clip, comfy.utils.load_torch_file(path), 1.0, 1.0)
logging.getLogger().removeHandler(h)
assert not [m for m in logged if "lora key not loaded" in m or "NOT LOADED" in m], logged[:3]
W3 = cm.ComfyMMDiTModel(m3, clip).weights(list(KEYS))
assert all(torch.allclose(W3[n], Wp[n], atol=1e-6 * Wp[n].abs().max().item()) for n in KEYS)

# 5. a 1-step sample: finite, and the erased concept's prompt samples differently
pos, pooled = clip.encode_from_tokens(clip.tokenize("a painting by Van Gogh"), return_pooled=True)
latent = torch.zeros(1, 16, 8, 8)
def sample(m):
    return comfy.sample.sample(m, comfy.sample.prepare_noise(latent, 0), 1, 1.0, "euler", "simple",
                               [[pos, {"pooled_output": pooled, "guidance": 3.5}]], [[pos, {"pooled_output": pooled}]],
                               latent, seed=0, disable_pbar=True)
x0, x1 = sample(model), sample(m2)
assert x1.shape == latent.shape and torch.isfinite(x1).all(), x1
assert (x1 - x0).abs().max() > 1e-4, (x1 - x0).abs().max()
print("FLUX OK")
'''


def test_uce_nodes_on_comfyui_flux(tmp_path):
    host.run_script(tmp_path, SCRIPT, str(host.family_checkpoint("flux")), timeout=2400, ok="FLUX OK")
