"""A diffusers pipeline as one original-layout state dict / single ``.safetensors`` file
(the key maps are in :mod:`.ldm_keymap`)."""
from __future__ import annotations

from pathlib import Path

import torch

from .base import canonical_text_path
from .ldm_keymap import COMPONENTS, TEXT_ENCODERS, LayoutError, pipeline_entries
from .safetensors_stream import write_safetensors


def canonical_state_dict(pipe) -> dict[str, torch.Tensor]:
    """Every tensor of the pipeline's components under canonical names (``comp.key``)."""
    out = {}
    for comp in COMPONENTS:
        m = getattr(pipe, comp, None)
        if m is None:
            continue
        for k, v in m.state_dict().items():
            out[f"{comp}.{canonical_text_path(k) if comp in TEXT_ENCODERS else k}"] = v
    return out


def to_single_file_state_dict(pipe, *, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The pipeline's UNet, VAE and text encoder(s) as one original-layout state dict.

    Tensors are the pipeline's own where no reshaping is needed (no copy); ``dtype`` casts
    floating-point tensors (e.g. ``torch.float16`` for a half-size file).
    """
    sd = canonical_state_dict(pipe)
    entries = pipeline_entries(pipe)
    used = {p for e in entries for p in e.parts}
    left = [k for k in sd if k not in used and not k.endswith("position_ids")]
    if left:
        raise LayoutError(f"{len(left)} tensor(s) have no place in the original layout, e.g. {left[0]}")
    out = {}
    for e in entries:
        t = e.combine([sd[p] for p in e.parts]).detach()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        out[e.key] = t
    return out


def save_single_file(pipe, path: str | Path, overwrite: bool = False, *, dtype: torch.dtype | None = None,
                     metadata: dict[str, str] | None = None) -> Path:
    """Write the pipeline as an original-layout ``.safetensors`` (atomically; refuses an
    existing ``path`` unless ``overwrite``)."""
    from ..core.atomic import atomic_path

    sd = to_single_file_state_dict(pipe, dtype=dtype)
    with atomic_path(path, overwrite) as tmp:
        write_safetensors(tmp, sd, metadata=metadata)
    return Path(path)
