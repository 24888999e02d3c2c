"""Train the FLUX-shaped testbed: ``python -m concept_edit.testbed.flux_train --out DIR``.

The second instrument beside the UNet testbed (``train.py``): the same world, grammar, identity
VAE and classifier, but the text enters as it does in FLUX.1 -- a CLIP-style encoder's pooled
vector through the pooled-text embedder, and a T5-style encoder's token states through
``context_embedder`` into a ``FluxTransformer2DModel`` (double- and single-stream blocks, RoPE),
trained by flow matching. FLUX rather than SD3: FLUX.1 is what most ComfyUI users run, and its
text pathway is exactly one encoder per reader (SD3 also mixes CLIP token states into the context).

Phase 0: the CLIP encoder is the UNet testbed's, already pretrained and frozen (as FLUX reuses
CLIP-L). Phase 1: the T5EncoderModel (gated-GELU MLP like T5 v1.1) is pretrained on the same probe
objective as the CLIP encoder (``text_pretrain.py``) and frozen. Phase 2: the transformer trains on
freshly rendered samples (velocity ``noise - x0`` at a logit-normal sigma shifted as the pipeline
shifts it; 10% empty captions for true classifier-free guidance), EMA, wall-clock budget (phases
1-3 together), checkpoints every 4 minutes; re-running the same command resumes. Phase 3: T5
embeddings of words no training caption contains. ``--export DIR`` writes a FluxPipeline folder
(weights stored in float16 to stay under 30 MB; load in float32).
"""
from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .data import caption_for, render_sample, sample_labels
from .train import (
    LATENT_CHANNELS,
    BudgetedTraining,
    Captioner,
    atomic_save,
    latent_scale,
    log,
    to_tensor,
)

MAX_T5_TOKENS = 32  # the pipeline is called with max_sequence_length = the tokenizer's length
T5_SHAPE = (256, 4, 768)  # d_model, layers, d_ff (gated: wi_0, wi_1, wo)
# transformer: 4 heads x 32 = 128 wide; RoPE axes (text id, row, column) must sum to the head dim
FLUX_SHAPE = dict(num_layers=2, num_single_layers=4, attention_head_dim=32, num_attention_heads=4,
                  axes_dims_rope=(8, 12, 12))
SIZE = 32  # image side; packed 2x2 -> 16x16 = 256 image tokens of 16 channels


def make_t5(tok, dim: int = T5_SHAPE[0], layers: int = T5_SHAPE[1], ff: int = T5_SHAPE[2]):
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(vocab_size=len(tok), d_model=dim, d_kv=dim // 4, d_ff=ff, num_layers=layers, num_heads=4,
                   feed_forward_proj="gated-gelu", dropout_rate=0.0, relative_attention_num_buckets=32,
                   relative_attention_max_distance=64, pad_token_id=tok.pad_token_id,
                   eos_token_id=tok.eos_token_id, decoder_start_token_id=tok.pad_token_id)
    return T5EncoderModel(cfg)


def make_transformer(joint_dim: int, pooled_dim: int, shape: dict | None = None):
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(patch_size=1, in_channels=LATENT_CHANNELS * 4, joint_attention_dim=joint_dim,
                                  pooled_projection_dim=pooled_dim, guidance_embeds=False, **(shape or FLUX_SHAPE))


def make_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    # FLUX's: the shift depends on the image sequence length (mu 0.5 at 256 tokens)
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True,
                                           base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                           max_image_seq_len=4096)


def train_sigmas(n: int, gen: torch.Generator, mu: float = 0.5) -> torch.Tensor:
    """Logit-normal sigmas, shifted as FluxPipeline shifts its sampling sigmas at this size."""
    s = torch.sigmoid(torch.randn(n, generator=gen))
    return math.exp(mu) * s / (1 + (math.exp(mu) - 1) * s)


def image_ids(n_tokens_side: int) -> torch.Tensor:
    from diffusers import FluxPipeline

    return FluxPipeline._prepare_latent_image_ids(1, n_tokens_side, n_tokens_side, "cpu", torch.float32)


def pack(z: torch.Tensor) -> torch.Tensor:
    from diffusers import FluxPipeline

    b, c, h, w = z.shape
    return FluxPipeline._pack_latents(z, b, c, h, w)


def load_clip():
    """The UNet testbed's pretrained, frozen CLIP text encoder and its tokenizer."""
    from transformers import CLIPTextModel, CLIPTokenizer

    from . import MODEL_DIR

    te = CLIPTextModel.from_pretrained(MODEL_DIR / "text_encoder").requires_grad_(False).eval()
    return te, CLIPTokenizer.from_pretrained(MODEL_DIR / "tokenizer")


def export_pipeline(out_dir: Path, vae, clip, clip_tok, t5, t5_tok, transformer, scale: float):
    """A FluxPipeline folder, weights in float16 (the modules passed in are not changed)."""
    import copy

    from diffusers import FluxPipeline

    vae = copy.deepcopy(vae)
    vae.register_to_config(scaling_factor=scale, shift_factor=0.0)
    mods = {k: copy.deepcopy(m).to(torch.float16) for k, m in
            dict(vae=vae, text_encoder=clip, text_encoder_2=t5, transformer=transformer).items()}
    pipe = FluxPipeline(scheduler=make_scheduler(), tokenizer=clip_tok, tokenizer_2=t5_tok, **mods)
    pipe.save_pretrained(out_dir)
    return out_dir


def train_main(out: Path, world, clip, clip_tok, t5_tok, vae, scale: float, minutes: float, batch: int, seed: int,
               lr: float, export: Path | None, export_only: bool = False, text_steps: int = 300, vocab_steps: int = 300):
    from .text_pretrain import complete_vocabulary, pretrain_text_encoder, unseen_words

    torch.manual_seed(seed)
    ck = out / "ckpt.pt"
    s = torch.load(ck, weights_only=False) if ck.exists() else None
    t5 = make_t5(t5_tok)
    dim, pooled_dim = t5.config.d_model, clip.config.hidden_size
    model, ema = make_transformer(dim, pooled_dim), make_transformer(dim, pooled_dim)
    ema.load_state_dict(model.state_dict())
    params, ema_params = list(model.parameters()), list(ema.parameters())
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=0.01)
    step, elapsed, text_acc, vocab = 0, 0.0, None, None
    if s is not None:
        t5.load_state_dict(s["t5"]); model.load_state_dict(s["transformer"]); ema.load_state_dict(s["ema"])
        opt.load_state_dict(s["opt"]); step, elapsed, text_acc = s["step"], s["elapsed"], s.get("text_probe")
        vocab = s.get("vocab_completion")
        log(f"resumed at step {step}, {elapsed / 60:.1f} min trained", out)
    elif not export_only:
        t_text = time.time()
        text_acc = pretrain_text_encoder(t5, t5_tok, world, steps=text_steps, seed=seed, log=lambda m: log(m, out))
        elapsed = time.time() - t_text
    t5.requires_grad_(False).eval()
    if export_only:
        if export:
            export_pipeline(export, vae, clip, clip_tok, t5, t5_tok, ema, scale)
            log(f"exported step {step} to {export}", out)
        return

    def save():
        atomic_save({"t5": t5.state_dict(), "transformer": model.state_dict(), "ema": ema.state_dict(),
                     "opt": opt.state_dict(), "step": loop.step, "elapsed": loop.elapsed(), "text_probe": text_acc,
                     "vocab_completion": vocab}, ck)

    rng = random.Random(seed * 1000003 + step)
    np_rng = np.random.default_rng(seed * 1000003 + step)
    gen = torch.Generator().manual_seed(seed * 1000003 + step)
    clip_ids, t5_ids = Captioner(clip_tok), Captioner(t5_tok)
    img_ids, txt_ids = image_ids(SIZE // 2), torch.zeros(MAX_T5_TOKENS, 3)
    loop = BudgetedTraining(out, opt, params, ema_params, lr=lr, minutes=minutes, elapsed=elapsed, step=step,
                            save=save, warmup=100)
    model.train()
    save()  # phase 1 survives an interruption
    while loop.running():
        labs = [sample_labels(rng, world) for _ in range(batch)]
        x = to_tensor(np.stack([render_sample(world, lab, np_rng) for lab in labs]))
        z = pack(torch.cat([x, torch.zeros_like(x[:, :1])], 1) * scale)  # = vae.encode(x).mean * scale, packed
        caps = ["" if rng.random() < 0.1 else caption_for(rng, world, lab) for lab in labs]
        with torch.no_grad():  # exactly what FluxPipeline.encode_prompt computes
            pooled = clip(clip_ids(caps), output_hidden_states=False).pooler_output
            states = t5(t5_ids(caps), output_hidden_states=False)[0]
        noise = torch.randn(z.shape, generator=gen)
        sig = train_sigmas(batch, gen)
        noisy = (1 - sig[:, None, None]) * z + sig[:, None, None] * noise
        pred = model(hidden_states=noisy, timestep=sig, guidance=None, pooled_projections=pooled,
                     encoder_hidden_states=states, txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
        loop.update(F.mse_loss(pred, noise - z))
    if vocab is None:  # phase 3, as for the CLIP encoder (text_pretrain.complete_vocabulary)
        vocab = complete_vocabulary(t5, t5_tok, world, unseen_words(world), steps=vocab_steps, seed=seed,
                                    log=lambda m: log(m, out))
    save()
    log(f"training done: {loop.step} steps, {loop.elapsed() / 60:.1f} min", out)
    (out / "train_stats.json").write_text(json.dumps({"steps": loop.step, "minutes": loop.elapsed() / 60, "batch": batch,
                                                      "text_probe": text_acc, "vocab_completion": vocab}))
    if export:
        export_pipeline(export, vae, clip, clip_tok, t5, t5_tok, ema, scale)
        log(f"exported to {export}", out)


def main(argv=None):
    from transformers import T5TokenizerFast

    from .tokenizer import all_words, write_t5_tokenizer
    from .vae import make_identity_vae
    from .world import build_world

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("/tmp/concept_edit_flux_testbed_run"))
    ap.add_argument("--minutes", type=float, default=100.0, help="wall-clock training budget (phases 1-3)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=7e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--text-steps", type=int, default=250, help="T5 pretraining steps (phase 1)")
    ap.add_argument("--vocab-steps", type=int, default=300, help="phase 3 steps")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--export", type=Path, default=None, help="write the FluxPipeline folder here when done")
    ap.add_argument("--export-only", action="store_true", help="export the current checkpoint and exit")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    a.out.mkdir(parents=True, exist_ok=True)
    world = build_world(1000)
    t5_tok = T5TokenizerFast.from_pretrained(write_t5_tokenizer(a.out / "tokenizer_2", all_words(world), MAX_T5_TOKENS))
    clip, clip_tok = load_clip()
    if not a.export_only:
        (a.out / "args.json").write_text(json.dumps({k: str(v) for k, v in vars(a).items()}))
    log(f"world: {len(world.objects)} objects; T5 vocab {len(t5_tok)}", a.out)
    train_main(a.out, world, clip, clip_tok, t5_tok, make_identity_vae(LATENT_CHANNELS), latent_scale(world), a.minutes,
               a.batch, a.seed, a.lr, a.export, a.export_only, a.text_steps, a.vocab_steps)


if __name__ == "__main__":
    main()
