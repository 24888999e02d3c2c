"""Tiny SD 1.x / SD 2.x / SDXL pipelines with random weights and the real CLIP tokenizer.

Used by the tests, helpers and benchmarks: same classes and layer names as the real
families, small enough to build in a second on a CPU. Nothing is downloaded.
"""
from __future__ import annotations

import torch

from .tokenizer_files import clip_tokenizer_dir

FAMILIES = ("sd1", "sd2", "sdxl")


def _clip_config(hidden: int, *, projection: int | None = None, act: str = "quick_gelu"):
    from transformers import CLIPTextConfig

    kw = {"projection_dim": projection} if projection else {}
    return CLIPTextConfig(
        vocab_size=49408,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=1,
        hidden_act=act,
        **kw,
    )


def build_tiny_pipeline(family: str = "sd1", *, seed: int = 0):
    """A randomly initialised StableDiffusion(XL)Pipeline of the given family."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        EulerDiscreteScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}")
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        block_out_channels=(16, 32),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
    )
    common = dict(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        norm_num_groups=8,
    )
    if family == "sd1":
        te = CLIPTextModel(_clip_config(32))
        unet = UNet2DConditionModel(cross_attention_dim=32, attention_head_dim=4, **common)
        tok = CLIPTokenizer.from_pretrained(str(clip_tokenizer_dir()))
        sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
        return StableDiffusionPipeline(
            vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=sched,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
    if family == "sd2":
        te = CLIPTextModel(_clip_config(64, act="gelu"))
        unet = UNet2DConditionModel(cross_attention_dim=64, attention_head_dim=(2, 4), use_linear_projection=True, **common)
        tok = CLIPTokenizer.from_pretrained(str(clip_tokenizer_dir(pad_token="!")))
        sched = DDIMScheduler(
            beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
            set_alpha_to_one=False, prediction_type="v_prediction", steps_offset=1,
        )
        return StableDiffusionPipeline(
            vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=sched,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
    te1 = CLIPTextModel(_clip_config(32))
    # The encoders differ in width (as in real SDXL: 768 vs 1280): diffusers' single-file
    # loader tells them apart by width.
    te2 = CLIPTextModelWithProjection(_clip_config(48, projection=32, act="gelu"))
    unet = UNet2DConditionModel(
        cross_attention_dim=80,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=80,  # 6 * 8 time ids + 32 pooled
        **common,
    )
    tok = CLIPTokenizer.from_pretrained(str(clip_tokenizer_dir()))
    tok2 = CLIPTokenizer.from_pretrained(str(clip_tokenizer_dir(pad_token="!")))
    sched = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1)
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok2, unet=unet, scheduler=sched,
        force_zeros_for_empty_prompt=True,
    )


def _t5_encoder(d_model: int):
    from transformers import T5Config, T5EncoderModel

    from .tokenizer_files import T5_VOCAB

    cfg = T5Config(vocab_size=T5_VOCAB, d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=2, num_heads=4,
                   relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
                   pad_token_id=0, eos_token_id=1)
    return T5EncoderModel(cfg).eval()  # as from_pretrained returns it: no dropout


def build_tiny_mmdit_pipeline(family: str = "flux", *, seed: int = 0):
    """A randomly initialised FluxPipeline ("flux") or StableDiffusion3Pipeline ("sd3"): the real
    classes and layer names (``transformer.context_embedder``, the pooled-text embedder), CLIP
    with the real CLIP tokenizer, a T5 encoder with an offline T5-style tokenizer."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        FluxTransformer2DModel,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import (
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
        T5TokenizerFast,
    )

    from .tokenizer_files import t5_tokenizer_dir

    torch.manual_seed(seed)
    # FLUX packs 2x2 latent patches into its 4 input channels: a 1-channel VAE latent
    vae = AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
                        latent_channels=1 if family == "flux" else 4, norm_num_groups=1, use_quant_conv=False,
                        use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035)
    tok = CLIPTokenizer.from_pretrained(str(clip_tokenizer_dir()))
    t5_tok = T5TokenizerFast.from_pretrained(str(t5_tokenizer_dir()))
    sched = FlowMatchEulerDiscreteScheduler()
    if family == "flux":
        clip = CLIPTextModel(_clip_config(32))
        t5 = _t5_encoder(48)
        transformer = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                             attention_head_dim=16, num_attention_heads=2, joint_attention_dim=48,
                                             pooled_projection_dim=32, axes_dims_rope=[4, 4, 8])
        return FluxPipeline(scheduler=sched, vae=vae, text_encoder=clip.eval(), tokenizer=tok, text_encoder_2=t5,
                            tokenizer_2=t5_tok, transformer=transformer)
    if family == "sd3":
        # CLIP-L (32) ‖ CLIP-G (48) states are zero-padded to the T5 width (96) and joined along tokens
        clip_l = CLIPTextModelWithProjection(_clip_config(32, projection=32))
        clip_g = CLIPTextModelWithProjection(_clip_config(48, projection=48, act="gelu"))
        t5 = _t5_encoder(96)
        # width 64 = 64 x depth 1: the shape ComfyUI's SD3 (MMDiT) class derives from a checkpoint
        transformer = SD3Transformer2DModel(sample_size=32, patch_size=1, in_channels=4, num_layers=1,
                                            attention_head_dim=16, num_attention_heads=4, caption_projection_dim=64,
                                            joint_attention_dim=96, pooled_projection_dim=80, out_channels=4)
        return StableDiffusion3Pipeline(scheduler=sched, vae=vae, text_encoder=clip_l.eval(), tokenizer=tok,
                                        text_encoder_2=clip_g.eval(), tokenizer_2=CLIPTokenizer.from_pretrained(
                                            str(clip_tokenizer_dir(pad_token="!"))),
                                        text_encoder_3=t5, tokenizer_3=t5_tok, transformer=transformer)
    raise ValueError("family must be 'flux' or 'sd3'")
