"""FLUX and SD3 deltas in a real ComfyUI (subprocess with ComfyUI's Python; skipped unless
COMFYUI_PATH is set): a LoRA file made on a tiny diffusers pipeline loads through ComfyUI's own
LoRA machinery (``model_lora_keys_unet`` + ``load_lora``) with every key mapped, onto ComfyUI's
own FLUX / SD3 model classes built at the same tiny shapes, and the patched weights are
W0 + delta. (The edit nodes on ComfyUI's own FLUX MODEL and CLIP objects: test_comfyui_flux.py.)
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
import torch
import comfy.lora, comfy.model_base, comfy.model_patcher, comfy.supported_models, comfy.utils
from safetensors.torch import load_file

def tiny_comfy_model(family, transformer_sd):
    """ComfyUI's own model class of the family, at the tiny pipeline's shapes, holding its weights."""
    if family == "flux":
        cfg = {"image_model": "flux", "in_channels": 4, "out_channels": 4, "vec_in_dim": 32, "context_in_dim": 48,
               "hidden_size": 32, "mlp_ratio": 4.0, "num_heads": 2, "depth": 1, "depth_single_blocks": 1,
               "axes_dim": [4, 4, 8], "theta": 10000, "qkv_bias": True, "guidance_embed": False, "patch_size": 2}
        mc = comfy.supported_models.Flux(cfg)
        names = comfy.utils.flux_to_diffusers(cfg, output_prefix="")
    else:
        cfg = {"in_channels": 4, "out_channels": 4, "patch_size": 1, "depth": 1, "num_patches": 1024,
               "pos_embed_max_size": 32, "adm_in_channels": 80, "input_size": None,
               "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": 96, "out_features": 64}}}
        mc = comfy.supported_models.SD3(cfg)
        names = comfy.utils.mmdit_to_diffusers(cfg, output_prefix="")
    mc.set_inference_dtype(torch.float32, None)
    model = mc.get_model({})
    # the readers' weights from the diffusers transformer (other weights stay random: not compared)
    sd = model.diffusion_model.state_dict()
    for diff_key, comfy_key in names.items():  # ComfyUI's maps: diffusers name -> its own
        if comfy_key in sd and diff_key in transformer_sd and sd[comfy_key].shape == transformer_sd[diff_key].shape:
            sd[comfy_key] = transformer_sd[diff_key]
    model.diffusion_model.load_state_dict(sd)
    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))

for family in ("flux", "sd3"):
    lora = load_file(os.path.join(sys.argv[1], family + ".safetensors"))
    delta = load_file(os.path.join(sys.argv[1], family + "_dense.safetensors"))
    transformer_sd = load_file(os.path.join(sys.argv[1], family + "_readers.safetensors"))
    patcher = tiny_comfy_model(family, transformer_sd)
    key_map = comfy.lora.model_lora_keys_unet(patcher.model, {})
    patches = comfy.lora.load_lora(lora, key_map, log_missing=False)
    used = {k for base in key_map for k in (base + ".lora_A.weight", base + ".lora_B.weight") if k in lora}
    assert used == set(lora), (family, sorted(set(lora) - used))
    assert len(patches) == 2, (family, list(patches))
    clone = patcher.clone()
    assert len(clone.add_patches(patches, 1.0)) == 2
    clone.patch_model()
    sd = clone.model.diffusion_model.state_dict()
    where = {"flux": {"transformer.context_embedder": "txt_in.weight",
                      "transformer.time_text_embed.text_embedder.linear_1": "vector_in.in_layer.weight"},
             "sd3": {"transformer.context_embedder": "context_embedder.weight",
                     "transformer.time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0.weight"}}[family]
    for name, key in where.items():
        w0 = transformer_sd[name[len("transformer."):] + ".weight"]
        assert torch.allclose(sd[key] - w0, delta[name], atol=1e-5), (family, name, (sd[key] - w0 - delta[name]).abs().max())
    clone.unpatch_model()
    print(family, "ok")
print("MMDIT OK")
'''


def test_mmdit_lora_files_load_in_comfyui(tmp_path):
    from concept_edit.adapters.mmdit_model import MMDiTModel
    from concept_edit.core.plan import plan_from_dict
    from concept_edit.engines.registry import compute_delta
    from concept_edit.files.formats import save_lora
    from concept_edit.testing.tiny_models import build_tiny_mmdit_pipeline
    from safetensors.torch import save_file

    for family in ("flux", "sd3"):
        pipe = build_tiny_mmdit_pipeline(family)
        m = MMDiTModel(pipe, max_sequence_length=32)
        plan = plan_from_dict({"edits": [{"erase": "Van Gogh", "guide": "art"}], "preserve": ["Monet"]})
        delta = compute_delta(m, plan, progress=False)
        save_lora(delta, tmp_path / f"{family}.safetensors")
        save_file({n: ld.dense().contiguous() for n, ld in delta.layers.items()}, str(tmp_path / f"{family}_dense.safetensors"))
        save_file({k: v.detach().clone().contiguous() for k, v in pipe.transformer.state_dict().items()
                   if k.startswith(("context_embedder", "time_text_embed.text_embedder"))},
                  str(tmp_path / f"{family}_readers.safetensors"))
    host.run_script(tmp_path, SCRIPT, str(tmp_path), timeout=900, ok="MMDIT OK")
