"""The host-neutral view of a model that every editing engine works through.

An adapter per host (diffusers pipeline, ComfyUI MODEL/CLIP) implements this; engines never
import diffusers or ComfyUI themselves. Layer names are canonical: diffusers module paths
prefixed by the pipeline component (``unet.``, ``text_encoder.``, ``text_encoder_2.``).
"""
from __future__ import annotations

import torch

CROSS_ATTN_SUFFIXES = ("attn2.to_k", "attn2.to_v")


class PromptTooLongError(ValueError):
    def __init__(self, text: str, n: int, limit: int):
        super().__init__(f"prompt {text!r} is {n} tokens long; the tokenizer limit is {limit} (including BOS/EOS)")


def content_ids(model, text: str) -> list[int]:
    """Content token ids of ``text`` (no BOS/EOS) on ``model``; refuses a prompt that with BOS
    and EOS exceeds the model's ``max_tokens`` (the pipeline would silently truncate it)."""
    ids = model.token_ids(text)
    if len(ids) + 2 > model.max_tokens:
        raise PromptTooLongError(text, len(ids) + 2, model.max_tokens)
    return ids


class EditableModel:
    """Protocol (duck-typed) of what engines need from a model.

    Attributes: ``family`` ("sd1" | "sd2" | "sdxl"), ``key_dim`` (width of the text states
    the UNet's cross-attention reads), ``max_tokens`` (77), ``tokenizer`` (a CLIPTokenizer,
    used for BOS/EOS ids).
    """

    family: str
    key_dim: int
    max_tokens: int

    def token_ids(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_ids(self, id_lists: list[list[int]]) -> list[torch.Tensor]:
        raise NotImplementedError

    def padded_ids(self, text: str) -> list[int]:
        raise NotImplementedError

    def cross_attention_weights(self) -> dict[str, torch.nn.Parameter]:
        raise NotImplementedError

    def weights(self, names) -> dict[str, torch.nn.Parameter]:
        raise NotImplementedError


def text_module_path(encoder: torch.nn.Module, canonical: str) -> str:
    """Canonical text-encoder path (``text_model.encoder.layers.3.mlp.fc2``) -> the path inside
    ``encoder``: transformers >= 5 flattens CLIPTextModel (no ``text_model``), while
    CLIPTextModelWithProjection keeps it. Canonical names always carry ``text_model.``."""
    if canonical.startswith("text_model.") and not hasattr(encoder, "text_model"):
        return canonical[len("text_model."):]
    return canonical


def canonical_text_path(path: str) -> str:
    """A text-encoder module path or state-dict key -> canonical form (always with ``text_model.``,
    except the projection that CLIPTextModelWithProjection keeps beside it)."""
    if path.startswith(("text_model.", "text_projection")):
        return path
    return "text_model." + path
