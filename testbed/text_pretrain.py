"""Phase 1 of testbed training: pretrain the text encoder, then freeze it (as SD freezes CLIP).

SD's text encoder arrives pretrained: its token states already carry what a word means. Our
CLIPTextModel starts from scratch, and learning 1,000 invented names through the UNet's noise loss
alone took far more CPU than we have (session 1: shape/colour learned, patterns at 20%, after
97 min). So the encoder is first trained on a text-only objective that stands in for CLIP's
contrastive one: a linear probe on its final (layer-normed) states must read off the picture the
caption describes -- object shape/colour/pattern, profession, attribute word and artist -- at the
name token, at the artist token and at the first end-of-text token (which, with CLIP's causal
mask, sees the whole prompt, like CLIP's pooled output; T5 is bidirectional, so every token does).
The same objective pretrains the FLUX testbed's T5-style encoder (``flux_train.py``). It is contrastive learning against an
ideal image encoder whose features are those factors. The UNet then learns to draw factors, not
1,000 lookups, and trains with the encoder frozen.
"""
from __future__ import annotations

import random
import time

import torch
import torch.nn.functional as F

from .data import caption_for, sample_labels
from .world import COLOURS, PATTERNS, SHAPES, World

# probe outputs: (name, classes); profession 0 = none, word 0 = no attribute word
FACTORS = (("shape", len(SHAPES)), ("colour", len(COLOURS)), ("pattern", len(PATTERNS)),
           ("profession", 11), ("word", 3), ("style", 31))
SUBJECT_FACTORS = ("shape", "colour", "pattern", "profession", "word")


class Probe(torch.nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.heads = torch.nn.ModuleDict({k: torch.nn.Linear(dim, n) for k, n in FACTORS})

    def loss(self, h: torch.Tensor, targets: dict[str, torch.Tensor], factors) -> torch.Tensor:
        return sum(F.cross_entropy(self.heads[k](h), targets[k]) for k in factors)

    def accuracy(self, h: torch.Tensor, targets: dict[str, torch.Tensor], factors) -> dict[str, float]:
        return {k: float((self.heads[k](h).argmax(-1) == targets[k]).float().mean()) for k in factors}


def word_id(tok, word: str) -> int:
    """Token id of a grammar word (both testbed tokenizers, CLIP- and T5-style, make every word
    one token)."""
    ids = tok(word, add_special_tokens=False).input_ids
    if len(ids) == 2 and tok.convert_ids_to_tokens(ids[0]) == "\u2581":  # T5: "," alone reads "▁" ","
        ids = ids[1:]
    if len(ids) != 1:
        raise ValueError(f"{word!r} is {len(ids)} tokens for this tokenizer, not one")
    return ids[0]


def encode(tok, captions: list[str]) -> torch.Tensor:
    return torch.tensor(tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True).input_ids)


def token_positions(tok, world: World, row: list[int], lab) -> tuple[int, int, int]:
    """(name token, artist token or -1, first end-of-text token) in one caption's token ids."""
    c = lab.concept(world)
    names = {word_id(tok, n) for n in (c.name, c.alias) if n}
    subj = next(i for i, x in enumerate(row) if x in names)
    sty = row.index(word_id(tok, world.styles[lab.style].name)) if lab.style else -1
    return subj, sty, row.index(tok.eos_token_id)


def _batch(rng: random.Random, world: World, tok, n: int):
    """Captions (never empty) with token positions of subject, artist, first EOS, and targets."""
    labs = [sample_labels(rng, world) for _ in range(n)]
    ids = encode(tok, [caption_for(rng, world, l) for l in labs])
    word_ids = {word_id(tok, w): k for k, w in enumerate(("bare", "crowned"), 1)}
    subj, style_pos, eos = [], [], []
    t = {k: [] for k, _ in FACTORS}
    for i, lab in enumerate(labs):
        row = ids[i].tolist()
        c = lab.concept(world)
        for lst, pos in zip((subj, style_pos, eos), token_positions(tok, world, row, lab)):
            lst.append(pos)
        s, col, p = c.visual
        t["shape"].append(s); t["colour"].append(col); t["pattern"].append(p)
        t["profession"].append(c.index + 1 if lab.kind else 0)
        t["word"].append(next((word_ids[x] for x in row if x in word_ids), 0))
        t["style"].append(lab.style)
    return ids, torch.tensor(subj), torch.tensor(style_pos), torch.tensor(eos), {k: torch.tensor(v) for k, v in t.items()}


def pretrain_text_encoder(te, tok, world: World, *, steps: int = 400, batch: int = 256, lr: float = 2e-3,
                          seed: int = 0, log=print) -> dict[str, float]:
    """Train ``te`` in place on the probe objective; returns held-out-caption probe accuracy."""
    torch.manual_seed(seed)
    rng = random.Random(seed + 17)
    probe = Probe(te.config.hidden_size)
    params = list(te.parameters()) + list(probe.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    te.train()
    t0 = time.time()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / 50) * (0.5 * (1 + torch.cos(torch.tensor(step / steps * 3.14159)).item()))
        ids, subj, sty, eos, tg = _batch(rng, world, tok, batch)
        h = te(ids)[0]
        r = torch.arange(len(ids))
        loss = probe.loss(h[r, subj], tg, SUBJECT_FACTORS) + probe.loss(h[r, eos], tg, [k for k, _ in FACTORS])
        has = sty >= 0
        if has.any():
            loss = loss + probe.loss(h[r[has], sty[has]], {"style": tg["style"][has]}, ["style"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"text pretrain step {step}/{steps} loss {loss.item():.4f} ({time.time() - t0:.0f} s)")
    te.eval()
    with torch.no_grad():
        ids, subj, sty, eos, tg = _batch(random.Random(seed + 999), world, tok, 2000)
        h = te(ids)[0]
        r = torch.arange(len(ids))
        acc = {f"subject_{k}": v for k, v in probe.accuracy(h[r, subj], tg, SUBJECT_FACTORS).items()}
        acc.update({f"eos_{k}": v for k, v in probe.accuracy(h[r, eos], tg, [k for k, _ in FACTORS]).items()})
    log(f"text pretrain done: {acc}")
    return acc


def unseen_words(world: World, n_captions: int = 20_000, seed: int = 0) -> list[str]:
    """Vocabulary words no training caption contains (apart from the rare aliases, which stay
    untrained on purpose): words only the held-out paraphrases use, such as ``showing``."""
    from .grammar import GRAMMAR_WORDS

    rng = random.Random(seed)
    seen = set()
    for _ in range(n_captions):
        seen.update(caption_for(rng, world, sample_labels(rng, world)).split())
    rare = {c.alias for c in world.rare_aliased}
    return sorted(w for w in GRAMMAR_WORDS if w not in seen and w not in rare)


def complete_vocabulary(te, tok, world: World, words: list[str], *, steps: int = 300, batch: int = 128,
                        lr: float = 1e-2, seed: int = 0, log=print) -> dict[str, float]:
    """Phase 3: learn embeddings for ``words`` (never in a training caption) as neutral filler.

    SD's CLIP knows every English word; ours would meet ``showing`` or ``one`` for the first time
    in a held-out paraphrase, with a random embedding. Only those embedding rows train (every
    other weight is fixed, so training prompts encode bit-identically and the UNet is unaffected):
    a training caption with such words inserted at random places must encode like the caption
    without them, at the name token, the artist token and the end-of-text/padding positions.
    The held-out templates themselves are never used (augmented captions matching one are dropped).
    """
    from .grammar import HOLDOUT_STYLE_TEMPLATES, HOLDOUT_TEMPLATES

    ids_new = [word_id(tok, w) for w in words]
    if not ids_new:
        return {}
    held = set(HOLDOUT_TEMPLATES + HOLDOUT_STYLE_TEMPLATES)
    emb = te.get_input_embeddings().weight
    te.requires_grad_(False)
    emb.requires_grad_(True)
    mask = torch.zeros(emb.shape[0], 1)
    mask[ids_new] = 1.0
    hook = emb.register_hook(lambda g: g * mask)
    opt = torch.optim.Adam([emb], lr=lr)
    rng = random.Random(seed + 31)
    L = tok.model_max_length

    def pairs(n):
        orig, aug, keep = [], [], []
        while len(orig) < n:
            lab = sample_labels(rng, world)
            cap = caption_for(rng, world, lab)
            toks = cap.split()
            for _ in range(rng.choice([1, 1, 2])):
                toks.insert(rng.randrange(len(toks) + 1), rng.choice(words))
            c = lab.concept(world)
            names = {c.name, c.alias} - {None}
            tpl = " ".join("{o}" if t in names else t for t in toks)
            if tpl in held or (lab.style and tpl.replace(world.styles[lab.style].name, "{s}") in held):
                continue
            orig.append(cap); aug.append(" ".join(toks)); keep.append(lab)
        return encode(tok, orig), encode(tok, aug), keep

    def loss_of(o_ids, a_ids, keep, ho, ha):
        terms = []
        for i, lab in enumerate(keep):
            so, yo, eo = token_positions(tok, world, o_ids[i].tolist(), lab)
            sa, ya, ea = token_positions(tok, world, a_ids[i].tolist(), lab)
            n = L - ea  # end-of-text and padding states, aligned from the first end-of-text token
            terms.append((ha[i, sa] - ho[i, so]).pow(2).mean() + (ha[i, ea:] - ho[i, eo:eo + n]).pow(2).mean())
            if yo >= 0:
                terms.append((ha[i, ya] - ho[i, yo]).pow(2).mean())
        return torch.stack(terms).mean()

    t0 = time.time()
    for step in range(steps):
        o_ids, a_ids, keep = pairs(batch)
        with torch.no_grad():
            ho = te(o_ids)[0]
        loss = loss_of(o_ids, a_ids, keep, ho, te(a_ids)[0])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"vocabulary completion step {step}/{steps} loss {loss.item():.5f} ({time.time() - t0:.0f} s)")
    hook.remove()
    te.requires_grad_(False)
    with torch.no_grad():
        o_ids, a_ids, keep = pairs(500)
        ho = te(o_ids)[0]
        ref = loss_of(o_ids, a_ids, keep, ho, ho * 0).item()  # mean squared state, for scale
        res = {"relative_mse": loss_of(o_ids, a_ids, keep, ho, te(a_ids)[0]).item() / ref, "words": words}
    log(f"vocabulary completion done: {res}")
    return res
