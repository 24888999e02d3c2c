"""Preserved-key statistics C0: uncentered second moments of layer inputs over a caption corpus.

For each requested layer, C0 = mean over token positions of k k^T (d x d, float64), where k is
the input of that layer: ``text_encoder…layers.{i}.mlp.fc2`` -> the fc2 input (after the MLP
activation), or :data:`TEXT_STATES` -> the text states the UNet's cross-attention reads
(to_k / to_v input). Computed in batches with a progress bar and cached on disk as
safetensors, one file per (model fingerprint, corpus fingerprint, position mode), with the
sample count and both fingerprints in the metadata. Layers missing from a cache file are
computed and added.

Positions: ``padded`` (default) uses all 77 positions the pipeline feeds (BOS, words, EOS and
padding), i.e. exactly the keys the model sees at inference; ``tokens`` stops at EOS.

Excluding edited concepts (``exclude``): C0 stands for the knowledge to keep, so captions that
mention a concept being edited are taken out of it; otherwise the preservation term pulls the
edited keys back towards their old outputs, which matters once the edited concepts are a large
share of the corpus (1,000 edits on a corpus that names them). The full-corpus file always holds
the whole corpus. The kept captions' moments come from the *cell store* (:mod:`.c0_cells`): a
cached partition of the corpus into cells of captions with one float64 sum per (cell, layer), next
to the full-corpus file; an edit set is answered by adding the cells it keeps, and only the captions
of cells it splits (the smaller side) are encoded, once. The same edit set again (another method,
another run) or a larger one after a smaller (10 -> 100 -> 918) costs no or few encoder passes. The
store is bounded by a byte budget (``cell_budget``, default 1 GiB, at least two cells) and at most
3 stores per folder; see :mod:`.c0_cells` for the bounds and file format. ``exclusion="direct"``
(or ``$CONCEPT_EDIT_C0_EXCLUSION=direct``) keeps the earlier path: encode the dropped captions and
subtract them from the full sums, or, when most captions go, sum the kept ones directly, on every
call. Both give C0 of exactly the captions that name no excluded concept (whole words, any case;
a caption naming several is dropped once), equal up to float64 rounding.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from pathlib import Path

import torch

from ..adapters.text_encoder import (
    TEXT_STATES,
    TokenizedPrompt,
    encoder,
    encoder_batch,
    encoder_components,
    parse_fc2_name,
    run_encoder,
)
from ..core.atomic import atomic_path
from ..core.cache import cache_root
from ..core.delta import fingerprint
from ..core.progress import tqdm
from ..core.prompts import Prompt

DEFAULT_CAPTIONS = [
    "a photo of a dog running on the beach", "a cat sleeping on a sofa", "a bowl of fruit on a wooden table",
    "a city street at night with neon lights", "a mountain landscape with a lake at sunset",
    "a portrait of an old man with a beard", "a red car parked in front of a house", "a bird sitting on a branch",
    "a plate of pasta with tomato sauce", "children playing in a park", "a painting of flowers in a vase",
    "a train crossing a bridge", "a woman reading a book in a cafe", "a snowy forest in winter",
    "a bicycle leaning against a wall", "an airplane flying over the clouds", "a cup of coffee on a desk",
    "a horse grazing in a field", "a lighthouse on a rocky coast", "a group of people at a concert",
    "a close up of a butterfly on a leaf", "a kitchen with white cabinets", "a boat on a calm river",
    "a man riding a skateboard", "a castle on a hill", "an astronaut floating in space",
    "a watercolor painting of a village", "a sandwich and a glass of juice", "a street market full of vegetables",
    "a dog wearing sunglasses", "a desert with sand dunes", "a tall building made of glass",
    "a teddy bear on a bed", "an elephant walking in the savanna", "a girl with an umbrella in the rain",
    "a pizza with cheese and mushrooms", "a black and white photo of a street", "a field of sunflowers",
    "a wooden cabin in the woods", "a fish swimming in a coral reef", "",
]


DEFAULT_MAX_FILES = 4


class CovarianceCacheError(ValueError):
    pass


def file_limit(max_files: int | None = None) -> int:
    """Full-corpus C0 files kept per cache folder (``$CONCEPT_EDIT_C0_FILES``, default 4)."""
    if max_files is not None:
        return max(1, int(max_files))
    return max(1, int(os.environ.get("CONCEPT_EDIT_C0_FILES", DEFAULT_MAX_FILES)))


def evict_full_files(root: Path, keep: Path, max_files: int | None = None) -> list[str]:
    """Remove the least recently used full-corpus C0 files of ``root`` beyond the limit (``keep``,
    the file just written, stays). Each is d x d float64 per layer (SD 1.5: ~0.9 GB, SDXL: several
    GB), so an unbounded folder fills a disk; a removed file is recomputed when next needed."""
    files = sorted((p.stat().st_mtime, p) for p in Path(root).glob("c0_*_f64.safetensors") if p != keep)
    gone = []
    for _, p in files[: max(0, len(files) - (file_limit(max_files) - 1))]:
        p.unlink(missing_ok=True)
        gone.append(p.name)
    return gone


def corpus_fingerprint(captions: list[str]) -> str:
    h = hashlib.sha256()
    for c in captions:
        h.update(c.encode())
        h.update(b"\n")
    return h.hexdigest()[:16]


def model_fingerprint(model) -> str:
    """Fingerprint of every text-encoder weight (C0 of any layer depends only on those).

    Works on any EditableModel: a diffusers model is read through its pipeline, other hosts
    (ComfyUI) through ``all_weights()`` (the text-encoder entries)."""
    ws = {}
    if hasattr(model, "pipe"):
        for comp in encoder_components(model):
            for name, p in encoder(model, comp).named_parameters():
                ws[f"{comp}.{name}"] = p  # current values: C0 is a statistic of the model as it is now
    else:
        ws = {k: v for k, v in model.all_weights().items() if k.startswith("text_encoder")}
        if not ws:
            raise CovarianceCacheError("cannot fingerprint this model's text encoder (no text_encoder weights listed)")
    return fingerprint(ws)


def default_cache_dir() -> Path:
    """``covariance/`` under the cache root: ``$CONCEPT_EDIT_CACHE``, the host's folder (ComfyUI:
    ``models/concept_edit``) or ``~/.cache/concept_edit`` (core/cache.py)."""
    return cache_root() / "covariance"


def load_captions(source) -> list[str]:
    """Captions from a list, a text file (one per line) or a JSON list file; None -> built-in list."""
    if source is None:
        return list(DEFAULT_CAPTIONS)
    if isinstance(source, (list, tuple)):
        return [str(c) for c in source]
    path = Path(source)
    if not path.exists():
        raise CovarianceCacheError(f"caption corpus {path} does not exist")
    if path.suffix == ".json":
        return [str(c) for c in json.loads(path.read_text())]
    return [line.rstrip("\n") for line in path.read_text().splitlines()]


def _mention_pattern(terms):
    terms = sorted({t.strip() for t in terms if t and t.strip()}, key=len, reverse=True)
    if not terms:
        return None
    return re.compile(r"(?<!\w)(?:" + "|".join(re.escape(t) for t in terms) + r")(?!\w)", re.IGNORECASE)


def mention_mask(captions: list[str], terms) -> list[bool]:
    """Per caption: does it name any of ``terms`` (whole words, case-insensitive)?"""
    pat = _mention_pattern(terms)
    return [False] * len(captions) if pat is None else [pat.search(c) is not None for c in captions]


def split_mentions(captions: list[str], terms) -> tuple[list[str], list[str]]:
    """(kept, dropped): captions naming any of ``terms`` (whole words, case-insensitive) are dropped."""
    kept, dropped = [], []
    for c, m in zip(captions, mention_mask(captions, terms)):
        (dropped if m else kept).append(c)
    return kept, dropped


def c0_exclusions(plan) -> list[str]:
    """The concepts to leave out of C0 for ``plan``: its edited concepts, if its ``c0_exclude_edited``
    setting is on (the default; off = the paper's C0 over the whole corpus)."""
    return [e.source for e in plan.edits] if plan.settings.c0_exclude_edited else []


def _fc2_index(name: str) -> tuple[str, int]:
    try:
        return parse_fc2_name(name)
    except KeyError:
        raise CovarianceCacheError(f"covariance is computed for text-encoder fc2 layers or {TEXT_STATES!r}, not {name!r}") from None


def caption_ids(model, captions: list[str]) -> tuple[list[TokenizedPrompt], int]:
    """Captions as BOS + tokens + EOS, truncated to what the pipeline feeds (as the pipeline and
    EMCID's statistics do); returns (prompts, number truncated)."""
    tok, room = model.tokenizer, model.max_tokens - 2
    out, cut = [], 0
    for c in captions:
        ids = model.token_ids(c)
        cut += len(ids) > room
        out.append(TokenizedPrompt([tok.bos_token_id, *ids[:room], tok.eos_token_id], 0, Prompt(c, 0)))
    return out, cut


def _padded(model, p: TokenizedPrompt) -> list[int]:
    pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else model.tokenizer.eos_token_id
    return p.ids + [pad] * (model.max_tokens - len(p.ids))


def caption_sums(model, captions: list[str], names: list[str], *, batch_size: int, positions: str, progress: bool):
    """Un-normalised second moments (sum of k k^T, float64) of the named layers' inputs over
    ``captions``; returns (sums, sample counts, number of captions truncated to the tokenizer limit)."""
    prompts, n_truncated = caption_ids(model, captions)
    sums = {n: None for n in names}
    counts = {n: 0 for n in names}
    by_comp: dict[str, list[int]] = {}
    name_of: dict[tuple[str, int], str] = {}
    for n in names:
        if n != TEXT_STATES:
            comp, i = _fc2_index(n)
            by_comp.setdefault(comp, []).append(i)
            name_of[comp, i] = n
    batches = range(0, len(prompts), batch_size)
    for start in tqdm(batches, desc="C0 batches", disable=not progress, leave=False):
        chunk = prompts[start : start + batch_size]
        for comp, layers in by_comp.items():
            ids, mask = encoder_batch(model, comp, chunk, positions)  # T5: its own tokens and length
            _, st = run_encoder(model, comp, ids, None, fc2_layers=layers)
            for i in layers:
                x = st[("fc2_in", i)].to(torch.float64).cpu()[mask]
                n = name_of[comp, i]
                g = x.mT @ x
                sums[n] = g if sums[n] is None else sums[n] + g
                counts[n] += x.shape[0]
        if TEXT_STATES in names:
            ids_lists = [_padded(model, p) for p in chunk] if positions == "padded" else [p.ids for p in chunk]
            states = model.encode_ids(ids_lists)
            x = torch.cat([s.to(torch.float64) for s in states])
            g = x.mT @ x
            sums[TEXT_STATES] = g if sums[TEXT_STATES] is None else sums[TEXT_STATES] + g
            counts[TEXT_STATES] += x.shape[0]
    return sums, counts, n_truncated


def caption_moments(model, captions: list[str], names: list[str], *, batch_size: int, positions: str, progress: bool):
    """Mean second moments (float64) of the named layers' inputs over ``captions``; returns
    (moments, sample counts, number of captions truncated to the tokenizer limit)."""
    sums, counts, n_truncated = caption_sums(model, captions, names, batch_size=batch_size, positions=positions,
                                             progress=progress)
    return {n: sums[n] / counts[n] for n in names}, counts, n_truncated


def exclusion_mode(mode: str | None = None) -> str:
    """How C0 leaves captions out: ``cells`` (default; the cached partition of :mod:`.c0_cells`) or
    ``direct`` (encode the dropped captions, or the kept ones, on every call: the path before cells).
    None: ``$CONCEPT_EDIT_C0_EXCLUSION``, else ``cells``."""
    mode = mode or os.environ.get("CONCEPT_EDIT_C0_EXCLUSION") or "cells"
    if mode not in ("cells", "direct"):
        raise ValueError(f"C0 exclusion mode must be 'cells' or 'direct', not {mode!r}")
    return mode


def second_moments(
    model,
    names: list[str],
    captions=None,
    *,
    cache_dir: str | Path | None = None,
    batch_size: int = 32,
    positions: str = "padded",
    progress: bool = True,
    use_cache: bool = True,
    layers_per_pass: int = 8,
    exclude=(),
    exclusion: str | None = None,
    cell_budget: int | None = None,
) -> tuple[dict[str, torch.Tensor], dict]:
    """C0 (mean second moment, float64: accumulated, cached and returned in double precision, since
    EMCID's system is ill-conditioned enough for float32 storage to cost ~1e-4 relative error) per
    layer name; returns (moments, info).

    At most ``layers_per_pass`` layers are accumulated per pass over the corpus (each holds a
    d x d float64 sum: 200 MB for SDXL's 5120-wide fc2 inputs), so memory stays bounded.

    ``exclude``: concept names; captions mentioning them are left out of the returned moments
    (the full-corpus file always holds the full corpus). ``info["n_excluded_captions"]`` says how
    many. ``exclusion``: ``cells`` (default: from the cell store of :mod:`.c0_cells`, bounded by
    ``cell_budget`` bytes) or ``direct`` (recompute the dropped or kept captions' moments, as
    before; always so with ``use_cache=False``); see :func:`exclusion_mode`. ``info["exclusion"]``
    reports how it was done.

    ``info`` has ``n_samples`` per layer, ``corpus_fingerprint``, ``model_fingerprint``,
    ``cache_file`` and ``computed`` (layers computed in this call rather than loaded).
    """
    if positions not in ("padded", "tokens"):
        raise ValueError("positions must be 'padded' or 'tokens'")
    captions = load_captions(captions)
    if not captions:
        raise CovarianceCacheError("the caption corpus is empty")
    cfp = corpus_fingerprint(captions)
    mfp = model_fingerprint(model)
    path = None
    cached: dict[str, torch.Tensor] = {}
    meta: dict = {}
    if use_cache:
        cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        path = cache_dir / f"c0_{model.family}_{mfp}_{cfp}_{positions}_f64.safetensors"
        if path.exists():
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                meta = dict(f.metadata() or {})
                if meta.get("model_fingerprint") != mfp or meta.get("corpus_fingerprint") != cfp:
                    raise CovarianceCacheError(f"{path} does not match this model/corpus (fingerprint mismatch)")
                for k in set(names) & set(f.keys()):  # only the layers asked for (SDXL: 210 MB each)
                    cached[k] = f.get_tensor(k)
            os.utime(path)  # recently used: kept by the file limit
    counts = json.loads(meta.get("n_samples", "{}"))
    n_truncated = int(meta.get("n_truncated", 0))
    missing = [n for n in names if n not in cached]
    evicted: list[str] = []
    if missing:
        step = max(1, layers_per_pass)
        # one bar over the passes (each pass's batches fold into it), not one bar per pass
        for g in tqdm(range(0, len(missing), step), desc="C0 passes", disable=not progress or len(missing) <= step, leave=False):
            group = missing[g : g + step]
            new, new_counts, n_truncated = caption_moments(model, captions, group, batch_size=batch_size, positions=positions,
                                                           progress=progress)
            cached.update(new)
            counts.update(new_counts)
        if path is not None:
            from safetensors import safe_open
            from safetensors.torch import save_file

            keep = {}
            if path.exists():  # the cache file grows: replace it whole, with the layers it already had
                with safe_open(str(path), "pt") as f:
                    keep = {k: f.get_tensor(k) for k in f.keys() if k not in cached}
            with atomic_path(path, overwrite=True) as tmp:
                save_file(
                    {k: v.contiguous() for k, v in {**keep, **cached}.items()},
                    str(tmp),
                    metadata={
                        "model_fingerprint": mfp,
                        "corpus_fingerprint": cfp,
                        "n_captions": str(len(captions)),
                        "n_samples": json.dumps(counts),
                        "positions": positions,
                        "family": model.family,
                        "n_truncated": str(n_truncated),
                    },
                )
            del keep
            evicted = evict_full_files(path.parent, path)
    moments = {n: cached[n] for n in names}
    counts = {n: int(counts[n]) for n in names}
    mode = exclusion_mode(exclusion) if path is not None else "direct"
    drop = mention_mask(captions, exclude)
    n_dropped = sum(drop)
    xinfo, store_failed = None, False
    if n_dropped:
        if n_dropped == len(captions):
            raise CovarianceCacheError("every caption of the corpus mentions an edited concept; nothing is left to preserve")
        kw = dict(batch_size=batch_size, positions=positions, progress=progress)
        if mode == "cells":
            from .c0_cells import excluded_sums

            got = excluded_sums(
                captions, torch.tensor(drop), {n: cached[n] for n in names}, counts,
                sums_of=lambda caps, group: caption_sums(model, caps, group, **kw)[:2],
                root=path.parent, budget=cell_budget, layers_per_pass=layers_per_pass, progress=progress,
                ident={"model_fingerprint": mfp, "corpus_fingerprint": cfp, "positions": positions, "family": model.family},
            )
            if got is None:  # the store could not be written or read even after a rebuild
                mode, store_failed = "direct", True
            else:
                sums, counts, xinfo = got
                moments = {n: sums[n] / counts[n] for n in names}
        if mode == "direct":
            kept = [c for c, m in zip(captions, drop) if not m]
            xinfo = {"mode": "direct", "captions_encoded": min(n_dropped, len(kept))}
            if store_failed:
                xinfo["store_failed"] = True
            if n_dropped <= len(kept):  # subtract the few dropped captions from the cached full sums
                dropped = [c for c, m in zip(captions, drop) if m]
                m_d, n_d, _ = caption_moments(model, dropped, names, **kw)
                moments = {n: (moments[n] * counts[n] - m_d[n] * n_d[n]) / (counts[n] - n_d[n]) for n in names}
                counts = {n: counts[n] - n_d[n] for n in names}
            else:
                moments, counts, _ = caption_moments(model, kept, names, **kw)
    if n_truncated:
        warnings.warn(f"C0: {n_truncated} caption(s) longer than the tokenizer's {model.max_tokens} tokens were truncated")
    short = {n: counts[n] for n in names if counts[n] < moments[n].shape[0]}
    if short:
        warnings.warn(f"C0 of {', '.join(short)} rests on fewer samples than its width ({moments[next(iter(short))].shape[0]}): "
                      "it is rank-deficient; pass a larger caption corpus")
    info = {
        "n_samples": counts,
        "n_truncated_captions": n_truncated,
        "rank_deficient": sorted(short),
        "n_excluded_captions": n_dropped,
        "exclusion": xinfo,
        "corpus_fingerprint": cfp,
        "model_fingerprint": mfp,
        "n_captions": len(captions),
        "cache_file": str(path) if path else None,
        "computed": missing,
        "evicted_files": evicted,
    }
    return moments, info
