"""What the attention-map nodes do: capture cross-attention while sampling, then render heatmaps for\nwords. Their V3 node classes are in ``comfy_v3.py``."""
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
from .common import parse_list


def capture(model):
    """Attention Capture: a clone of MODEL whose cross-attention is recorded while it samples
    (positive and negative prompts kept apart), and the capture to render from."""
    return install_comfy_capture(model, AttentionStore())


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


def heatmaps_node(attention, images, clip, prompt: str, words: str, branch: str = "positive",
                  overlay: bool = True, alpha: float = 0.6):
    """Attention Heatmaps: ``(IMAGE, ui)``, one heatmap per image and chosen word."""
    tok = _tokenizer(clip)
    chosen = parse_list(words)
    if not chosen:
        raise ValueError("choose at least one word of the prompt (the 'words' field)")
    store = attention.store if hasattr(attention, "store") else attention
    out, info = render_heatmaps(store, tok, prompt, chosen, images, branch, overlay, alpha)
    info["tokens"] = prompt_tokens(tok, prompt)
    return out, {"concept_edit_attention": [info]}
