"""The UCE edit nodes on ComfyUI's own SD3.x objects, inside a real ComfyUI (a subprocess with
ComfyUI's Python, no server). Skipped unless COMFYUI_PATH is set.

No checkpoint file: ComfyUI's SD3 model class (``supported_models.SD3``, one joint block of width
64, which its detection would also give a file of that shape) and its SD3 CLIP (``SD3ClipModel``
with ``SD3Tokenizer``, built by ``comfy.sd.CLIP`` as its loaders build it) are made in-process,
the text encoders narrowed through ComfyUI's own ``te_model_options`` (T5 keeps XXL's width 4096,
to which ComfyUI pads the CLIP states) and given random weights, rounded to float16 as ComfyUI
stores them. The same weights go into a diffusers StableDiffusion3Pipeline with the same tokenizers
(CLIP-L's projection is the identity: ComfyUI's SD3 reads CLIP-L's pooled vector unprojected).

Checks: the adapter's token layout equals ``clip.tokenize``; its keys ([CLIP-L ‖ CLIP-G
penultimate, padded to 4096 ; T5] at ComfyUI's 77 + 77 rows, and the pooled vector) equal the
diffusers adapter's at ``max_sequence_length=77``, and so do the deltas (both token choices);
the UCE node patches exactly ``context_embedder`` and ``y_embedder.mlp.0`` of a MODEL clone by the
delta and leaves its inputs untouched; a CLIP without T5 is refused with a message.
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
import asyncio, copy, torch
import comfy.model_patcher, comfy.sd, comfy.supported_models, comfy.supported_models_base
import comfy.text_encoders.sd3_clip as sd3_clip
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5EncoderModel
sys.path.insert(0, os.path.join(ce_root, "tests"))
import comfyui_checkpoints as ck
torch.manual_seed(0)

CLIP_L = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2, "num_hidden_layers": 3}
CLIP_G = {"hidden_size": 96, "intermediate_size": 192, "num_attention_heads": 2, "num_hidden_layers": 3}
TE_OPTIONS = {"clip_l_model_config": CLIP_L, "clip_g_model_config": CLIP_G, "t5xxl_model_config": ck.TINY_T5}

def hf_clip(over, act):
    cfg = CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, hidden_act=act, bos_token_id=49406,
                         eos_token_id=49407, projection_dim=over["hidden_size"], **over)
    m = CLIPTextModelWithProjection(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(p.half().float())  # ComfyUI stores them in float16
    return m

te_l, te_g = hf_clip(CLIP_L, "quick_gelu"), hf_clip(CLIP_G, "gelu")
with torch.no_grad():
    te_l.text_projection.weight.copy_(torch.eye(64))
t5 = T5EncoderModel(ck.t5_config(**ck.TINY_T5)).eval()
with torch.no_grad():
    for p in t5.parameters():
        p.copy_(p.half().float())

def comfy_names(m, prefix):
    out = {}
    for k, v in m.state_dict().items():
        if "position_ids" in k or k == "encoder.embed_tokens.weight":
            continue
        if prefix != "t5xxl" and not k.startswith(("text_model.", "text_projection")):
            k = "text_model." + k
        out[f"{prefix}.transformer.{k}"] = v
    return out

target = comfy.supported_models_base.ClipTarget(sd3_clip.SD3Tokenizer, sd3_clip.sd3_clip(dtype_t5=torch.float16))
clip = comfy.sd.CLIP(target, model_options=TE_OPTIONS)
missing, unexpected = clip.load_sd({**comfy_names(te_l, "clip_l"), **comfy_names(te_g, "clip_g"), **comfy_names(t5, "t5xxl")},
                                   full_model=True)
assert not unexpected and not [m for m in missing if "logit_scale" not in m], (missing, unexpected)

cfg = {"in_channels": 16, "out_channels": 16, "patch_size": 2, "depth": 1, "num_patches": 1024, "pos_embed_max_size": 32,
       "adm_in_channels": 160, "input_size": None,
       "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": 64}}}
mc = comfy.supported_models.SD3(cfg)
mc.set_inference_dtype(torch.float32, None)
model = comfy.model_patcher.ModelPatcher(mc.get_model({}), load_device=torch.device("cpu"), offload_device=torch.device("cpu"))
with torch.no_grad():
    for p in model.model.diffusion_model.parameters():
        p.copy_(torch.randn_like(p) * 0.05)

cm = import_module(pkg + ".adapters.comfy_mmdit")
em = cm.ComfyMMDiTModel(model, clip)
assert em.family == "sd3" and em.key_dim == 4096 and em.max_tokens == 77 and em.max_sequence_length == 77

# 1. ComfyUI's token layout
for text in ("a painting by Van Gogh", "", "a photo of a cat, 16:9"):
    ours, theirs = em.tokens(text), clip.tokenize(text)
    assert set(ours) == set(theirs) == {"l", "g", "t5xxl"}, (set(ours), set(theirs))
    for s in ours:
        assert [[t for t, _ in r] for r in ours[s]] == [[t for t, _ in r] for r in theirs[s]], (text, s)

# 2. keys and deltas = the diffusers adapter's on the same weights and tokenizers
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
TEXTS = ["a painting by Van Gogh", "art", "", "a photo of a cat"]
enc = em.encode(TEXTS)
for t in TEXTS:
    cond, pooled = clip.encode_from_tokens(clip.tokenize(t), return_pooled=True)
    assert torch.equal(enc[t][0], cond[0].float()) and enc[t][0].shape == (154, 4096) and enc[t][1].shape == (160,)
with torch.device("meta"):
    tr = SD3Transformer2DModel(sample_size=32, patch_size=2, in_channels=16, num_layers=1, attention_head_dim=64,
                               num_attention_heads=1, joint_attention_dim=4096, caption_projection_dim=64,
                               pooled_projection_dim=160, out_channels=16, pos_embed_max_size=32)
dm = model.model.diffusion_model.state_dict()
for mod, src in ((tr.context_embedder, "context_embedder"), (tr.time_text_embed.text_embedder.linear_1, "y_embedder.mlp.0")):
    mod.weight = torch.nn.Parameter(dm[src + ".weight"].float().clone(), requires_grad=False)
    mod.bias = torch.nn.Parameter(dm[src + ".bias"].float().clone(), requires_grad=False)
tok_l, tok_g = copy.deepcopy(clip.tokenizer.clip_l.tokenizer), copy.deepcopy(clip.tokenizer.clip_g.tokenizer)
tok_l.model_max_length = tok_g.model_max_length = 77
tok_g.pad_token = tok_g.convert_ids_to_tokens(0)  # ComfyUI pads CLIP-G with token 0, as SD3's own tokenizer_2
pipe = StableDiffusion3Pipeline(transformer=tr, scheduler=FlowMatchEulerDiscreteScheduler(), vae=None,
                                text_encoder=te_l, tokenizer=tok_l, text_encoder_2=te_g, tokenizer_2=tok_g,
                                text_encoder_3=t5, tokenizer_3=copy.deepcopy(clip.tokenizer.t5xxl.tokenizer))
MMDiTModel = import_module(pkg + ".adapters.mmdit_model").MMDiTModel
dm_em = MMDiTModel(pipe, max_sequence_length=77)
ref = dm_em.encode(TEXTS)
for t in TEXTS:
    for i in (0, 1):
        a, b = enc[t][i], ref[t][i]
        assert a.shape == b.shape and (a - b).abs().max() <= 1e-4 * b.abs().max(), (t, i, (a - b).abs().max().item())

common = import_module(pkg + ".nodes.common")
compute_delta = import_module(pkg + ".engines.registry").compute_delta
for token in ("last", "aligned"):
    plan = common.make_plan(common.erase_edits("Van Gogh", "style", "") + common.replace_edits("cat -> dog"), "uce",
                            ["Monet"], ["{}", "a painting by {}"], {"lambda": 0.5, "token": token})
    d_comfy, d_diff = compute_delta(em, plan, progress=False), compute_delta(dm_em, plan, progress=False)
    assert set(d_comfy.layers) == set(d_diff.layers) == {"transformer.context_embedder",
                                                          "transformer.time_text_embed.text_embedder.linear_1"}
    for n in d_comfy.layers:
        a, b = d_comfy.layers[n].dense(), d_diff.layers[n].dense()
        assert (a - b).abs().max() <= 1e-3 * b.abs().max(), (token, n, (a - b).abs().max().item(), b.abs().max().item())

# 3. the UCE node on the SD3 MODEL and CLIP
ext = asyncio.run(ce.comfy_entrypoint())
NODES = {n.GET_SCHEMA().node_id: n for n in asyncio.run(ext.get_node_list())}
KEYS = {"transformer.context_embedder": "diffusion_model.context_embedder.weight",
        "transformer.time_text_embed.text_embedder.linear_1": "diffusion_model.y_embedder.mlp.0.weight"}
W0 = em.weights(list(KEYS))
clip_patches_before = dict(clip.patcher.patches)
out = NODES["ConceptEditUCEErase"].execute(model=model, clip=clip, concepts="Van Gogh", concept_type="style", guide="",
                                           preserve="Monet", lambda_=0.5, strength=1.0)
m2, c2, delta = out.args
assert not model.patches and clip.patcher.patches == clip_patches_before and c2 is clip
assert set(m2.patches) == set(KEYS.values()), sorted(m2.patches)
assert out.ui["concept_edit"][0]["family"] == "sd3"
W1 = cm.ComfyMMDiTModel(m2, clip).weights(list(KEYS))
for n in KEYS:
    assert torch.allclose(W1[n] - W0[n], delta.layers[n].dense(), atol=1e-5 * W0[n].abs().max().item()), n

# 4. a CLIP without T5 (an SD3 checkpoint without it) is refused, naming what is missing
target2 = comfy.supported_models_base.ClipTarget(sd3_clip.SD3Tokenizer, sd3_clip.sd3_clip(t5=False))
clip2 = comfy.sd.CLIP(target2, model_options=TE_OPTIONS)
try:
    cm.ComfyMMDiTModel(model, clip2)
    raise SystemExit("an SD3 CLIP without T5 was accepted")
except ValueError as e:
    assert "t5xxl" in str(e), e
print("SD3 OK")
'''


def test_uce_node_on_comfyui_sd3(tmp_path):
    host.run_script(tmp_path, SCRIPT, timeout=1800, ok="SD3 OK")
