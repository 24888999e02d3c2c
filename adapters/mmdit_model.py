"""Host adapter for the MMDiT families in diffusers (FluxPipeline, StableDiffusion3Pipeline).

Text reaches an MMDiT through two linear maps of frozen text-encoder outputs (the family table's
``text_readers``): the context embedder, which reads every token's text state, and the pooled-text
embedder, which reads one pooled vector per prompt. They read different key spaces, so the
engines ask this adapter for the key encoders of each space (:meth:`MMDiTModel.key_spaces`); each
encoder turns prompts into key rows with the interface of :class:`..engines.keys.KeyEncoder`
(``prefetch``, ``last_token_keys``), and everything downstream (targets, preserve set, solve) is
the same as for a UNet.

Keys are exactly what the transformer reads: the pipeline's own ``encode_prompt`` at the family's
``max_sequence_length``. T5 is bidirectional and the pipelines run it without an attention mask,
so a token's state depends on the whole prompt and on the padding: keys are taken from full,
padded encodings (no prefix shortcut as for causal CLIP), and the sequence length is part of the
delta's metadata.

Which token is a prompt's key in the token-state space (``token: last``; ``aligned`` and ``all``
take every row from the subject on, ``all`` also the template's rows before it: see
:class:`_Keys`):

* FLUX: the T5 state at the concept's last T5 token;
* SD3: two rows, the CLIP-L ‖ CLIP-G state at the concept's last CLIP token and the T5 state at
  its last T5 token (both reach the transformer through the same context embedder);
* a prompt whose concept is empty (the guide "" of an object erase, the preserved "") uses the
  CLIP BOS state and the T5 EOS state.
"""
from __future__ import annotations

import contextlib

import torch

from ..core.delta import fingerprint
from ..core.progress import tqdm
from ..core.prompts import Prompt
from .base import PromptTooLongError, canonical_text_path
from .diffusers_model import pipeline_weights
from .families import (
    ALL_TEXT_ENCODERS,
    FAMILIES,
    UnknownFamilyError,
    detect_family,
    encoder_kind,
    encoders_from_configs,
)


def t5_length(pipe, family: str) -> int:
    """T5 tokens the pipeline should pad to: the family's default, unless the T5 tokenizer says its
    model is shorter (the FLUX testbed: 32). Keys and sampling must use the same length."""
    tok = pipe.tokenizer_2 if family == "flux" else pipe.tokenizer_3
    return int(min(FAMILIES[family].max_sequence_length, tok.model_max_length))


class MMDiTModel:
    """A FluxPipeline or StableDiffusion3Pipeline seen by the engines (``family`` "flux" | "sd3")."""

    def __init__(self, pipe, *, max_sequence_length: int | None = None, batch_size: int = 16,
                 autocast_dtype: torch.dtype | None = None):
        self.pipe = pipe
        self.batch_size = batch_size
        self.autocast_dtype = autocast_dtype
        configs = {c: getattr(pipe, c).config for c in ALL_TEXT_ENCODERS if getattr(pipe, c, None) is not None}
        self.family = detect_family(encoders_from_configs(configs))
        fam = FAMILIES[self.family]
        if fam.denoiser != "transformer":
            raise UnknownFamilyError(f"{self.family} is a UNet family; use DiffusersModel")
        self.readers = fam.text_readers
        self.tokenizer = pipe.tokenizer  # CLIP's (BOS/EOS ids)
        self.t5_tokenizer = pipe.tokenizer_2 if self.family == "flux" else pipe.tokenizer_3
        self.max_sequence_length = int(max_sequence_length or t5_length(pipe, self.family))
        self.max_tokens = self.tokenizer.model_max_length
        self.key_dim = int(pipe.transformer.config.joint_attention_dim)
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._rows: dict[tuple[str, int], tuple[dict, torch.Tensor]] = {}  # see last_rows
        self._cache_fingerprint: str | None = None  # of the text encoders the caches were encoded with

    # -- tokens ---------------------------------------------------------------
    def token_ids(self, text: str) -> list[int]:
        """Content CLIP token ids of ``text`` (no BOS/EOS): the text-encoder editors' CLIP keys."""
        return self.tokenizer(text, add_special_tokens=False).input_ids

    # -- encoding -------------------------------------------------------------
    @torch.no_grad()
    def encode(self, texts: list[str], *, cached: bool = True) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """text -> (token states (L, key_dim), pooled (P,)) as the transformer reads them, in the text
        encoders' dtype (the cache holds every token state: a bf16 T5's stay bf16, half the memory;
        ``_Keys`` casts the rows it selects to float32); each distinct text encoded once, in
        batches, through the pipeline's ``encode_prompt``.
        The cache is dropped when the text encoders' weights change (a text-encoder delta applied or
        removed, a LoRA fused), so keys always come from the encoders as they are now;
        ``cached=False`` encodes without reading or filling the cache (e.g. a large caption corpus)."""
        if not cached:  # reads no cache, so no fingerprint to check (last_rows calls this per batch)
            saved, self._cache = self._cache, {}
            try:
                return self._encode(texts)
            finally:
                self._cache = saved
        self._drop_stale_caches()
        return self._encode(texts)

    def clear_caches(self) -> None:
        """Forget every cached encoding (full states and last-token rows)."""
        self._cache, self._rows = {}, {}

    def _drop_stale_caches(self) -> None:
        fp = fingerprint(self.text_encoder_weights())
        if fp != self._cache_fingerprint:
            self.clear_caches()
            self._cache_fingerprint = fp

    @property
    def segments(self) -> tuple:
        """The token-state key segments of this family's context (see :class:`_Segment`)."""
        return (_T5,) if self.family == "flux" else (_CLIP, _T5_AFTER_CLIP)

    def last_rows(self, prompts: list[Prompt]) -> list[tuple[dict, torch.Tensor]]:
        """Per prompt: {segment: its token state at the concept's last token} and the pooled vector,
        float32 -- everything ``token: last`` reads. Only these rows are kept: a FLUX prompt's states
        are 512 x 4096 (8 MB in float32), so 1,000 concepts' full states took ~17 GB; their last rows
        take ~40 MB. A prompt whose full states are cached (an aligned selection) is not re-encoded."""
        self._drop_stale_caches()
        todo = list({(p.text, p.subject_end): p for p in prompts if (p.text, p.subject_end) not in self._rows}.values())
        starts = range(0, len(todo), self.batch_size)
        for s in tqdm(starts, desc="encoding prompts", disable=len(starts) < 8, leave=False):
            chunk = todo[s : s + self.batch_size]
            full = {t: self._cache[t] for t in {p.text for p in chunk} if t in self._cache}
            full.update(self.encode([p.text for p in chunk if p.text not in full], cached=False))
            for p in chunk:
                st, pooled = full[p.text]
                # copies: a row of float32 states is a view that would keep the whole batch alive
                rows = {seg: seg.rows(self, st)[seg.index(self, p)].to(torch.float32, copy=True) for seg in self.segments}
                self._rows[(p.text, p.subject_end)] = (rows, pooled.to(torch.float32, copy=True))
        return [self._rows[(p.text, p.subject_end)] for p in prompts]

    def _encode(self, texts: list[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Encode the texts the cache lacks into it; the cache's texts' encodings."""
        todo = [t for t in dict.fromkeys(texts) if t not in self._cache]
        for t in todo:
            self._check_length(t)
        dev = self.pipe.text_encoder.device
        ctx = torch.autocast(dev.type, dtype=self.autocast_dtype) if self.autocast_dtype else contextlib.nullcontext()
        with ctx:
            self._encode_batches(todo)
        return {t: self._cache[t] for t in texts}

    def _encode_batches(self, todo: list[str]) -> None:
        starts = range(0, len(todo), self.batch_size)
        for s in tqdm(starts, desc="encoding prompts", disable=len(starts) < 8, leave=False):
            chunk = todo[s : s + self.batch_size]
            if self.family == "flux":
                states, pooled, _ = self.pipe.encode_prompt(chunk, prompt_2=None, max_sequence_length=self.max_sequence_length)
            else:
                states, _, pooled, _ = self.pipe.encode_prompt(chunk, prompt_2=None, prompt_3=None,
                                                               do_classifier_free_guidance=False,
                                                               max_sequence_length=self.max_sequence_length)
            for i, t in enumerate(chunk):
                self._cache[t] = (states[i].cpu(), pooled[i].cpu())  # encoder dtype: see encode

    def _check_length(self, text: str) -> None:
        """Refuse what the pipeline would silently truncate: the key would be another prompt's."""
        n_clip = len(self.tokenizer(text, add_special_tokens=False).input_ids) + 2
        if n_clip > self.max_tokens:
            raise PromptTooLongError(text, n_clip, self.max_tokens)
        n_t5 = len(self.t5_tokenizer(text).input_ids)
        if n_t5 > self.max_sequence_length:
            raise PromptTooLongError(text, n_t5, self.max_sequence_length)

    def clip_index(self, p: Prompt) -> int:
        """Position of the concept's last CLIP token (BOS is 0; an empty concept: BOS)."""
        return len(self.tokenizer(p.text[: p.subject_end], add_special_tokens=False).input_ids)

    def t5_index(self, p: Prompt) -> int:
        """Position of the concept's last T5 token (an empty concept: the prompt's EOS)."""
        n_sub = len(self.t5_tokenizer(p.text[: p.subject_end], add_special_tokens=False).input_ids)
        if n_sub == 0 or not p.text[: p.subject_end].strip():
            return len(self.t5_tokenizer(p.text, add_special_tokens=False).input_ids)  # EOS follows the content
        return n_sub - 1

    # -- key spaces -----------------------------------------------------------
    def key_spaces(self) -> dict[str, tuple[dict[str, torch.nn.Parameter], list]]:
        """space -> (its text readers' weights, the key encoders whose rows it solves for)."""
        ws = self.weights([r.module for r in self.readers])
        out = {}
        for space in ("states", "pooled"):
            layers = {r.module: ws[r.module] for r in self.readers if r.space == space}
            if space == "pooled":
                encs = [_Keys(self, None)]
            elif self.family == "flux":
                encs = [_Keys(self, _T5)]
            else:  # SD3: CLIP tokens first, then T5 tokens, in one sequence
                encs = [_Keys(self, _CLIP), _Keys(self, _T5_AFTER_CLIP)]
            out[space] = (layers, encs)
        return out

    # -- layers ---------------------------------------------------------------
    def weights(self, names) -> dict[str, torch.nn.Parameter]:
        return pipeline_weights(self.pipe, names, self.family)

    def all_weights(self) -> dict[str, torch.nn.Parameter]:
        """Every Linear weight of the transformer and the text encoders, canonical names."""
        out = {f"transformer.{n}": m.weight for n, m in self.pipe.transformer.named_modules()
               if isinstance(m, torch.nn.Linear)}
        return {**out, **self.text_encoder_weights()}

    def text_encoder_weights(self) -> dict[str, torch.Tensor]:
        """Every Linear weight of the text encoders (what the keys depend on), canonical names."""
        out = {}
        for comp in ALL_TEXT_ENCODERS:
            m = getattr(self.pipe, comp, None)
            if m is None:
                continue
            clip = encoder_kind(m.config) != "t5"
            for name, mod in m.named_modules():
                if isinstance(mod, torch.nn.Linear):
                    out[f"{comp}.{canonical_text_path(name) if clip else name}"] = mod.weight
        return out


# Key selectors. A token-state selector is a segment of the transformer's context: where it starts,
# how long it is, which tokenizer made it and the concept's last token inside it. The pooled
# selector (None) has one row per prompt.
class _Segment:
    def __init__(self, start, length, tokenizer, index):
        self.start, self.length, self.tokenizer, self.index = start, length, tokenizer, index

    def rows(self, m: MMDiTModel, states: torch.Tensor) -> torch.Tensor:
        return states[self.start(m) : self.start(m) + self.length(m)]

    def shared_prefix(self, m: MMDiTModel, a: Prompt, b: Prompt, limit: int) -> int:
        """Leading tokens two prompts share (their template's words before the concept, after any
        BOS), at most ``limit`` (the earlier subject token)."""
        tok = self.tokenizer(m)
        ia, ib = tok(a.text).input_ids, tok(b.text).input_ids
        n = 0
        while n < min(limit, len(ia), len(ib)) and ia[n] == ib[n]:
            n += 1
        return n


_T5 = _Segment(lambda m: 0, lambda m: m.max_sequence_length, lambda m: m.t5_tokenizer, lambda m, p: m.t5_index(p))
_CLIP = _Segment(lambda m: 0, lambda m: m.max_tokens, lambda m: m.tokenizer, lambda m, p: m.clip_index(p))
_T5_AFTER_CLIP = _Segment(lambda m: m.max_tokens, lambda m: m.max_sequence_length, lambda m: m.t5_tokenizer,
                          lambda m, p: m.t5_index(p))


class _Keys:
    """Key rows of one selector, with the interface of engines.keys.KeyEncoder: ``last``, and the
    ``aligned`` / ``all`` selections (token states only; the pooled vector is one row per prompt)."""

    def __init__(self, model: MMDiTModel, segment: _Segment | None):
        self.model, self.segment = model, segment

    def prefetch(self, *groups) -> None:
        """Encode every group's prompts in one pass, keeping their last-token rows (the engines
        prefetch for the last-token selection)."""
        self.model.last_rows([p for prompts, _ in groups for p in prompts])

    def _states(self, prompts):
        enc = self.model.encode([p.text for p in prompts])
        return [enc[p.text] for p in prompts]

    def last_token_keys(self, prompts: list[Prompt], *, empty_all_tokens: bool = False):
        got = self.model.last_rows(prompts)
        rows = [pooled if self.segment is None else r[self.segment] for r, pooled in got]
        return torch.stack(rows), list(range(len(prompts)))

    def aligned_keys(self, src: list[Prompt], dst: list[Prompt], *, prefix: bool = False):
        """Rows from each subject token to the end of the segment, source and destination aligned
        from their subject tokens (UCE's aligned selection); with ``prefix`` also the rows before
        the subject that both prompts share (the template's words: T5 sees the subject from there)."""
        m, seg = self.model, self.segment
        if seg is None:
            K, _ = self.last_token_keys(src)
            T, _ = self.last_token_keys(dst)
            return K, T, list(range(len(src)))
        K, T, owners = [], [], []
        for i, (ps, pd, (ss, _), (sd, _)) in enumerate(zip(src, dst, self._states(src), self._states(dst))):
            a, b = seg.index(m, ps), seg.index(m, pd)
            rs, rd = seg.rows(m, ss), seg.rows(m, sd)
            n, far = rs.shape[0], max(a, b)
            if prefix:
                c = seg.shared_prefix(m, ps, pd, min(a, b))
                K.append(rs[:c]); T.append(rd[:c]); owners += [i] * c
            K.append(rs[a : n - (far - a)]); T.append(rd[b : n - (far - b)]); owners += [i] * (n - far)
        return torch.cat(K).float(), torch.cat(T).float(), owners

    def all_token_keys(self, prompts: list[Prompt], *, prefix: bool = False):
        """Preserve rows for the aligned selections: from the subject token (or, with ``prefix``,
        from the first token) to the end of the segment."""
        m, seg = self.model, self.segment
        if seg is None:
            return self.last_token_keys(prompts)
        rows, owners = [], []
        for i, (p, (st, _)) in enumerate(zip(prompts, self._states(prompts))):
            r = seg.rows(m, st)[0 if prefix else seg.index(m, p):]
            rows.append(r); owners += [i] * r.shape[0]
        return torch.cat(rows).float(), owners

