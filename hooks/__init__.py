"""Cross-attention map capture (diffusers attention processor, ComfyUI attn2 patch) and heatmaps.

Nothing here imports ComfyUI or diffusers at import time.
"""
from .attention_maps import (
    AttentionStore,
    ComfyAttn2Capture,
    DiffusersCrossAttentionCapture,
    install_comfy_capture,
    install_diffusers_capture,
    prompt_tokens,
    word_token_indices,
)
from .heatmap import colormap, heatmap_images, heatmap_rgb, to_pil

__all__ = [
    "AttentionStore", "ComfyAttn2Capture", "DiffusersCrossAttentionCapture", "install_comfy_capture",
    "install_diffusers_capture", "prompt_tokens", "word_token_indices", "colormap", "heatmap_images",
    "heatmap_rgb", "to_pil",
]
