"""Host adapter for ComfyUI: the :class:`EditableModel` protocol over a MODEL (ModelPatcher) and a CLIP.

Nothing here imports ComfyUI at module import time; ``comfy`` is imported inside the methods
that need it, so the package stays importable without ComfyUI.

Which weights an edit is computed against
-----------------------------------------
ComfyUI objects carry *patches* (LoRAs, earlier concept edits, model merges) on top of the
checkpoint's weights. This adapter computes every edit against the **effective** weights — the
weights ComfyUI itself would sample with, patches included — for both halves of the model:

* keys are the states ``clip.encode_from_tokens`` gives on the CLIP as wired into the edit node
  (its LoRAs, its CLIP-skip setting and any text-encoder edits applied), i.e. exactly the text
  states the UNet will read — computed by ComfyUI's own CLIP modules on each prompt's real-length
  prefix (``comfy_clip.py``);
* the cross-attention ``W0`` of each layer is the checkpoint weight with the MODEL's patches
  applied (``comfy.lora.calculate_weight``), at full float32 precision.

So an erase placed after a style LoRA also removes the LoRA's contribution for that concept,
and two edit nodes in a chain compose like sequential edits. The resulting delta (and a LoRA
saved from it) is exact relative to that stack; its ``base_fingerprint`` is the fingerprint of
those effective weights. Pass ``base="original"`` to compute against the checkpoint's weights
instead (patches on the MODEL ignored; the CLIP still encodes with its own patches).
"""
from __future__ import annotations

import re

import torch

from ..core.progress import tqdm
from .base import CROSS_ATTN_SUFFIXES, EditableModel, PromptTooLongError, content_ids
from .comfy_clip import prefix_clip
from .families import FAMILIES, UnknownFamilyError, encoders_from_keys
from .families import detect_family as _detect_family

UNET_PREFIX = "diffusion_model."
# ComfyUI CLIP state-dict prefixes per canonical text-encoder component, by family.
CLIP_PREFIXES = {fam.name: {e.component: e.comfy_prefix for e in fam.text_encoders} for fam in FAMILIES.values()}


class ComfyModelError(ValueError):
    pass


def _unet_config(model_patcher) -> dict:
    return model_patcher.model.model_config.unet_config


def _clip_keys(clip):
    return clip.patcher.model.state_dict().keys() if hasattr(clip.patcher, "model") else clip.cond_stage_model.state_dict().keys()


def detect_family(model_patcher, clip) -> str:
    """"sd1" | "sd2" | "sdxl" from the CLIP's encoders (its state-dict prefixes ``clip_l`` /
    ``clip_h`` / ``clip_g``), checked against the UNet's context width (768 / 1024 / 2048)."""
    ctx = _unet_config(model_patcher).get("context_dim")
    if ctx is None:
        raise ComfyModelError("unsupported model: its UNet has no cross-attention context; ConceptEdit supports SD 1.x, SD 2.x and SDXL")
    try:
        return _detect_family(encoders_from_keys(_clip_keys(clip), "comfy_prefix"), cross_attention_dim=ctx)
    except UnknownFamilyError as e:
        raise ComfyModelError(str(e)) from None


def canonical_unet_names(model_patcher) -> dict[str, str]:
    """canonical ``unet.<diffusers path>`` (no ``.weight``) -> ComfyUI state-dict key of its weight."""
    import comfy.utils

    mapping = comfy.utils.unet_to_diffusers(_unet_config(model_patcher))
    out = {}
    for diff_key, comfy_key in mapping.items():
        if diff_key.endswith(".weight"):
            out["unet." + diff_key[: -len(".weight")]] = UNET_PREFIX + comfy_key
    return out


def canonical_clip_names(clip, family: str) -> dict[str, str]:
    """canonical ``text_encoder[_2].text_model...`` -> ComfyUI CLIP state-dict key of its weight."""
    keys = _clip_keys(clip)
    out = {}
    for comp, prefix in CLIP_PREFIXES[family].items():
        for k in keys:
            if k.startswith(prefix + "text_model.") and k.endswith(".weight"):
                out[f"{comp}.{k[len(prefix):-len('.weight')]}"] = k
    return out


def effective_weights(patcher, keys, *, base: str = "patched") -> dict[str, torch.Tensor]:
    """float32 copies of the named weights of a ModelPatcher, with its patches applied
    (``base="patched"``) or as stored in the checkpoint (``base="original"``).

    Uses ``get_key_patches``, which returns the un-patched weight even while another clone's
    patches are loaded into the shared module (it reads ComfyUI's backup copy).
    """
    import comfy.lora

    keys = list(keys)
    if not keys:
        return {}
    # get_key_patches walks the whole state dict; filter by top-level prefix (SDXL's CLIP has two:
    # clip_l., clip_g.) to keep it cheap.
    kp = {}
    for prefix in sorted({k.split(".")[0] + "." for k in keys}):
        kp.update(patcher.get_key_patches(prefix) if _accepts_prefix(patcher) else patcher.get_key_patches())
    out = {}
    for k in keys:
        if k not in kp:
            raise ComfyModelError(f"weight {k} not found in the ComfyUI model")
        entry = kp[k]
        w0, convert = entry[0]
        w = w0.detach().to("cpu", torch.float32, copy=True)
        if convert is not None:
            w = convert(w, inplace=True)
        if base == "patched" and len(entry) > 1:
            w = comfy.lora.calculate_weight(entry[1:], w, k, intermediate_dtype=torch.float32)
        out[k] = w.float()
    return out


def _accepts_prefix(patcher) -> bool:
    import inspect

    try:
        return "filter_prefix" in inspect.signature(patcher.get_key_patches).parameters
    except (TypeError, ValueError):
        return False


class ComfyEditableModel(EditableModel):
    """A ComfyUI MODEL (ModelPatcher) + CLIP seen through the EditableModel protocol.

    ``family`` sd1/sd2/sdxl, ``key_dim`` = UNet context width, ``max_tokens`` = 77,
    ``tokenizer`` = the HF CLIPTokenizer ComfyUI itself uses (clip_l's, or clip_h's for SD 2.x).

    ``prefix`` (default True): encode each id sequence at its real length on ComfyUI's own CLIP
    modules, batched by length (:mod:`.comfy_clip`); ``encoding`` says which path is in use:
    "prefix", or "full" (every sequence padded to 77 through ``clip.encode_from_tokens``: with
    ``prefix=False``, or for a CLIP whose encoding :mod:`.comfy_clip` does not reproduce).
    """

    def __init__(self, model_patcher, clip, *, base: str = "patched", batch_size: int = 64, prefix: bool = True):
        if base not in ("patched", "original"):
            raise ValueError("base must be 'patched' or 'original'")
        if clip is None:
            raise ComfyModelError("a CLIP is needed to encode the concepts")
        self.model_patcher = model_patcher
        self.clip = clip
        self.base = base
        self.batch_size = batch_size
        self.family = detect_family(model_patcher, clip)
        self.key_dim = int(_unet_config(model_patcher)["context_dim"])
        # token-dict keys ComfyUI encodes ("l" for SD1, "h" for SD2, "g" and "l" for SDXL)
        self._streams = list(clip.tokenize("").keys())
        self._tok = {s: getattr(clip.tokenizer, f"clip_{s}") for s in self._streams}
        primary = "l" if "l" in self._tok else self._streams[0]
        self.tokenizer = self._tok[primary].tokenizer
        self.max_tokens = int(getattr(self._tok[primary], "max_length", 77))
        self._pad = {s: int(t.pad_token) for s, t in self._tok.items()}
        self._unet_names: dict[str, str] | None = None
        self._clip_names: dict[str, str] | None = None
        self._cache: dict[str, torch.Tensor] = {}
        self._states: dict[tuple, torch.Tensor] = {}  # encodings of this CLIP, per id sequence
        self._prefix = prefix_clip(clip) if prefix else None
        self.encoding = "prefix" if self._prefix is not None else "full"

    # -- tokens ---------------------------------------------------------------
    def token_ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def padded_ids(self, text: str) -> list[int]:
        """BOS, tokens, EOS, then the primary stream's padding up to 77 (per-stream padding is
        applied in :meth:`encode_ids`)."""
        ids = [self.tokenizer.bos_token_id, *content_ids(self, text), self.tokenizer.eos_token_id]
        primary = "l" if "l" in self._pad else self._streams[0]
        return ids + [self._pad[primary]] * (self.max_tokens - len(ids))

    def _stream_ids(self, ids: list[int], stream: str) -> list[int]:
        eos = self.tokenizer.eos_token_id
        if eos not in ids:
            return list(ids)
        cut = ids.index(eos) + 1
        return list(ids[:cut]) + [self._pad[stream]] * (len(ids) - cut)

    # -- encoding -------------------------------------------------------------
    @torch.no_grad()
    def encode_ids(self, id_lists: list[list[int]]) -> list[torch.Tensor]:
        """The text states ComfyUI feeds the UNet for each full id sequence (BOS first), float32,
        each computed once per adapter (cached per sequence).

        Sequences are grouped by length and each group runs at its own length on ComfyUI's CLIP
        modules (CLIP is causal: a prefix's states are the 77-token encoding's first rows), in
        chunks of ``batch_size``; the "full" path pads each to 77 for ``clip.encode_from_tokens``.
        """
        L = self.max_tokens
        todo: dict[tuple, None] = {}
        for ids in id_lists:
            if len(ids) > L:
                raise PromptTooLongError(str(list(ids)), len(ids), L)
            if tuple(ids) not in self._states:
                todo[tuple(ids)] = None
        if todo:
            prefix = self._prefix is not None and self._prefix.prepare()
            groups: dict[int, list[tuple]] = {}
            for q in todo:  # one group per length on the prefix path; the full path pads all to L
                groups.setdefault(len(q) if prefix else L, []).append(q)
            chunks = [g[i : i + self.batch_size] for _, g in sorted(groups.items()) for i in range(0, len(g), self.batch_size)]
            for chunk in tqdm(chunks, desc="encoding prompts", disable=len(chunks) < 8, leave=False):
                rows = {s: [self._stream_ids(list(q), s) for q in chunk] for s in self._streams}
                states = self._prefix.states(rows) if prefix else self._encode_full(rows)
                for r, q in enumerate(chunk):
                    self._states[q] = states[r, : len(q)].clone()
        return [self._states[tuple(ids)] for ids in id_lists]

    def _encode_full(self, rows: dict[str, list[list[int]]]) -> torch.Tensor:
        """``clip.encode_from_tokens`` on rows padded to 77 (the exact, slow path), as separate
        sections: each is encoded on its own and concatenated along the token axis."""
        L, eos = self.max_tokens, self.tokenizer.eos_token_id
        tokens = {s: [[(t, 1.0) for t in self._stream_ids(ids + [eos] * (L - len(ids)), s)] for ids in r]
                  for s, r in rows.items()}
        n = len(next(iter(rows.values())))
        return self.clip.encode_from_tokens(tokens).reshape(n, L, -1).float().cpu()

    # -- layers ---------------------------------------------------------------
    def _names(self):
        if self._unet_names is None:
            self._unet_names = canonical_unet_names(self.model_patcher)
            self._clip_names = canonical_clip_names(self.clip, self.family)
        return self._unet_names, self._clip_names

    def comfy_key(self, name: str) -> tuple[str, str]:
        """('unet' | 'clip', ComfyUI state-dict key) for a canonical layer name."""
        unet, clip = self._names()
        if name in unet:
            return "unet", unet[name]
        if name in clip:
            return "clip", clip[name]
        raise KeyError(f"layer {name} not found in this ComfyUI model")

    def weights(self, names) -> dict[str, torch.Tensor]:
        names = list(names)
        missing = [n for n in names if n not in self._cache]
        if missing:
            groups: dict[str, dict[str, str]] = {"unet": {}, "clip": {}}
            for n in missing:
                host, key = self.comfy_key(n)
                groups[host][key] = n
            if groups["unet"]:
                ws = effective_weights(self.model_patcher, groups["unet"], base=self.base)
                self._cache.update({groups["unet"][k]: v for k, v in ws.items()})
            if groups["clip"]:
                ws = effective_weights(self.clip.patcher, groups["clip"], base="patched")
                self._cache.update({groups["clip"][k]: v for k, v in ws.items()})
        return {n: self._cache[n] for n in names}

    def cross_attention_weights(self) -> dict[str, torch.Tensor]:
        unet, _ = self._names()
        names = [n for n in unet if n.endswith(CROSS_ATTN_SUFFIXES)]
        if not names:
            raise ComfyModelError("the ComfyUI model has no cross-attention to_k/to_v layers")
        return self.weights(sorted(names, key=_natural))

    def all_weights(self) -> dict[str, torch.Tensor]:
        unet, clip = self._names()
        return self.weights(list(unet) + list(clip))

    def text_encoder_weights(self) -> dict[str, torch.Tensor]:
        """The CLIP's weights only (a delta's fingerprint covers them; the UNet is not computed)."""
        _, clip = self._names()
        return self.weights(list(clip))


def _natural(s: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def __getattr__(name):
    # moved to comfy_text_encoder (which imports this module); still importable from here
    if name in ("text_encoder_model", "_StubUNet"):
        from . import comfy_text_encoder

        return getattr(comfy_text_encoder, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
