"""Build Stable Diffusion's CLIP tokenizer files offline from the BPE table open-clip-torch ships.

SD's ``vocab.json``/``merges.txt`` are a re-encoding of CLIP's ``bpe_simple_vocab_16e6.txt.gz``;
rebuilding them gives identical token ids with no model hub.
"""
from __future__ import annotations

import gzip
import importlib.util
import json
import os
import shutil
import string
from functools import lru_cache
from pathlib import Path

N_MERGES = 49152 - 256 - 2


def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def open_clip_bpe_path() -> Path:
    # find_spec locates the package without importing it (importing open_clip needs torchvision).
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "open-clip-torch is not installed; `pip install --no-deps open-clip-torch` provides CLIP's BPE table"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"
    if not path.exists():
        raise FileNotFoundError(f"CLIP BPE table not found at {path}")
    return path


def write_clip_tokenizer(out_dir: str | Path, *, pad_token: str = "<|endoftext|>", model_max_length: int = 77) -> Path:
    """Write a CLIPTokenizer folder (vocab.json, merges.txt, configs). SD 2.x pads with "!"."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines = gzip.open(open_clip_bpe_path()).read().decode("utf-8").split("\n")
    merges = lines[1 : N_MERGES + 1]
    units = list(_bytes_to_unicode().values())
    vocab = units + [u + "</w>" for u in units] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (out / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": pad_token})
    )
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "CLIPTokenizer",
                "model_max_length": model_max_length,
                "bos_token": "<|startoftext|>",
                "eos_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>",
                "pad_token": pad_token,
                "do_lower_case": True,
                "errors": "replace",
            }
        )
    )
    return out


def default_cache_root() -> Path:
    """``$CONCEPT_EDIT_CACHE``, else ~/.cache/concept_edit (the covariance cache's root too)."""
    return Path(os.environ.get("CONCEPT_EDIT_CACHE") or Path.home() / ".cache" / "concept_edit")


@lru_cache(maxsize=4)
def clip_tokenizer_dir(cache_root: str | None = None, pad_token: str = "<|endoftext|>") -> Path:
    """A cached tokenizer folder under :func:`default_cache_root` (or ``cache_root``)."""
    root = Path(cache_root) if cache_root else default_cache_root()
    name = "clip_tokenizer" if pad_token == "<|endoftext|>" else "clip_tokenizer_pad_bang"
    return _cached(root / name, "merges.txt", lambda tmp: write_clip_tokenizer(tmp, pad_token=pad_token))


def _cached(d: Path, marker: str, write) -> Path:
    """Folder ``d``, built by ``write(tmp)`` unless it has ``marker``: built next to it and renamed,
    so a concurrent run never sees a half-written folder."""
    if not (d / marker).exists():
        tmp = write(d.parent / f".{d.name}.{os.getpid()}.partial")
        try:
            tmp.rename(d)
        except OSError:  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
            if not (d / marker).exists():
                raise FileExistsError(f"{d} is an incomplete tokenizer folder; delete it to rebuild") from None
    return d


# ------------------------------------------------------------------ a T5-style tokenizer, offline
T5_VOCAB = 4000


def write_t5_tokenizer(out_dir: str | Path, *, vocab_size: int = T5_VOCAB, model_max_length: int = 512) -> Path:
    """A T5TokenizerFast folder built offline: a Unigram model with T5's special tokens
    (``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2), metaspace pre-tokenisation and ``</s>`` appended, as
    T5's sentencepiece tokenizer does. Trained (``tokenizers``) on the whole words of CLIP's BPE
    table, so ordinary English words are single tokens or a few pieces; deterministic."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import T5TokenizerFast

    lines = gzip.open(open_clip_bpe_path()).read().decode("utf-8").split("\n")[1 : N_MERGES + 1]
    words = sorted({"".join(m.split())[: -len("</w>")] for m in lines if m.endswith("</w>")})
    words = [w for w in words if w.isascii() and w.isalpha()]
    words += [w.capitalize() for w in words[::3]]  # T5 is case-sensitive: names come capitalised
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace("  ", " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"],
                                      unk_token="<unk>", shrinking_factor=0.75, show_progress=False,
                                      initial_alphabet=list(string.ascii_letters + string.digits + string.punctuation))
    tok.train_from_iterator(words, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", tok.token_to_id("</s>"))])
    out = Path(out_dir)
    fast = T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                           extra_ids=0, model_max_length=model_max_length)
    fast.save_pretrained(str(out))
    return out


@lru_cache(maxsize=2)
def t5_tokenizer_dir(cache_root: str | None = None) -> Path:
    """A cached T5-style tokenizer folder under :func:`default_cache_root` (or ``cache_root``)."""
    root = Path(cache_root) if cache_root else default_cache_root()
    return _cached(root / f"t5_tokenizer_{T5_VOCAB}", "tokenizer.json", write_t5_tokenizer)
