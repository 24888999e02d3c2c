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

Which token is a prompt's key in the token-state space (``token: last``):

* FLUX: the T5 state at the concept's last T5 token;
* SD3: two rows, the CLIP-L ‖ CLIP-G state at the concept's last CLIP token and the T5 state at
  its last T5 token (both reach the transformer through the same context embedder);
* a prompt whose concept is empty (the guide "" of an object erase, the preserved "") uses the
  CLIP BOS state and the T5 EOS state.
"""
from __future__ import annotations

import contextlib

import torch

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
        self.max_sequence_length = int(max_sequence_length or fam.max_sequence_length)
        self.tokenizer = pipe.tokenizer  # CLIP's (BOS/EOS ids)
        self.t5_tokenizer = pipe.tokenizer_2 if self.family == "flux" else pipe.tokenizer_3
        self.max_tokens = self.tokenizer.model_max_length
        self.key_dim = int(pipe.transformer.config.joint_attention_dim)
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    # -- encoding -------------------------------------------------------------
    @torch.no_grad()
    def encode(self, texts: list[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """text -> (token states (L, key_dim), pooled (P,)) as the transformer reads them, float32;
        each distinct text encoded once, in batches, through the pipeline's ``encode_prompt``."""
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
                self._cache[t] = (states[i].float().cpu(), pooled[i].float().cpu())

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
                encs = [_Keys(self, _pooled)]
            elif self.family == "flux":
                encs = [_Keys(self, _t5_state)]
            else:  # SD3: CLIP tokens first, then T5 tokens, in one sequence
                encs = [_Keys(self, _clip_state), _Keys(self, _t5_state_after_clip)]
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


# Row selectors: (model, prompt, states, pooled) -> key row
def _pooled(m: MMDiTModel, p: Prompt, states, pooled):
    return pooled


def _t5_state(m: MMDiTModel, p: Prompt, states, pooled):
    return states[m.t5_index(p)]


def _clip_state(m: MMDiTModel, p: Prompt, states, pooled):
    return states[m.clip_index(p)]


def _t5_state_after_clip(m: MMDiTModel, p: Prompt, states, pooled):
    return states[m.max_tokens + m.t5_index(p)]


class _Keys:
    """Key rows of one selector, with the interface the UCE target builders use."""

    def __init__(self, model: MMDiTModel, select):
        self.model, self.select = model, select

    def prefetch(self, *groups) -> None:
        self.model.encode([p.text for prompts, _ in groups for p in prompts])

    def last_token_keys(self, prompts: list[Prompt], *, empty_all_tokens: bool = False):
        enc = self.model.encode([p.text for p in prompts])
        rows = [self.select(self.model, p, *enc[p.text]) for p in prompts]
        return torch.stack(rows), list(range(len(prompts)))
