"""Attacks on erased concepts, for text-to-image models edited by ConceptEdit (diffusers pipelines).

Three attacks, from cheapest to strongest; each returns prompts (or prompt embeddings) to sample
the *edited* pipeline with, and the caller classifies the images:

* :func:`paraphrase_prompts` -- black box: the concept under prompt templates never used for
  editing (held-out paraphrases) and under its other names (aliases).
* :func:`soft_prompt_attack` -- white box, continuous (UnlearnDiffAtk, Zhang et al. 2024;
  "Circumventing Concept Erasure", Pham et al. 2024): ``n_tokens`` input token embeddings take the
  erased name's place in a prompt and are optimised with Adam so that the edited model's
  prediction on noised images *of the erased concept* matches the training target (the denoising
  loss). Sample the pipeline with the returned ``prompt_embeds``.
* :func:`token_search` -- white box, discrete (in the spirit of Ring-A-Bell, Tsai et al. 2024, and
  P4D, Chin et al. 2024): a greedy coordinate-gradient search (GCG, Zou et al. 2023) over the
  tokenizer's words for ``n_tokens`` words that, in the erased name's place, make the edited
  model's cross-attention read what the unedited model read for the erased prompt: the
  cross-attention outputs for the unedited model's own queries (captured while it drew the
  concept) are matched, which covers edits of the text encoder and of the cross-attention
  projections alike and does not depend on token positions. The result is a plain text prompt.

Everything is seeded; the model's weights are never changed here (apply the edit around the calls).
"""
from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F


# -- prompts with slots --------------------------------------------------------------------------
@dataclass
class Target:
    """An erased concept to attack.

    ``prefix`` / ``suffix``: the prompt text around the concept's name (the attacked slot);
    ``render(np_rng)``: a uint8 (32, 32, 3) picture of the concept (for the soft-prompt attack's
    denoising loss); ``words``: the concept's own names, which the discrete search may not use."""

    name: str
    prefix: str
    suffix: str = ""
    render: Callable[[np.random.Generator], np.ndarray] | None = None
    words: tuple[str, ...] = ()
    meta: dict = field(default_factory=dict)

    @property
    def prompt(self) -> str:
        return " ".join(x for x in (self.prefix, self.name, self.suffix) if x)


def _word_ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False).input_ids if text else []


def slot_ids(tok, prefix: str, suffix: str, n_slots: int, fill_id: int | None = None) -> tuple[torch.Tensor, int]:
    """Token ids (model_max_length,) of ``prefix <slot>*n_slots suffix`` and the first slot's position."""
    pre, suf = _word_ids(tok, prefix), _word_ids(tok, suffix)
    fill = tok.eos_token_id if fill_id is None else fill_id
    ids = [tok.bos_token_id, *pre, *([fill] * n_slots), *suf, tok.eos_token_id]
    L = tok.model_max_length
    if len(ids) > L:
        raise ValueError(f"prompt of {len(ids)} tokens exceeds {L}")
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return torch.tensor(ids + [pad] * (L - len(ids))), 1 + len(pre)


@contextlib.contextmanager
def token_override(text_encoder, rows: torch.Tensor, cols: torch.Tensor, vectors_fn: Callable[[], torch.Tensor]):
    """Inside the block, the text encoder's input embeddings at (rows[i], cols[i]) are
    ``vectors_fn()[i]`` (read at every forward call, so a tensor being optimised can be passed)."""
    emb = text_encoder.get_input_embeddings()

    def hook(_module, _inp, out):
        out = out.clone()
        out[rows, cols] = vectors_fn().to(out.dtype)
        return out

    h = emb.register_forward_hook(hook)
    try:
        yield
    finally:
        h.remove()


def encode(text_encoder, ids: torch.Tensor, slots: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None):
    """Prompt embeddings (the pipeline's ``prompt_embeds``: the last hidden states) of ``ids``
    (B, L); ``slots`` = (rows, cols, vectors) puts input embeddings at those positions."""
    if slots is None:
        return text_encoder(ids)[0]
    rows, cols, vecs = slots
    with token_override(text_encoder, rows, cols, lambda: vecs):
        return text_encoder(ids)[0]


def slot_index(n_prompts: int, start: int | list[int], n_slots: int):
    starts = [start] * n_prompts if isinstance(start, int) else list(start)
    rows = torch.arange(n_prompts).repeat_interleave(n_slots)
    cols = torch.tensor([s + j for s in starts for j in range(n_slots)])
    return rows, cols


# -- sampling ----------------------------------------------------------------------------------------
@torch.no_grad()
def generate_embeds(pipe, prompt_embeds: torch.Tensor, seeds: list[int], *, steps: int | None = None,
                    guidance: float | None = None) -> np.ndarray:
    """uint8 images from ``prompt_embeds`` (N, L, d); image i uses seed ``seeds[i]`` as
    ``testbed.evaluate.generate`` does (the unconditional branch encodes "" with the live encoder)."""
    from concept_edit.testbed.evaluate import GUIDANCE, pipe_kwargs

    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    im = pipe(prompt_embeds=prompt_embeds, generator=gens, output_type="np",
              **pipe_kwargs(pipe, len(seeds), steps, GUIDANCE if guidance is None else guidance)).images
    return np.clip(np.round(im * 255), 0, 255).astype(np.uint8)


# -- 1. paraphrases and aliases --------------------------------------------------------------------
def paraphrase_prompts(name: str, templates: list[str], aliases: list[str] = (), alias_templates: list[str] = ()):
    """(prompt, tag) pairs: the name under each held-out template ("para"), every alias under each
    alias template ("alias")."""
    fill = lambda t, x: t.replace("{o}", x).replace("{}", x)  # the testbed grammar's "{o}" or str.format's "{}"
    out = [(fill(t, name), "para") for t in templates]
    out += [(fill(t, a), "alias") for a in aliases for t in alias_templates]
    return out


# -- 2. soft prompt (denoising loss on pictures of the concept) ----------------------------------------
def _train_scheduler(pipe):
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(pipe.scheduler.config)


@torch.no_grad()
def image_latents(pipe, images: np.ndarray) -> torch.Tensor:
    """uint8 (N,32,32,3) -> scaled VAE latents (the training inputs)."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
    return pipe.vae.encode(x).latent_dist.mean * pipe.vae.config.scaling_factor


@dataclass
class SoftPromptResult:
    prompt_embeds: torch.Tensor  # (n_targets, L, d): sample the pipeline with these
    vectors: torch.Tensor  # (n_targets, n_tokens, d): the optimised input embeddings
    loss_first: list[float]
    loss_last: list[float]
    seconds: float


def soft_prompt_attack(pipe, targets: list[Target], *, n_tokens: int = 2, steps: int = 100, lr: float = 1e-2,
                       batch: int = 2, pool: int = 16, t_range: tuple[int, int] = (50, 950), seed: int = 0,
                       init: str = "name") -> SoftPromptResult:
    """Optimise ``n_tokens`` input embeddings per target in the name's slot against the live
    (edited) model's denoising loss on renders of the target; targets are optimised together
    (their losses are summed, so each one's Adam trajectory is its own).

    ``init``: "name" starts every slot at the erased name's own embedding (plus a little seeded
    noise for the second and later slots), "random" at random vocabulary words."""
    import time

    t0 = time.time()
    tok, te, unet = pipe.tokenizer, pipe.text_encoder, pipe.unet
    sched = _train_scheduler(pipe)
    g = torch.Generator().manual_seed(seed)
    np_rng = np.random.default_rng(seed)
    rng = random.Random(seed)
    n = len(targets)
    ids, starts = zip(*[slot_ids(tok, t.prefix, t.suffix, n_tokens) for t in targets])
    ids = torch.stack(ids)
    E = te.get_input_embeddings().weight.detach()
    init_vecs = []
    for t in targets:
        name_id = _word_ids(tok, t.name)
        if init == "name" and len(name_id) == 1:
            base = E[name_id[0]]
            v = base.repeat(n_tokens, 1)
            if n_tokens > 1:
                v[1:] += 0.1 * base.norm() / base.numel() ** 0.5 * torch.randn(n_tokens - 1, base.numel(), generator=g)
        else:
            v = E[[rng.randrange(len(E)) for _ in range(n_tokens)]].clone()
        init_vecs.append(v)
    vecs = torch.nn.Parameter(torch.stack(init_vecs))
    rows, cols = slot_index(n, list(starts), n_tokens)
    # a fixed pool of renders per target (fresh jitter / styles), latents once
    lat = torch.stack([image_latents(pipe, np.stack([t.render(np_rng) for _ in range(pool)])) for t in targets])
    req = [p.requires_grad for p in unet.parameters()] + [p.requires_grad for p in te.parameters()]
    unet.requires_grad_(False)
    te.requires_grad_(False)
    opt = torch.optim.Adam([vecs], lr=lr)
    first, last = None, None
    v_pred = sched.config.prediction_type == "v_prediction"
    try:
        for step in range(steps):
            pick = torch.randint(0, pool, (n, batch), generator=g)
            z = lat[torch.arange(n)[:, None], pick].flatten(0, 1)
            noise = torch.randn(z.shape, generator=g)
            t = torch.randint(t_range[0], t_range[1], (n * batch,), generator=g)
            noisy = sched.add_noise(z, noise, t)
            target = sched.get_velocity(z, noise, t) if v_pred else noise
            with token_override(te, rows, cols, lambda: vecs.flatten(0, 1)):
                cond = te(ids)[0]
            cond = cond.repeat_interleave(batch, 0)
            pred = unet(noisy, t, encoder_hidden_states=cond).sample
            per = F.mse_loss(pred, target, reduction="none").flatten(1).mean(1).view(n, batch).mean(1)
            opt.zero_grad(set_to_none=True)
            per.sum().backward()
            opt.step()
            d = per.detach()
            first = d if first is None else first
            last = d if last is None else 0.9 * last + 0.1 * d
    finally:
        params = list(unet.parameters()) + list(te.parameters())
        for p, r in zip(params, req):
            p.requires_grad_(r)
    with torch.no_grad():
        embeds = encode(te, ids, (rows, cols, vecs.detach().flatten(0, 1)))
    return SoftPromptResult(embeds, vecs.detach().clone(), first.tolist(), last.tolist(), time.time() - t0)


# -- 3. discrete token search (cross-attention read-out matching) -----------------------------------
def cross_attention_modules(unet) -> list:
    return [m for n, m in unet.named_modules() if n.endswith("attn2")]


@torch.no_grad()
def capture_queries(pipe, prompts: list[str], seeds: list[int], *, per_layer: int = 128, seed: int = 0,
                    steps: int | None = None) -> list[torch.Tensor]:
    """The cross-attention inputs (image-side hidden states) of the conditional branch while the
    live pipeline samples ``prompts``, ``per_layer`` rows per layer drawn at random over steps,
    images and positions."""
    from concept_edit.testbed.evaluate import GUIDANCE, pipe_kwargs

    mods = cross_attention_modules(pipe.unet)
    got = [[] for _ in mods]

    def make(i):
        def hook(_m, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            got[i].append(h[h.shape[0] // 2 :].flatten(0, 1).clone())  # the conditional half (CFG)
        return hook

    hs = [m.register_forward_pre_hook(make(i), with_kwargs=True) for i, m in enumerate(mods)]
    try:
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
        pipe(prompts, generator=gens, output_type="np", **pipe_kwargs(pipe, len(prompts), steps, GUIDANCE))
    finally:
        for h in hs:
            h.remove()
    g = torch.Generator().manual_seed(seed)
    out = []
    for rows in got:
        x = torch.cat(rows)
        out.append(x[torch.randperm(len(x), generator=g)[:per_layer]])
    return out


def _attn_read(attn, hidden: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
    """Cross-attention output (B, Nq, C) of ``attn`` for queries from ``hidden`` (Nq, C) over each
    context in ``ctx`` (B, L, D) (no mask, as the pipeline samples)."""
    if getattr(attn, "norm_cross", None) is not None:
        ctx = attn.norm_encoder_hidden_states(ctx)
    h = attn.heads
    q = attn.to_q(hidden)
    k, v = attn.to_k(ctx), attn.to_v(ctx)
    B, L, inner = k.shape
    dh = inner // h
    q = q.view(1, -1, h, dh).transpose(1, 2)
    k = k.view(B, L, h, dh).transpose(1, 2)
    v = v.view(B, L, h, dh).transpose(1, 2)
    o = torch.softmax(q @ k.transpose(-1, -2) * attn.scale, -1) @ v
    return attn.to_out[0](o.transpose(1, 2).reshape(B, -1, inner))


class ReadoutLoss:
    """Distance between the live model's cross-attention read-outs of a prompt and a reference
    (the unedited model's read-outs of the erased prompt), summed over layers, each relative to
    the reference's mean square."""

    def __init__(self, unet, queries: list[torch.Tensor], reference_embeds: torch.Tensor):
        self.mods = cross_attention_modules(unet)
        self.queries = queries
        with torch.no_grad():
            self.ref = [_attn_read(m, q, reference_embeds[None]) for m, q in zip(self.mods, queries)]
        self.scale = [r.pow(2).mean() for r in self.ref]

    def __call__(self, embeds: torch.Tensor) -> torch.Tensor:
        total = 0
        for m, q, r, s in zip(self.mods, self.queries, self.ref, self.scale):
            total = total + (_attn_read(m, q, embeds) - r).pow(2).flatten(1).mean(1) / s
        return total / len(self.mods)


def word_vocabulary(tok, words: list[str], exclude=()) -> torch.Tensor:
    """Token ids of ``words`` that are single tokens, without ``exclude``."""
    ex = set(exclude)
    out = []
    for w in words:
        if w in ex:
            continue
        ids = _word_ids(tok, w)
        if len(ids) == 1:
            out.append(ids[0])
    return torch.tensor(sorted(set(out)))


@dataclass
class SearchResult:
    prompt: str
    words: list[str]
    loss: float
    loss_name: float  # the erased prompt's own loss under the edited model (the starting point to beat)
    history: list[float]
    seconds: float


def token_search(pipe, target: Target, loss_fn: ReadoutLoss, vocab: torch.Tensor, *, n_tokens: int = 3,
                 iters: int = 12, top_k: int = 24, chunk: int = 64, seed: int = 0) -> SearchResult:
    """Greedy coordinate-gradient search: each iteration ranks every vocabulary word for every
    slot by the loss gradient at the one-hot input (first order), evaluates the ``top_k`` words of
    every slot exactly (``n_tokens * top_k`` prompts) and moves to the best; returns the best seen."""
    import time

    t0 = time.time()
    tok, te = pipe.tokenizer, pipe.text_encoder
    rng = random.Random(seed)
    ids0, start = slot_ids(tok, target.prefix, target.suffix, n_tokens)
    E = te.get_input_embeddings().weight.detach()
    EV = E[vocab]
    cur = [int(vocab[rng.randrange(len(vocab))]) for _ in range(n_tokens)]
    req = [p.requires_grad for p in te.parameters()]
    te.requires_grad_(False)

    def with_words(words_batch: list[list[int]]) -> torch.Tensor:
        ids = ids0.repeat(len(words_batch), 1)
        ids[:, start : start + n_tokens] = torch.tensor(words_batch)
        return ids

    @torch.no_grad()
    def losses(words_batch):
        out = []
        for i in range(0, len(words_batch), chunk):
            out.append(loss_fn(te(with_words(words_batch[i : i + chunk]))[0]))
        return torch.cat(out)

    with torch.no_grad():
        name_ids = torch.tensor([tok.bos_token_id, *_word_ids(tok, target.prompt), tok.eos_token_id])
        full = torch.full((tok.model_max_length,), tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
        full[: len(name_ids)] = name_ids
        loss_name = float(loss_fn(te(full[None])[0])[0])
    best_words, best = list(cur), float(losses([cur])[0])
    cur_loss, history = best, [best]
    seen = {tuple(cur)}
    try:
        for _ in range(iters):
            x = E[torch.tensor(cur)].clone().requires_grad_(True)
            rows, cols = slot_index(1, start, n_tokens)
            with token_override(te, rows, cols, lambda: x):
                loss = loss_fn(te(ids0[None])[0])[0]
            (grad,) = torch.autograd.grad(loss, x)
            score = grad @ EV.T  # (n_tokens, |V|): first-order change of the loss per word
            cands = []
            for j in range(n_tokens):
                for v in vocab[score[j].topk(top_k, largest=False).indices].tolist():
                    c = list(cur)
                    c[j] = v
                    if tuple(c) not in seen:  # tabu: never return to a prompt already evaluated as the current one
                        cands.append(c)
            if not cands:
                break
            ls = losses(cands)
            i = int(ls.argmin())
            cur, cur_loss = cands[i], float(ls[i])
            seen.add(tuple(cur))
            history.append(cur_loss)
            if cur_loss < best:
                best, best_words = cur_loss, list(cur)
    finally:
        for p, r in zip(te.parameters(), req):
            p.requires_grad_(r)
    words = [tok.convert_ids_to_tokens(i).replace("</w>", "") for i in best_words]
    prompt = " ".join(x for x in (target.prefix, *words, target.suffix) if x)
    return SearchResult(prompt, words, best, loss_name, history, time.time() - t0)
