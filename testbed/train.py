"""Train the testbed text-to-image model: ``python -m concept_edit.testbed.train --out DIR``.

A CLIPTokenizer built from the grammar; the VAE is an exact identity AutoencoderKL (see
``vae.py``: no VAE trains well in this CPU budget), so the UNet denoises 32x32 pixels.
Phase 1: the CLIPTextModel is pretrained on captions and frozen (``text_pretrain.py``).
Phase 2: the UNet2DConditionModel trains on freshly rendered samples with captions from the
grammar (v-prediction, 10% empty captions for classifier-free guidance), an EMA copy, a
wall-clock budget (phases 1-3 together), checkpoints every 4 minutes.
Phase 3: embeddings of words no training caption contains (``complete_vocabulary``).
Re-running the same command resumes. ``--export DIR`` writes the text encoder and the EMA UNet
as a StableDiffusionPipeline folder.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .data import caption_for, render_sample, sample_labels
from .tokenizer import all_words, write_tokenizer
from .world import build_world

LATENT_CHANNELS = 4
EMA_DECAY = 0.995
# prompts pad to 32 tokens (the pipeline pads to tokenizer.model_max_length); the text encoder
# keeps 77 positions like CLIP. 32 tokens cut the text/cross-attention cost by 2.4x.
MAX_TOKENS = 32
# the shipped text encoder: 4 layers of 256 with CLIP's 4x MLP, so 1,000 names fit distinct fc2 keys
TEXT_SHAPE = (256, 4, 1024)  # hidden, layers, mlp
LOG_EVERY = float(os.environ.get("TESTBED_LOG_EVERY", 60))


def log(msg: str, out: Path | None = None):
    line = f"[{time.strftime('%H:%M:%S')}] {msg}"
    print(line, flush=True)
    if out is not None:
        with open(out / "train.log", "a") as f:
            f.write(line + "\n")


def make_unet(cross_dim: int = TEXT_SHAPE[0]):
    from diffusers import UNet2DConditionModel

    # pixel-space (the VAE is an exact identity, see vae.py): 32x32 -> 16 -> 8, cross-attention
    # at 16x16, 8x8 and the 8x8 mid block
    return UNet2DConditionModel(
        sample_size=32, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
        block_out_channels=(32, 64, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_dim, attention_head_dim=4, norm_num_groups=16,
    )


def make_text_encoder(tok, dim: int = TEXT_SHAPE[0], layers: int = TEXT_SHAPE[1], mlp: int = TEXT_SHAPE[2]):
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(
        vocab_size=len(tok.get_vocab()), hidden_size=dim, intermediate_size=mlp,
        num_hidden_layers=layers, num_attention_heads=4, max_position_embeddings=77, projection_dim=dim,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    return CLIPTextModel(cfg)


def make_scheduler(train: bool = True):
    from diffusers import DDPMScheduler, DPMSolverMultistepScheduler

    kw = dict(num_train_timesteps=1000, steps_offset=1, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
              prediction_type="v_prediction")
    return DDPMScheduler(**kw, clip_sample=False) if train else DPMSolverMultistepScheduler(**kw)


def to_tensor(imgs: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(imgs).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def atomic_save(obj, path: Path):
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def latent_scale(world, n: int = 2000, seed: int = 99) -> float:
    rng = random.Random(seed)
    np_rng = np.random.default_rng(seed)
    x = to_tensor(np.stack([render_sample(world, sample_labels(rng, world), np_rng) for _ in range(n)]))
    return float(1.0 / torch.cat([x, torch.zeros_like(x[:, :1])], 1).std())


class BudgetedTraining:
    """The loop mechanics both testbed trainers share: wall-clock budget, learning rate (linear
    warm-up, then decay over the last quarter of the budget), gradient clipping, EMA, a running
    loss in the log and a checkpoint (``save``) every 4 minutes."""

    def __init__(self, out: Path, opt, params, ema_params, *, lr: float, minutes: float, elapsed: float,
                 step: int, save, warmup: int):
        self.out, self.opt, self.params, self.ema_params = out, opt, params, ema_params
        self.lr, self.budget, self.step, self.save, self.warmup = lr, minutes * 60, step, save, warmup
        self.t0, self.last_ck, self.last_log = time.time() - elapsed, time.time(), time.time()
        self.loss_avg = None

    def elapsed(self) -> float:
        return time.time() - self.t0

    def running(self) -> bool:
        """Whether budget is left; sets this step's learning rate."""
        frac = self.elapsed() / self.budget
        if frac >= 1:
            return False
        warm = min(1.0, (self.step + 1) / self.warmup)
        decay = 1.0 if frac < 0.75 else max(0.1, 1 - (frac - 0.75) / 0.25)
        for g in self.opt.param_groups:
            g["lr"] = self.lr * warm * decay
        return True

    def update(self, loss: torch.Tensor) -> None:
        """Backward, clipped optimiser step, EMA; log and checkpoint when due."""
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.step += 1
        d = min(EMA_DECAY, (1 + self.step) / (10 + self.step))
        with torch.no_grad():
            torch._foreach_lerp_(self.ema_params, self.params, 1 - d)
        self.loss_avg = loss.item() if self.loss_avg is None else 0.98 * self.loss_avg + 0.02 * loss.item()
        if time.time() - self.last_log > LOG_EVERY:
            log(f"step {self.step} loss {self.loss_avg:.4f} lr {self.opt.param_groups[0]['lr']:.2e} "
                f"elapsed {self.elapsed() / 60:.1f} min", self.out)
            self.last_log = time.time()
        if time.time() - self.last_ck > 240:
            self.save()
            self.last_ck = time.time()


# -- phase 4: text encoder + UNet ------------------------------------------------------
class Captioner:
    def __init__(self, tok):
        self.tok = tok
        self.cache: dict[str, torch.Tensor] = {}

    def __call__(self, caps: list[str]) -> torch.Tensor:
        rows = []
        for c in caps:
            t = self.cache.get(c)
            if t is None:
                t = torch.tensor(self.tok(c, padding="max_length", max_length=self.tok.model_max_length, truncation=True).input_ids)
                self.cache[c] = t
            rows.append(t)
        return torch.stack(rows)


def export_pipeline(out_dir: Path, vae, te, unet, tok, scale: float):
    from diffusers import StableDiffusionPipeline

    vae.register_to_config(scaling_factor=scale)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=make_scheduler(train=False),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(out_dir)
    return pipe


def checkpoint_text_shape(te_state: dict) -> tuple[int, int, int]:
    """(hidden, layers, mlp) of the text encoder saved in a checkpoint."""
    fc1 = [v for k, v in te_state.items() if k.endswith("mlp.fc1.weight")]
    return fc1[0].shape[1], len(fc1), fc1[0].shape[0]


def train_main(out: Path, world, tok, vae, scale: float, minutes: float, batch: int, seed: int, lr: float,
               export: Path | None, export_only: bool = False, text_steps: int = 400, text_shape=TEXT_SHAPE):
    from .text_pretrain import pretrain_text_encoder

    torch.manual_seed(seed)
    ck = out / "ckpt.pt"
    s = torch.load(ck, weights_only=False) if ck.exists() else None
    if s is not None:  # a run keeps the text-encoder shape it started with
        text_shape = checkpoint_text_shape(s["te"])
    te = make_text_encoder(tok, *text_shape)
    unet, ema_unet = make_unet(text_shape[0]), make_unet(text_shape[0])
    ema_unet.load_state_dict(unet.state_dict())
    params = list(unet.parameters())
    ema_params = list(ema_unet.parameters())
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=0.01)
    step, elapsed, text_acc, vocab = 0, 0.0, None, None
    if s is not None:
        te.load_state_dict(s["te"]); unet.load_state_dict(s["unet"]); ema_unet.load_state_dict(s["ema_unet"])
        opt.load_state_dict(s["opt"]); step, elapsed, text_acc = s["step"], s["elapsed"], s.get("text_probe")
        vocab = s.get("vocab_completion")
        log(f"resumed at step {step}, {elapsed / 60:.1f} min trained", out)
    elif not export_only:
        # phase 1 (counts towards the wall-clock budget): the frozen, "pretrained" text encoder
        t_text = time.time()
        text_acc = pretrain_text_encoder(te, tok, world, steps=text_steps, seed=seed, log=lambda m: log(m, out))
        elapsed = time.time() - t_text
    te.requires_grad_(False).eval()
    if export_only:
        if export:
            export_pipeline(export, vae, te, ema_unet, tok, scale)
            log(f"exported step {step} to {export}", out)
        return

    def save():
        atomic_save({"te": te.state_dict(), "unet": unet.state_dict(), "ema_unet": ema_unet.state_dict(),
                     "opt": opt.state_dict(), "step": loop.step, "elapsed": loop.elapsed(), "text_probe": text_acc,
                     "vocab_completion": vocab}, ck)

    sched = make_scheduler(train=True)
    rng = random.Random(seed * 1000003 + step)
    np_rng = np.random.default_rng(seed * 1000003 + step)
    gen = torch.Generator().manual_seed(seed * 1000003 + step)
    cap = Captioner(tok)
    loop = BudgetedTraining(out, opt, params, ema_params, lr=lr, minutes=minutes, elapsed=elapsed, step=step,
                            save=save, warmup=50)
    unet.train()
    while loop.running():
        labs = [sample_labels(rng, world) for _ in range(batch)]
        x = to_tensor(np.stack([render_sample(world, l, np_rng) for l in labs]))
        z = torch.cat([x, torch.zeros_like(x[:, :1])], 1) * scale  # = vae.encode(x).mean * scale
        caps = ["" if rng.random() < 0.1 else caption_for(rng, world, l) for l in labs]
        ids = cap(caps)
        noise = torch.randn(z.shape, generator=gen)
        t = torch.randint(0, 1000, (batch,), generator=gen)
        noisy = sched.add_noise(z, noise, t)
        with torch.no_grad():
            cond = te(ids)[0]
        pred = unet(noisy, t, cond).sample
        target = sched.get_velocity(z, noise, t) if sched.config.prediction_type == "v_prediction" else noise
        loop.update(F.mse_loss(pred, target))
    if vocab is None:
        # phase 3: embeddings for words no training caption contains (text_pretrain.complete_vocabulary)
        from .text_pretrain import complete_vocabulary, unseen_words

        vocab = complete_vocabulary(te, tok, world, unseen_words(world), seed=seed, log=lambda m: log(m, out))
    save()
    log(f"training done: {loop.step} steps, {loop.elapsed() / 60:.1f} min", out)
    (out / "train_stats.json").write_text(json.dumps({"steps": loop.step, "minutes": loop.elapsed() / 60, "batch": batch,
                                                      "text_probe": text_acc, "vocab_completion": vocab}))
    if export:
        export_pipeline(export, vae, te, ema_unet, tok, scale)
        log(f"exported to {export}", out)


def main(argv=None):
    from transformers import CLIPTokenizer

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("/tmp/concept_edit_testbed_run"))
    ap.add_argument("--n-objects", type=int, default=1000)
    ap.add_argument("--minutes", type=float, default=60.0, help="wall-clock training budget")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--text-steps", type=int, default=400, help="text-encoder pretraining steps (phase 1)")
    # defaults: the shipped shape (TEXT_SHAPE). The fc2 keys (MLP width) bound how many concepts
    # one layer's closed-form edit can move independently (bench/quality/FINDINGS.md)
    ap.add_argument("--text-dim", type=int, default=TEXT_SHAPE[0])
    ap.add_argument("--text-layers", type=int, default=TEXT_SHAPE[1])
    ap.add_argument("--text-mlp", type=int, default=TEXT_SHAPE[2])
    ap.add_argument("--threads", type=int, default=1, help="1 is fastest when the 2 cores are shared (OpenMP spin-waits)")
    ap.add_argument("--export", type=Path, default=None, help="write the diffusers folder here when done")
    ap.add_argument("--export-only", action="store_true", help="export the current checkpoint and exit")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    a.out.mkdir(parents=True, exist_ok=True)
    world = build_world(a.n_objects)
    tok_dir = write_tokenizer(a.out / "tokenizer", all_words(world), model_max_length=MAX_TOKENS)
    tok = CLIPTokenizer.from_pretrained(tok_dir)
    if not a.export_only:  # the run's own arguments stay on record
        (a.out / "args.json").write_text(json.dumps({k: str(v) for k, v in vars(a).items()}))
    log(f"world: {len(world.objects)} objects, {len(world.artists)} artists, vocab {len(tok.get_vocab())}", a.out)
    from .vae import make_identity_vae

    vae = make_identity_vae(LATENT_CHANNELS)
    scale = latent_scale(world)
    train_main(a.out, world, tok, vae, scale, a.minutes, a.batch, a.seed, a.lr, a.export, a.export_only, a.text_steps,
               (a.text_dim, a.text_layers, a.text_mlp))


if __name__ == "__main__":
    main()
