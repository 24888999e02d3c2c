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
    d = root / name
    if not (d / "merges.txt").exists():
        # build next to it and rename: a concurrent run never sees a half-written folder
        tmp = write_clip_tokenizer(root / f".{name}.{os.getpid()}.partial", pad_token=pad_token)
        try:
            tmp.rename(d)
        except OSError:  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
            if not (d / "merges.txt").exists():
                raise FileExistsError(f"{d} is an incomplete tokenizer folder; delete it to rebuild") from None
    return d
