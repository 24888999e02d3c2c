"""Random-weight SD 2.x and SDXL checkpoints at the real architectures, for the real-ComfyUI tests.

Run in ComfyUI's Python (it needs diffusers, transformers and ComfyUI)::

    python tests/comfyui_checkpoints.py sd2|sdxl|flux OUT.safetensors

Why not ComfyUI's diffusers loader + ``save_checkpoint`` (what the SD 1.5 test checkpoint uses):
that holds the whole model in memory, twice while saving, and SDXL's UNet alone is 2.6 B
parameters (10 GB in float32). Here no module is ever materialised: the components are built on
the meta device (for their keys and shapes), each tensor of the original single-file layout
(``adapters/ldm_keymap``: the names A1111/ComfyUI/civitai use) is drawn on its own, stored as
float16 and streamed to disk (``adapters/safetensors_stream``), so memory stays at one tensor.

The file is then loaded with ComfyUI's own ``load_checkpoint_guess_config``, which must detect
the architecture (model config ``SD20`` / ``SDXL``) and load every tensor with none missing or
left over (an independent check of the key maps), before it is renamed into place.

Weights: norms 1 and biases 0; CLIP token/position embeddings and linears drawn like transformers
initialises CLIP; every other weight uniform in +-1/sqrt(fan_in) like torch's default. Each tensor
is seeded from its name, so a rebuild is identical.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import resource
import sys
import time
import zlib
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]

VAE = dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
           up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4, norm_num_groups=32)
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407)
CLIP_H = dict(CLIP_L, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
              hidden_act="gelu", projection_dim=1024)
CLIP_BIGG = dict(CLIP_L, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                 hidden_act="gelu", projection_dim=1280)

# family -> (ComfyUI model config class, UNet config, {text encoder: (transformers class, config)}).
# SD 2.x as the 512 base (epsilon): ComfyUI calls an SD20 checkpoint v-prediction only when a norm
# bias of the last output block is spread out, and ours are 0. The OpenCLIP encoders keep every
# layer and the text projection, as the released checkpoints do.
ARCH = {
    "sd2": ("SD20",
            dict(sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                 attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024, use_linear_projection=True),
            {"text_encoder": ("CLIPTextModelWithProjection", CLIP_H)}),
    "sdxl": ("SDXL",
             dict(sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                  attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048,
                  use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                  projection_class_embeddings_input_dim=2816),
             {"text_encoder": ("CLIPTextModel", CLIP_L), "text_encoder_2": ("CLIPTextModelWithProjection", CLIP_BIGG)}),
}


def import_pack():
    """This repository as a package under a folder name, as ComfyUI imports it."""
    spec = importlib.util.spec_from_file_location("ConceptEdit", REPO / "__init__.py", submodule_search_locations=[str(REPO)])
    pack = importlib.util.module_from_spec(spec)
    sys.modules["ConceptEdit"] = pack
    spec.loader.exec_module(pack)
    return pack


def draw(name: str, shape, text_cfg: dict | None) -> torch.Tensor:
    """A float32 tensor for the canonical parameter ``name`` (see the module docstring)."""
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    module, _, kind = name.rpartition(".")
    if "norm" in module.rpartition(".")[2]:
        return torch.ones(shape) if kind == "weight" else torch.zeros(shape)
    if kind == "bias":
        return torch.zeros(shape)
    if text_cfg is not None:  # transformers' CLIP initialisation (initializer_factor 1)
        d, n = text_cfg["hidden_size"], text_cfg["num_hidden_layers"]
        std = {"token_embedding": 0.02, "position_embedding": 0.01, "text_projection": d ** -0.5,
               "q_proj": (d * 2 * n) ** -0.5, "k_proj": (d * 2 * n) ** -0.5, "v_proj": (d * 2 * n) ** -0.5,
               "out_proj": d ** -0.5, "fc1": (2 * d) ** -0.5, "fc2": (d * 2 * n) ** -0.5}[module.rpartition(".")[2]]
        return torch.randn(shape, generator=g) * std
    bound = 1 / max(1, int(torch.Size(shape)[1:].numel())) ** 0.5
    return (torch.rand(shape, generator=g) * 2 - 1) * bound


def write_checkpoint(family: str, out: Path) -> dict:
    pack = import_pack()
    km = __import__(pack.__name__ + ".adapters.ldm_keymap", fromlist=["x"])
    st = __import__(pack.__name__ + ".adapters.safetensors_stream", fromlist=["x"])
    _, unet_cfg, encoders = ARCH[family]
    configs = {"unet": dict(unet_cfg), "vae": dict(VAE, sample_size=8 * unet_cfg["sample_size"]),
               **{c: dict(cfg) for c, (_, cfg) in encoders.items()}}
    modules = {c: km.meta_component(c, configs[c], encoders.get(c, (None,))[0]) for c in configs}
    shapes = {f"{c}.{k}": tuple(v.shape) for c, m in modules.items()
              for k, v in zip(km.component_keys(c, m), m.state_dict().values())}
    entries = km.layout_entries({c: km.component_keys(c, m) for c, m in modules.items()}, configs, family)
    del modules
    by_key = {e.key: e for e in entries}

    def combined(e):
        return e.combine([torch.empty(shapes[p], device="meta") for p in e.parts])

    specs = [(e.key, "F16", list(combined(e).shape)) for e in entries]

    def emit(key, f):
        e = by_key[key]
        comp = e.parts[0].split(".")[0]
        text_cfg = configs[comp] if comp.startswith("text_encoder") else None
        t = e.combine([draw(p, shapes[p], text_cfg) for p in e.parts]).to(torch.float16)
        f.write(st.tensor_bytes(t))

    st.write_stream(out, specs, emit, metadata={"concept_edit_test_checkpoint": f"{family} random weights"})
    return {"tensors": len(specs), "parameters": sum(torch.Size(s[2]).numel() for s in specs)}


# ---------------------------------------------------------------------------------------- FLUX.1
# ComfyUI decides a FLUX checkpoint's shapes itself (comfy/model_detection.py): hidden size 3072,
# 24 heads of 128, a 4096-wide context (T5-XXL) and the 16-channel latent are fixed; only the block
# counts and the pooled width (vector_in) come from the file. So the smallest FLUX it detects is
# one double block and no single blocks at the real width: 0.39 B parameters. Its text encoders
# are fixed too: clip_l from sd1_clip_config.json and T5-XXL from t5_config_xxl.json (4.7 B
# parameters, 9.5 GB in float16), sized from the json, not from the file. ComfyUI's own
# ``te_model_options`` (``{"t5xxl_model_config": {...}}``, read by SDClipModel) overrides that
# config: the file holds a T5 at XXL's width (the context must stay 4096) with one layer, two
# heads and a 256-wide feed-forward, which ComfyUI then builds and loads with nothing missing.
FLUX_UNET = dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=4096,
                 hidden_size=3072, mlp_ratio=4.0, num_heads=24, depth=1, depth_single_blocks=0, axes_dim=[16, 56, 56],
                 theta=10000, qkv_bias=True, guidance_embed=False, patch_size=2)
TINY_T5 = {"num_layers": 1, "num_heads": 2, "d_ff": 256}  # d_model 4096, d_kv 64, vocab 32128: T5-XXL's
FLUX_TE_OPTIONS = {"t5xxl_model_config": TINY_T5}  # what a loader must pass: load_checkpoint_guess_config(te_model_options=)


def t5_config(**over):
    """transformers' T5Config of ComfyUI's t5_config_xxl.json with ``over`` applied (as ComfyUI applies them)."""
    from transformers import T5Config

    cfg = json.loads((Path(os.environ["COMFYUI_PATH"]) / "comfy" / "text_encoders" / "t5_config_xxl.json").read_text())
    cfg.update(over)
    return T5Config(vocab_size=cfg["vocab_size"], d_model=cfg["d_model"], d_kv=cfg["d_kv"], d_ff=cfg["d_ff"],
                    num_layers=cfg["num_layers"], num_heads=cfg["num_heads"], feed_forward_proj="gated-gelu",
                    relative_attention_num_buckets=cfg["relative_attention_num_buckets"],
                    layer_norm_epsilon=cfg["layer_norm_epsilon"], is_encoder_decoder=False, use_cache=False)


def flux_shapes() -> dict[str, tuple]:
    """checkpoint key -> shape: ComfyUI's own FLUX module (on the meta device), CLIP-L, the tiny T5."""
    sys.path.insert(0, os.environ["COMFYUI_PATH"])
    from comfy.cli_args import args

    args.cpu = True
    import comfy.ldm.flux.model
    import comfy.ops
    from transformers import CLIPTextConfig, CLIPTextModel, T5EncoderModel

    flux = comfy.ldm.flux.model.Flux(operations=comfy.ops.disable_weight_init, device="meta", **FLUX_UNET)
    out = {f"model.diffusion_model.{k}": tuple(v.shape) for k, v in flux.state_dict().items()}
    with torch.device("meta"):
        clip_l = CLIPTextModel(CLIPTextConfig(**CLIP_L))
        t5 = T5EncoderModel(t5_config(**TINY_T5))
    for k, v in clip_l.state_dict().items():
        k = k if k.startswith("text_model.") else "text_model." + k  # transformers >= 5 flattens CLIPTextModel
        if "position_ids" not in k:
            out[f"text_encoders.clip_l.transformer.{k}"] = tuple(v.shape)
    for k, v in t5.state_dict().items():
        if k != "encoder.embed_tokens.weight":  # tied to shared.weight; ComfyUI's T5 has only that
            out[f"text_encoders.t5xxl.transformer.{k}"] = tuple(v.shape)
    return out


def draw_flux(key: str, shape) -> torch.Tensor:
    g = torch.Generator().manual_seed(zlib.crc32(key.encode()))
    leaf = key.rsplit(".", 2)
    if key.endswith((".scale", "layer_norm.weight", "final_layer_norm.weight")) or (
            "norm" in leaf[-2] and key.endswith(".weight") and len(shape) == 1):
        return torch.ones(shape)
    if key.endswith(".bias"):
        return torch.zeros(shape)
    if key.startswith("text_encoders.clip_l."):
        return draw(key[len("text_encoders.clip_l.transformer."):], shape, CLIP_L)
    if key.endswith("shared.weight"):
        return torch.randn(shape, generator=g)  # T5's embedding (std 1, as T5 initialises it)
    if key.endswith("relative_attention_bias.weight"):
        return torch.randn(shape, generator=g) * 0.1
    return torch.randn(shape, generator=g) * (int(torch.Size(shape)[1:].numel()) ** -0.5)


def write_flux(out: Path) -> dict:
    pack = import_pack()
    st = __import__(pack.__name__ + ".adapters.safetensors_stream", fromlist=["x"])
    shapes = flux_shapes()
    specs = [(k, "F16", list(s)) for k, s in shapes.items()]
    st.write_stream(out, specs, lambda k, f: f.write(st.tensor_bytes(draw_flux(k, shapes[k]).to(torch.float16))),
                    metadata={"concept_edit_test_checkpoint": "flux random weights, 1 double block, tiny T5 "
                                                              f"(load with te_model_options={json.dumps(FLUX_TE_OPTIONS)})"})
    return {"tensors": len(specs), "parameters": sum(torch.Size(s).numel() for s in shapes.values())}


def check_in_comfyui(family: str, path: Path) -> str:
    """Load ``path`` with ComfyUI; return the detected model config class name. Raises if any
    tensor is missing, unexpected or left over."""
    sys.path.insert(0, os.environ["COMFYUI_PATH"])
    from comfy.cli_args import args

    args.cpu = True
    import comfy.sd

    records: list[tuple[int, str]] = []

    class Grab(logging.Handler):
        def emit(self, record):
            records.append((record.levelno, record.getMessage()))

    root = logging.getLogger()
    handler, level = Grab(logging.DEBUG), root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        # float16 UNet: SDXL's in float32 (ComfyUI's CPU default) would need 10 GB
        flux = family == "flux"  # no VAE in the FLUX file; its T5 is sized by te_model_options
        model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(
            str(path), output_vae=not flux, model_options={"dtype": torch.float16},
            te_model_options=FLUX_TE_OPTIONS if flux else {})
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    # ComfyUI reports a missing logit_scale / text projection at debug level only (checkpoints lack them)
    bad = [m for lv, m in records if m.startswith(("unet missing", "unet unexpected", "clip unexpected", "left over keys",
                                                  "Missing VAE keys", "Leftover VAE keys"))
           or (m.startswith("clip missing") and lv >= logging.WARNING)]
    assert not bad, bad[:3]
    assert clip is not None and (vae is not None or flux)
    status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
    print(f"loaded by ComfyUI: {int(status['RssAnon'].split()[0]) / 1024:.0f} MiB allocated, "
          f"{int(status['RssFile'].split()[0]) / 1024:.0f} MiB of the file mapped")
    return type(model.model.model_config).__name__


def main(family: str, out: str) -> None:
    out = Path(out)
    tmp = out.with_name(f".{out.stem}.{os.getpid()}.partial.safetensors")  # ComfyUI goes by the suffix
    t0 = time.time()
    try:
        info = write_flux(tmp) if family == "flux" else write_checkpoint(family, tmp)
        t_write, rss_write = time.time() - t0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        detected = check_in_comfyui(family, tmp)
        want = "FluxSchnell" if family == "flux" else ARCH[family][0]  # no guidance_in: schnell
        assert detected == want, f"ComfyUI detected {detected}, not {want}"
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    print(f"{family}: {info['parameters'] / 1e9:.2f} B parameters, {out.stat().st_size / 2**30:.2f} GiB, written in "
          f"{t_write:.0f} s (peak RSS {rss_write:.0f} MiB); ComfyUI detects {detected}; total {time.time() - t0:.0f} s, "
          f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main(*sys.argv[1:])
