"""Host adapter for diffusers pipelines: load from disk, find editable layers, encode prompts.

Implements the :class:`concept_edit.adapters.base.EditableModel` protocol that the engines use.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from ..core.progress import tqdm
from .base import (
    CROSS_ATTN_SUFFIXES,
    EditableModel,
    canonical_text_path,
    content_ids,
    text_module_path,
)
from .families import FAMILIES, detect_family, encoders_from_configs

PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin"}
PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline", "FluxPipeline", "StableDiffusion3Pipeline")


class ModelLoadError(ValueError):
    pass


def _pipeline_class(name: str):
    import diffusers

    if name not in PIPELINES:
        raise ModelLoadError(
            f"unsupported pipeline class {name!r}; ConceptEdit supports {', '.join(PIPELINES)}"
        )
    return getattr(diffusers, name)


def load_pipeline(
    path: str | Path,
    *,
    config: str | Path | None = None,
    allow_pickle: bool = False,
    dtype: torch.dtype = torch.float32,
):
    """Load a local diffusers folder or a single checkpoint file; never contacts a model hub.

    A single ``.safetensors`` file needs ``config``: a local diffusers folder of the same
    architecture (its component configs and tokenizer are used, its weights are not).
    Pickled checkpoints (.ckpt/.pt/.bin) run arbitrary code when loaded, so they are refused
    unless ``allow_pickle`` is set.
    """
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"model path {path} does not exist")
    if path.is_dir():
        index = path / "model_index.json"
        if not index.exists():
            raise ModelLoadError(f"{path} is not a diffusers folder (no model_index.json)")
        cls = _pipeline_class(json.loads(index.read_text())["_class_name"])
        kw = {"safety_checker": None, "requires_safety_checker": False} if cls.__name__ == "StableDiffusionPipeline" else {}
        if not allow_pickle:
            _refuse_pickled_components(path)
        return cls.from_pretrained(path, dtype=dtype, local_files_only=True, **kw)
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES and not allow_pickle:
        raise ModelLoadError(
            f"{path.name} is a pickled checkpoint, which can execute code when loaded; convert it to "
            ".safetensors or pass allow_pickle=True (CLI: --allow-pickle) if you trust its source"
        )
    if suffix != ".safetensors" and suffix not in PICKLE_SUFFIXES:
        raise ModelLoadError(f"unrecognised model file type {suffix!r}; expected a diffusers folder or .safetensors")
    if config is None:
        raise ModelLoadError(
            f"loading the single file {path.name} needs a local config: pass config=<diffusers folder> "
            "(CLI: --config DIR) of the same architecture; no model hub is reachable"
        )
    config = Path(config)
    cls = _pipeline_class(json.loads((config / "model_index.json").read_text())["_class_name"])
    kw = {"safety_checker": None, "requires_safety_checker": False} if cls.__name__ == "StableDiffusionPipeline" else {}
    try:
        return cls.from_single_file(str(path), config=str(config), local_files_only=True, dtype=dtype, **kw)
    except OSError as e:  # diffusers reports a missing hub file as OSError
        raise ModelLoadError(f"could not load {path.name} with config {config}: {e}") from e


def _refuse_pickled_components(folder: Path) -> None:
    """diffusers falls back to pickled ``.bin`` weights when a component has no safetensors."""
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        files = [f for f in sub.iterdir() if f.is_file()]
        pickles = [f for f in files if f.suffix.lower() in PICKLE_SUFFIXES]
        if pickles and not any(f.suffix.lower() == ".safetensors" for f in files):
            raise ModelLoadError(
                f"{sub.name}/{pickles[0].name} in {folder} is a pickled checkpoint, which can execute code when "
                "loaded; convert it to .safetensors or pass allow_pickle=True (CLI: --allow-pickle) if you trust its source"
            )


def pipeline_weights(pipe, names, family: str) -> dict[str, torch.nn.Parameter]:
    """Canonical layer names (``component.module.path``) -> the pipeline's weight parameters.
    (A T5 path never starts with ``text_model.``, so ``text_module_path`` leaves it alone.)"""
    found = {}
    for name in names:
        comp, _, sub = name.partition(".")
        owner = getattr(pipe, comp, None) or torch.nn.Module()
        if comp.startswith("text_encoder"):
            sub = text_module_path(owner, sub)
        try:
            found[name] = owner.get_submodule(sub).weight
        except AttributeError as e:
            raise KeyError(f"this {family} model does not have layer {name}") from e
    return found


def editable_model(pipe, *, autocast_dtype: torch.dtype | None = None):
    """The engines' view of a loaded pipeline: :class:`DiffusersModel` for the UNet families,
    :class:`.mmdit_model.MMDiTModel` for FLUX and SD3 (pipelines with a ``transformer``)."""
    if getattr(pipe, "transformer", None) is not None:
        from .mmdit_model import MMDiTModel

        return MMDiTModel(pipe, autocast_dtype=autocast_dtype)
    return DiffusersModel(pipe, autocast_dtype=autocast_dtype)


def repad(ids: torch.Tensor, eos: int, pad: int) -> torch.Tensor:
    """``ids`` (B x T) with every position after a row's first EOS set to ``pad`` (rows without EOS,
    e.g. prefixes, unchanged): one padded id sequence as the pipeline feeds an encoder with that padding."""
    is_eos = ids == eos
    after = (is_eos.cumsum(-1) - is_eos.long()) > 0
    return ids.masked_fill(after, pad)


class DiffusersModel(EditableModel):
    """A StableDiffusion(XL)Pipeline seen through the EditableModel protocol."""

    def __init__(self, pipe, *, autocast_dtype: torch.dtype | None = None, batch_size: int = 64):
        self.pipe = pipe
        self.autocast_dtype = autocast_dtype
        self.batch_size = batch_size
        te2 = getattr(pipe, "text_encoder_2", None)
        self.encoders = [pipe.text_encoder] + ([te2] if te2 is not None else [])
        self.tokenizer = pipe.tokenizer
        # each encoder's padding token, as the pipeline pads for it (SDXL: EOS for encoder 1, "!" for 2)
        toks = [pipe.tokenizer] + ([getattr(pipe, "tokenizer_2", None) or pipe.tokenizer] if te2 is not None else [])
        self._pads = [t.pad_token_id if t.pad_token_id is not None else t.eos_token_id for t in toks]
        self.family = detect_family(encoders_from_configs({"text_encoder": pipe.text_encoder.config,
                                                           "text_encoder_2": te2.config if te2 is not None else None}))
        self.max_tokens = self.tokenizer.model_max_length
        self.key_dim = pipe.unet.config.cross_attention_dim

    # -- tokens ---------------------------------------------------------------
    def token_ids(self, text: str) -> list[int]:
        """Content token ids of ``text`` (no BOS/EOS)."""
        return self.tokenizer(text, add_special_tokens=False).input_ids

    # -- encoding -------------------------------------------------------------
    def _hidden(self, enc, ids: torch.Tensor) -> torch.Tensor:
        if FAMILIES[self.family].penultimate:
            # SDXL's UNet reads the penultimate layer of both encoders (no final layer norm).
            out = enc(ids, output_hidden_states=True)
            return out.hidden_states[-2]
        return enc(ids)[0]

    @torch.no_grad()
    def encode_ids(self, id_lists: list[list[int]]) -> list[torch.Tensor]:
        """Hidden states the UNet reads (L_i x key_dim, float32) for full id sequences (BOS..).

        Each prompt costs only its real length: last-token keys need just the prefix up to the
        subject (CLIP is causal), and batches group prompts of equal length. Each encoder sees the
        positions after the first EOS as its own tokenizer pads them (SDXL's second pads with "!").
        """
        out: list[torch.Tensor | None] = [None] * len(id_lists)
        # Batches hold prompts of one exact length: no padding at all (CLIP is causal, so padding
        # would not change the states, but it would cost compute).
        by_len: dict[int, list[int]] = {}
        for i, ids in enumerate(id_lists):
            by_len.setdefault(len(ids), []).append(i)
        chunks = [g[s : s + self.batch_size] for _, g in sorted(by_len.items()) for s in range(0, len(g), self.batch_size)]
        dev = self.encoders[0].device
        ctx = (
            torch.autocast("cpu" if dev.type == "cpu" else dev.type, dtype=self.autocast_dtype)
            if self.autocast_dtype
            else contextlib.nullcontext()
        )
        # One autocast region for all chunks: autocast caches its low-precision weight copies
        # only until the outermost region exits.
        with ctx:
            for chunk in tqdm(chunks, desc="encoding prompts", disable=len(chunks) < 8, leave=False):
                ids = torch.tensor([id_lists[i] for i in chunk], dtype=torch.long, device=dev)
                eos = self.tokenizer.eos_token_id
                hs = torch.cat([self._hidden(enc, repad(ids, eos, pad)).float() for enc, pad in zip(self.encoders, self._pads)],
                               dim=-1)
                for r, i in enumerate(chunk):
                    out[i] = hs[r].cpu()
        return out  # type: ignore[return-value]

    def padded_ids(self, text: str) -> list[int]:
        """The ids the pipeline itself feeds for ``text``: BOS, tokens, EOS, padding to max length."""
        tok = self.tokenizer
        ids = [tok.bos_token_id, *content_ids(self, text), tok.eos_token_id]
        return ids + [tok.pad_token_id] * (self.max_tokens - len(ids))

    # -- layers ---------------------------------------------------------------
    def cross_attention_weights(self) -> dict[str, torch.nn.Parameter]:
        return {
            f"unet.{name}": mod.weight
            for name, mod in self.pipe.unet.named_modules()
            if name.endswith(CROSS_ATTN_SUFFIXES)
        }

    def weights(self, names) -> dict[str, torch.nn.Parameter]:
        """Map canonical layer names (``component.module.path``) to their weight parameters."""
        return pipeline_weights(self.pipe, names, self.family)

    def all_weights(self) -> dict[str, torch.nn.Parameter]:
        """Every Linear weight of the UNet and text encoders under canonical names."""
        out = {}
        for comp in ("unet", "text_encoder", "text_encoder_2"):
            m = getattr(self.pipe, comp, None)
            if m is None:
                continue
            for name, mod in m.named_modules():
                if isinstance(mod, torch.nn.Linear):
                    if comp != "unet":
                        name = canonical_text_path(name)
                    out[f"{comp}.{name}"] = mod.weight
        return out
