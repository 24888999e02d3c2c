"""Attention-map nodes: capture cross-attention while sampling, then render heatmaps for words."""
from __future__ import annotations

import numpy as np
import torch

from ..hooks.attention_maps import (
    AttentionStore,
    install_comfy_capture,
    prompt_tokens,
    word_token_indices,
)
from ..hooks.heatmap import heatmap_images
from .common import CAPTURE_TYPE, CATEGORY, parse_list


class AttentionCapture:
    """Returns a clone of MODEL whose cross-attention is recorded while it samples (positive and
    negative prompts kept apart). Feed the MODEL to a sampler and the capture to Attention Heatmaps."""

    RETURN_TYPES = ("MODEL", CAPTURE_TYPE)
    RETURN_NAMES = ("model", "attention")
    FUNCTION = "capture"
    CATEGORY = CATEGORY

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",)}}

    def capture(self, model):
        m, cap = install_comfy_capture(model, AttentionStore())
        return (m, cap)


def _tokenizer(clip):
    if clip is None:
        return None
    tok = clip.tokenizer
    for name in ("clip_l", "clip_h", "clip_g"):
        t = getattr(tok, name, None)
        if t is not None and hasattr(t, "tokenizer"):
            return t.tokenizer
    raise ValueError("this CLIP has no CLIP tokenizer")


def render_heatmaps(store: AttentionStore, tokenizer, prompt: str, words: list[str], images: torch.Tensor | None,
                    branch: str = "positive", overlay: bool = True, alpha: float = 0.6, size=None):
    """(IMAGE tensor (N, H, W, 3), info) for ``words`` of ``prompt``: one heatmap per image and word."""
    if images is not None:
        size = tuple(images.shape[1:3])
    if size is None:
        raise ValueError("need images or a size")
    idx = word_token_indices(tokenizer, prompt, words)
    missing = [w for w, v in idx.items() if not v]
    if missing:  # a dark map would look like "not attended"; say what is wrong instead
        raise ValueError(f"not in the prompt: {', '.join(repr(w) for w in missing)}; the prompt's words are: "
                         f"{' '.join(t['text'] for t in prompt_tokens(tokenizer, prompt))}")
    maps = store.maps(branch, [idx[w] for w in words], size).numpy()  # (B, K, H, W)
    imgs = None
    if images is not None and overlay:
        n = min(maps.shape[0], images.shape[0])
        maps, imgs = maps[:n], images[:n].detach().float().cpu().numpy()
    rgb = heatmap_images(maps, imgs, alpha=alpha)
    info = {"words": words, "missing": missing, "branch": branch, "token_indices": idx,
            "layers": len(store.layers), "steps": len(store.steps)}
    return torch.from_numpy(np.ascontiguousarray(rgb, dtype=np.float32)), info


class AttentionHeatmaps:
    """Heatmap IMAGEs of how much each chosen word of the prompt was attended to, aggregated over
    layers and steps, upsampled to the image (optionally overlaid on it): one image per word."""

    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("heatmaps",)
    FUNCTION = "render"
    CATEGORY = CATEGORY

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "attention": (CAPTURE_TYPE,),
                "images": ("IMAGE",),
                "clip": ("CLIP",),
                "prompt": ("STRING", {"multiline": True, "default": "", "tooltip": "The positive (or negative) prompt that was sampled"}),
                "words": ("STRING", {"default": "", "tooltip": "Words of the prompt to map, comma-separated (pick them on the node)"}),
            },
            "optional": {
                "branch": (["positive", "negative"], {"default": "positive"}),
                "overlay": ("BOOLEAN", {"default": True}),
                "alpha": ("FLOAT", {"default": 0.6, "min": 0.0, "max": 1.0, "step": 0.05}),
            },
        }

    @classmethod
    def IS_CHANGED(cls, **kw):
        return float("nan")  # the capture fills up while the sampler runs: always re-render

    def render(self, attention, images, clip, prompt, words, branch="positive", overlay=True, alpha=0.6):
        tok = _tokenizer(clip)
        chosen = parse_list(words)
        if not chosen:
            raise ValueError("choose at least one word of the prompt (the 'words' field)")
        store = attention.store if hasattr(attention, "store") else attention
        out, info = render_heatmaps(store, tok, prompt, chosen, images, branch, overlay, alpha)
        info["tokens"] = prompt_tokens(tok, prompt)
        return {"ui": {"concept_edit_attention": [info]}, "result": (out,)}
