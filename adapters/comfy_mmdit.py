"""Host adapter for ComfyUI's FLUX.1 and SD3.x: a MODEL (ModelPatcher) and its CLIP seen by the engines
as :class:`.mmdit_model.MMDiTModel` sees a diffusers pipeline.

Keys are what ComfyUI's own text encoders feed the model: ``clip.encode_from_tokens`` (the call
CLIPTextEncode makes) on the CLIP as wired into the node, its patches and CLIPSetLastLayer included,
one prompt at a time (its T5 states depend on the whole padded prompt; the pooled vector is
returned for the first row of a batch only). Token ids come from the HF tokenizers inside ComfyUI's
tokenizer objects and are laid out as ComfyUI's ``tokenize`` lays them out (start, end and pad
tokens, ``max_length`` / ``min_length`` / ``min_padding`` and the CLIP's tokenizer options), without
its prompt syntax: a concept "(cat:1.2)" is those characters, as in the library:

* FLUX (``FluxClipModel``): T5 states at ComfyUI's T5 length (``min_length`` 256; diffusers pads to
  512, so the two hosts' keys differ unless the diffusers adapter is given 256) for ``txt_in``, the
  CLIP-L pooled vector for ``vector_in.in_layer``;
* SD3 (``SD3ClipModel``): [CLIP-L ‖ CLIP-G penultimate, zero-padded to 4096 (77 rows) ; T5 (77 rows
  in ComfyUI, 256 in diffusers)] for ``context_embedder``, CLIP-L ‖ CLIP-G pooled for ``y_embedder.mlp.0``.

The readers' ``W0`` are the MODEL's effective weights (its patches applied, float32), as for the UNet
families (``base``: "patched" | "original", see :mod:`.comfy_model`).
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

from ..core.progress import tqdm
from .base import PromptTooLongError
from .comfy_model import (
    UNET_PREFIX,
    ComfyEditableModel,
    ComfyModelError,
    _clip_keys,
    effective_weights,
)
from .families import FAMILIES
from .mmdit_model import MMDiTModel

# ComfyUI CLIP token streams per family: stream -> (tokenizer attribute, canonical component)
STREAMS = {
    "flux": {"l": ("clip_l", "text_encoder"), "t5xxl": ("t5xxl", "text_encoder_2")},
    "sd3": {"l": ("clip_l", "text_encoder"), "g": ("clip_g", "text_encoder_2"), "t5xxl": ("t5xxl", "text_encoder_3")},
}


def mmdit_family(model_patcher) -> str | None:
    """"flux" | "sd3" for a ComfyUI FLUX.1 / SD3.x MODEL, None for any other model."""
    import comfy.model_base

    m = model_patcher.model
    if isinstance(m, comfy.model_base.SD3):
        return "sd3"
    if isinstance(m, comfy.model_base.Flux) and m.model_config.unet_config.get("image_model") == "flux":
        return "flux"
    return None


def comfy_editable_model(model_patcher, clip, *, base: str = "patched"):
    """The engines' view of a ComfyUI MODEL + CLIP: :class:`ComfyMMDiTModel` for FLUX.1 / SD3.x (their
    text readers), :class:`.comfy_model.ComfyEditableModel` for the UNet families (cross-attention)."""
    if mmdit_family(model_patcher) is not None:
        return ComfyMMDiTModel(model_patcher, clip, base=base)
    return ComfyEditableModel(model_patcher, clip, base=base)


class _StreamLayout:
    """How ComfyUI's tokenizer of one stream lays out a prompt's ids (``SDTokenizer.tokenize_with_weights``)."""

    def __init__(self, sd_tok, options: dict):
        self.tok = sd_tok
        key = sd_tok.embedding_key
        self.min_length = options.get(f"{key}_min_length", sd_tok.min_length)
        self.min_padding = options.get(f"{key}_min_padding", sd_tok.min_padding)

    def content_ids(self, text: str) -> list[int]:
        t = self.tok
        ids = t.tokenizer(text)["input_ids"]
        return list(ids[t.tokens_start : -1 if t.tokenizer_adds_end_token else None])

    def row(self, text: str) -> list[int]:
        t = self.tok
        row = ([t.start_token] if t.start_token is not None else []) + self.content_ids(text)
        row += [t.end_token] if t.end_token is not None else []
        if len(row) > t.max_length:  # ComfyUI would split the prompt into several sequences
            raise PromptTooLongError(text, len(row), t.max_length)
        row += [t.pad_token] * (self.min_padding or 0)
        if t.pad_to_max_length and len(row) < t.max_length:
            row += [t.pad_token] * (t.max_length - len(row))
        if self.min_length is not None and len(row) < self.min_length:
            row += [t.pad_token] * (self.min_length - len(row))
        return row


class ComfyMMDiTModel(MMDiTModel):
    """A ComfyUI FLUX.1 / SD3.x MODEL + CLIP seen by the engines (``family`` "flux" | "sd3")."""

    def __init__(self, model_patcher, clip, *, base: str = "patched"):
        if base not in ("patched", "original"):
            raise ValueError("base must be 'patched' or 'original'")
        if clip is None:
            raise ComfyModelError("a CLIP is needed to encode the concepts")
        family = mmdit_family(model_patcher)
        if family is None:
            raise ComfyModelError(f"not a FLUX.1 or SD3.x model ({type(model_patcher.model).__name__})")
        self.family, self.model_patcher, self.clip, self.base = family, model_patcher, clip, base
        fam = FAMILIES[family]
        self.readers = fam.text_readers
        streams = STREAMS[family]
        missing = [attr for attr, _ in streams.values() if getattr(clip.cond_stage_model, attr, None) is None]
        if missing or set(clip.tokenize("")) != set(streams):
            raise ComfyModelError(
                f"this {family} MODEL needs a CLIP with {', '.join(a for a, _ in streams.values())} (ComfyUI's "
                f"{'DualCLIPLoader type flux' if family == 'flux' else 'TripleCLIPLoader'} or the checkpoint's own); "
                f"this CLIP ({type(clip.cond_stage_model).__name__}) lacks {', '.join(missing) or 'those token streams'}")
        self._reader_keys = {r.module: f"{UNET_PREFIX}{r.original}.weight" for r in self.readers}
        sd = model_patcher.model.state_dict()
        absent = [k for k in self._reader_keys.values() if k not in sd]
        if absent:
            raise ComfyModelError(f"this {family} model has no {absent[0]}: its text readers are not where ComfyUI's "
                                  f"{family} layout puts them")
        layout = getattr(clip, "tokenizer_options", {}) or {}
        self._layouts = {s: _StreamLayout(getattr(clip.tokenizer, attr), layout) for s, (attr, _) in streams.items()}
        self.tokenizer = self._layouts["l"].tok.tokenizer  # CLIP-L's (clip_index, unknown-word warnings)
        self.t5_tokenizer = self._layouts["t5xxl"].tok.tokenizer
        self.max_tokens = int(self._layouts["l"].tok.max_length)
        t5 = self._layouts["t5xxl"]
        # the T5 rows ComfyUI pads a prompt to (FLUX 256, SD3 77); a longer prompt is refused
        self.max_sequence_length = int(max(t5.min_length or 0, (t5.tok.max_length if t5.tok.pad_to_max_length else 0)))
        if self.max_sequence_length <= 0:
            raise ComfyModelError("ComfyUI's T5 tokenizer here pads to no fixed length; the keys need one")
        self.key_dim = int(sd[self._reader_keys[fam.text_readers[0].module]].shape[1])
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._rows: dict = {}  # MMDiTModel.last_rows
        self.batch_size = 16  # prompts per last_rows step (each is encoded alone: see encode)
        self._weights: dict[str, torch.Tensor] = {}

    # -- encoding -------------------------------------------------------------
    def _check_length(self, text: str) -> None:
        for lay in self._layouts.values():
            lay.row(text)  # refuses a CLIP prompt ComfyUI would split
        n_t5 = len(self._layouts["t5xxl"].content_ids(text)) + 1
        if n_t5 > self.max_sequence_length:
            raise PromptTooLongError(text, n_t5, self.max_sequence_length)

    def tokens(self, text: str) -> dict[str, list[list[tuple[int, float]]]]:
        """ComfyUI's token dict for ``text`` (ids only, weight 1.0), as ``clip.tokenize`` makes it."""
        return {s: [[(t, 1.0) for t in lay.row(text)]] for s, lay in self._layouts.items()}

    def _drop_stale_caches(self) -> None:
        """No-op: this object lives for one node call on one CLIP (fingerprinting a T5-XXL per call
        would read 4.7 B parameters)."""

    @torch.no_grad()
    def encode(self, texts: list[str], *, cached: bool = True) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """text -> (token states (L, key_dim), pooled vector) as ComfyUI's CLIP gives them, in its
        dtype (as ``MMDiTModel.encode``); one ``encode_from_tokens`` per distinct text (a batch
        would return one pooled vector). ``cached=False``: neither read nor fill the cache."""
        cache = self._cache if cached else {}
        todo = [t for t in dict.fromkeys(texts) if t not in cache]
        for t in todo:
            self._check_length(t)
        for t in tqdm(todo, desc="encoding prompts", disable=len(todo) < 8, leave=False):
            cond, pooled = self.clip.encode_from_tokens(self.tokens(t), return_pooled=True)
            cache[t] = (cond[0].cpu(), pooled[0].cpu())
        return {t: cache[t] for t in texts}

    # -- layers ---------------------------------------------------------------
    def weights(self, names) -> dict[str, torch.Tensor]:
        names = list(names)
        todo = [n for n in names if n not in self._weights]
        bad = [n for n in todo if n not in self._reader_keys]
        if bad:
            raise KeyError(f"layer {bad[0]} is not a text reader of this ComfyUI {self.family} model")
        if todo:
            ws = effective_weights(self.model_patcher, [self._reader_keys[n] for n in todo], base=self.base)
            self._weights.update({n: ws[self._reader_keys[n]] for n in todo})
        return {n: self._weights[n] for n in names}

    def all_weights(self) -> Mapping[str, torch.Tensor]:
        return {**self.weights(list(self._reader_keys)), **self.text_encoder_weights()}

    def text_encoder_weights(self) -> Mapping[str, torch.Tensor]:
        """The CLIP's Linear weights (effective, canonical names), read one at a time when asked for:
        a FLUX T5-XXL holds 4.7 B parameters, too many to copy at once."""
        return _LazyWeights(self.clip, self.family)


class _LazyWeights(Mapping):
    """canonical text-encoder Linear name -> its effective float32 weight, computed on access."""

    def __init__(self, clip, family: str):
        self.clip = clip
        keys = set(_clip_keys(clip))
        comp = {attr: c for attr, c in STREAMS[family].values()}
        self.names = {}
        for name, mod in clip.cond_stage_model.named_modules():
            attr, _, path = name.partition(".transformer.")
            if attr in comp and isinstance(mod, torch.nn.Linear) and f"{name}.weight" in keys:
                self.names[f"{comp[attr]}.{path}"] = f"{name}.weight"

    def __getitem__(self, name):
        key = self.names[name]
        return effective_weights(self.clip.patcher, [key])[key]

    def __iter__(self):
        return iter(self.names)

    def __len__(self):
        return len(self.names)
