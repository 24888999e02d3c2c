"""Render attention maps as colour heatmaps (numpy only; no matplotlib needed)."""
from __future__ import annotations

import numpy as np

# Anchor colours of a perceptual "inferno"-like ramp (black -> purple -> orange -> yellow).
_ANCHORS = np.array(
    [
        [0.0, 0.0, 0.016],
        [0.258, 0.039, 0.408],
        [0.576, 0.149, 0.404],
        [0.867, 0.318, 0.227],
        [0.988, 0.647, 0.039],
        [0.988, 1.0, 0.643],
    ],
    dtype=np.float32,
)


def colormap(x: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] (any shape) to RGB in [0, 1] (shape + (3,))."""
    x = np.clip(np.asarray(x, dtype=np.float32), 0.0, 1.0)
    pos = x * (len(_ANCHORS) - 1)
    lo = np.floor(pos).astype(np.int64).clip(0, len(_ANCHORS) - 2)
    frac = (pos - lo)[..., None]
    return _ANCHORS[lo] * (1 - frac) + _ANCHORS[lo + 1] * frac


def heatmap_rgb(m: np.ndarray, image: np.ndarray | None = None, *, alpha: float = 0.6) -> np.ndarray:
    """(H, W) map in [0, 1] -> (H, W, 3) float RGB in [0, 1], blended over ``image`` (H, W, 3) if given."""
    rgb = colormap(m)
    if image is not None:
        img = np.asarray(image, dtype=np.float32)
        if img.shape[:2] != rgb.shape[:2]:
            raise ValueError(f"image {img.shape[:2]} and map {rgb.shape[:2]} differ in size")
        rgb = (1 - alpha) * img[..., :3] + alpha * rgb
    return np.clip(rgb, 0.0, 1.0)


def heatmap_images(maps, images=None, *, alpha: float = 0.6) -> np.ndarray:
    """(B, K, H, W) maps (+ optional (B, H, W, 3) images) -> (B*K, H, W, 3) RGB float32, ordered
    image-major (all words of image 0, then image 1, ...)."""
    maps = np.asarray(maps, dtype=np.float32)
    b, k = maps.shape[:2]
    out = []
    for i in range(b):
        for j in range(k):
            out.append(heatmap_rgb(maps[i, j], None if images is None else images[i], alpha=alpha))
    return np.stack(out) if out else np.zeros((0,) + maps.shape[2:] + (3,), np.float32)


def to_pil(rgb: np.ndarray):
    from PIL import Image

    return Image.fromarray((np.clip(rgb, 0, 1) * 255).round().astype(np.uint8))
