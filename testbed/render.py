"""Deterministic 32x32 RGB renderer of testbed concepts (numpy only)."""
from __future__ import annotations

import numpy as np

from .world import BACKGROUNDS, COLOURS, FRAMES, PATTERNS, SHAPES

SIZE = 32
RADIUS = 9.0
CENTER = (19.0, 16.0)

RGB = np.array(
    [
        (220, 30, 30), (245, 130, 20), (240, 220, 30), (150, 230, 40), (20, 140, 40),
        (30, 210, 220), (30, 60, 220), (120, 40, 180), (230, 40, 180), (130, 80, 30),
    ],
    dtype=np.float32,
)
assert len(RGB) == len(COLOURS)
CROWN_RGB = np.array((255, 200, 0), dtype=np.float32)

_YY, _XX = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)


def shape_mask(shape: int, y: np.ndarray, x: np.ndarray, r: float) -> np.ndarray:
    name = SHAPES[shape]
    d2 = x * x + y * y
    if name == "circle":
        return d2 <= r * r
    if name == "square":
        return (np.abs(x) <= 0.82 * r) & (np.abs(y) <= 0.82 * r)
    if name in ("triangle", "wedge"):
        yy = y if name == "triangle" else -y
        return (yy >= -r) & (yy <= 0.85 * r) & (np.abs(x) <= (yy + r) / 1.85)
    if name == "diamond":
        return np.abs(x) + np.abs(y) <= 1.1 * r
    if name == "plus":
        return ((np.abs(x) <= 0.36 * r) & (np.abs(y) <= r)) | ((np.abs(y) <= 0.36 * r) & (np.abs(x) <= r))
    if name == "star":
        th = np.arctan2(x, -y)
        rad = r * (0.6 + 0.4 * np.cos(5 * th))
        return np.sqrt(d2) <= rad
    if name == "hexagon":
        ax, ay = np.abs(x), np.abs(y)
        return (ay <= 0.87 * r) & (ax * 0.87 + ay * 0.5 <= 0.87 * r)
    if name == "oval":
        return (x / r) ** 2 + (y / (0.55 * r)) ** 2 <= 1
    if name == "pillar":
        return (np.abs(x) <= 0.42 * r) & (np.abs(y) <= r)
    if name == "ring":  # a crescent
        return (d2 <= r * r) & ((x - 0.45 * r) ** 2 + (y + 0.1 * r) ** 2 > (0.75 * r) ** 2)
    raise ValueError(name)


def _pattern_dark(pattern: int, y, x, mask_fn) -> np.ndarray:
    """Boolean map of the darker-shade pixels (object-relative coords)."""
    name = PATTERNS[pattern]
    yi = np.floor(y + 100).astype(np.int64)
    xi = np.floor(x + 100).astype(np.int64)
    if name == "solid":
        return np.zeros_like(y, dtype=bool)
    if name == "hstripes":
        return (yi // 5) % 2 == 0
    if name == "vstripes":
        return (xi // 5) % 2 == 0
    if name == "diagonal":  # dark lower-left half
        return x - y < 0
    if name == "checker":  # dark top-left and bottom-right quadrants
        return (x < 0) == (y < 0)
    if name == "rim":  # dark outer band, light inside
        return ~mask_fn(RADIUS * 0.55)
    if name == "core":  # dark inside, light outer band
        return mask_fn(RADIUS * 0.5)
    if name == "split":  # dark top half
        return y < 0
    if name == "vsplit":  # dark left half
        return x < 0
    raise ValueError(name)


def background(bg: int, rng: np.random.Generator | None) -> np.ndarray:
    img = np.empty((SIZE, SIZE, 3), dtype=np.float32)
    if bg < 0:
        img[:] = 255
        return img
    name = BACKGROUNDS[bg]
    if name == "light":
        img[:] = 200
    elif name == "mid":
        img[:] = 128
    elif name == "dark":
        img[:] = 60
    elif name == "black":
        img[:] = 0
    elif name == "gradient":
        img[:] = (240 - 150 * _YY / (SIZE - 1))[..., None]
    elif name == "noise":
        rng = rng or np.random.default_rng(0)
        img[:] = (128 + 40 * rng.standard_normal((SIZE, SIZE)))[..., None]
    return img


def draw_frame(img: np.ndarray, bg: int, frame: int) -> None:
    name = FRAMES[frame]
    if name == "none":
        return
    col = 255.0 if bg >= 0 and BACKGROUNDS[bg] in ("dark", "black") else 0.0
    m = np.zeros((SIZE, SIZE), dtype=bool)
    if name == "thin":
        m[0, :] = m[-1, :] = m[:, 0] = m[:, -1] = True
    elif name == "thick":
        m[:3, :] = m[-3:, :] = m[:, :3] = m[:, -3:] = True
    elif name == "double":
        for k in (0, 3):
            m[k, k:SIZE - k] = m[SIZE - 1 - k, k:SIZE - k] = True
            m[k:SIZE - k, k] = m[k:SIZE - k, SIZE - 1 - k] = True
    elif name == "corners":
        for ys in (slice(0, 2), slice(SIZE - 2, SIZE)):
            for xs in (slice(0, 7), slice(SIZE - 7, SIZE)):
                m[ys, xs] = True
        for xs in (slice(0, 2), slice(SIZE - 2, SIZE)):
            for ys in (slice(0, 7), slice(SIZE - 7, SIZE)):
                m[ys, xs] = True
    img[m] = col


def render(
    shape: int,
    colour: int,
    pattern: int,
    style_bg: int = -1,
    style_frame: int = 0,
    attribute: int = 0,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """A 32x32x3 uint8 image. ``rng`` draws the +-1 px jitter and background noise (None: centred)."""
    if rng is not None:
        dy, dx = rng.integers(-1, 2, size=2)
    else:
        dy = dx = 0
    cy, cx = CENTER[0] + dy, CENTER[1] + dx
    y, x = _YY - cy, _XX - cx
    img = background(style_bg, rng)
    mask = shape_mask(shape, y, x, RADIUS)
    if PATTERNS[pattern] == "hollow":
        inner = shape_mask(shape, y, x, RADIUS - 3.0)
        mask = mask & ~inner
        dark = np.zeros_like(mask)
    else:
        dark = _pattern_dark(pattern, y, x, lambda r: shape_mask(shape, y, x, r))
    col = RGB[colour]
    img[mask & ~dark] = col
    img[mask & dark] = col * 0.4
    draw_frame(img, style_bg, style_frame)
    if attribute:
        cyi, cxi = int(cy), int(cx)
        top = cyi - int(RADIUS) - 5
        img[top + 2 : top + 4, cxi - 4 : cxi + 5] = CROWN_RGB
        for t in (-4, 0, 4):
            img[top : top + 2, cxi + t] = CROWN_RGB
    return np.clip(img, 0, 255).astype(np.uint8)


def render_labels(world, obj_visual, style_index: int, attribute: int, rng=None) -> np.ndarray:
    st = world.styles[style_index]
    s, c, p = obj_visual
    return render(s, c, p, st.background, st.frame, attribute, rng)
