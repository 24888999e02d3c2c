"""A CLIPTokenizer whose vocabulary is the testbed grammar: every word is a single token."""
from __future__ import annotations

import json
from pathlib import Path

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _symbols(word: str) -> list[str]:
    return list(word[:-1]) + [word[-1] + "</w>"]


def build_vocab(words: list[str]) -> tuple[dict[str, int], list[str]]:
    """vocab (token -> id) and BPE merges so each word of ``words`` is one ``word</w>`` token.

    A plain BPE training run over the word list (each word once) until no pair is left:
    applying the learned merges in rank order reproduces training, so every word ends as a
    single token. Ties break on the pair itself, so the result is deterministic.
    """
    from collections import defaultdict

    letters = sorted({ch for w in words for ch in w} | set("abcdefghijklmnopqrstuvwxyz"))
    vocab: list[str] = []
    seen = set()

    def add(t):
        if t not in seen:
            seen.add(t)
            vocab.append(t)

    for ch in letters:
        add(ch)
    for ch in letters:
        add(ch + "</w>")
    segs = [_symbols(w) for w in sorted(set(words))]
    counts: dict[tuple[str, str], int] = defaultdict(int)
    where: dict[tuple[str, str], set[int]] = defaultdict(set)
    for i, sg in enumerate(segs):
        for a, b in zip(sg, sg[1:]):
            counts[(a, b)] += 1
            where[(a, b)].add(i)
    merges: list[str] = []
    while counts:
        best = max(counts.items(), key=lambda kv: (kv[1], kv[0]))[0]
        a, b = best
        merges.append(f"{a} {b}")
        add(a + b)
        for i in list(where.pop(best, ())):
            sg = segs[i]
            for x, y in zip(sg, sg[1:]):
                counts[(x, y)] -= 1
                where[(x, y)].discard(i)
            out, k = [], 0
            while k < len(sg):
                if k + 1 < len(sg) and sg[k] == a and sg[k + 1] == b:
                    out.append(a + b)
                    k += 2
                else:
                    out.append(sg[k])
                    k += 1
            segs[i] = out
            for x, y in zip(out, out[1:]):
                counts[(x, y)] += 1
                where[(x, y)].add(i)
        counts = defaultdict(int, {k: v for k, v in counts.items() if v > 0})
    add(BOS)
    add(EOS)
    return {t: i for i, t in enumerate(vocab)}, merges


def write_tokenizer(out_dir: str | Path, words: list[str], model_max_length: int = 77) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_vocab(words)
    (out / "vocab.json").write_text(json.dumps(vocab))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (out / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS})
    )
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "CLIPTokenizer",
                "model_max_length": model_max_length,
                "bos_token": BOS,
                "eos_token": EOS,
                "unk_token": EOS,
                "pad_token": EOS,
                "do_lower_case": True,
                "errors": "replace",
            }
        )
    )
    return out


def all_words(world) -> list[str]:
    from .grammar import GRAMMAR_WORDS

    words = set(GRAMMAR_WORDS)
    for c in world.objects + world.professions:
        words.add(c.name)
        if c.alias:
            words.add(c.alias)
    for s in world.artists:
        words.add(s.name)
    return sorted(words)


def write_t5_tokenizer(out_dir: str | Path, words: list[str], model_max_length: int = 32) -> Path:
    """A ``T5TokenizerFast`` folder for the FLUX testbed: T5's special tokens (``<pad>`` 0,
    ``</s>`` 1, ``<unk>`` 2, ``</s>`` appended) and sentencepiece-style pieces (``▁word``), one per
    grammar word, as in the CLIP-style tokenizer; punctuation is its own piece (``▁lubav`` ``,``).
    Equal scores: the unigram segmentation with the fewest pieces, the whole word, wins."""
    from transformers import T5TokenizerFast

    words = sorted(set(words))
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -1.0)]
    pieces += [("▁" + w, -1.0) for w in words if w.isalnum()] + [(w, -1.0) for w in words if not w.isalnum()]
    out = Path(out_dir)
    T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=model_max_length).save_pretrained(str(out))
    return out
