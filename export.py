"""Bake a delta into a new model on disk. The source is never written to."""
from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .apply import apply_delta, check_compatible
from .delta import ConceptDelta
from .fileio import atomic_path


def export_diffusers(pipe, model, delta: ConceptDelta, out_dir: str | Path, *, scale: float = 1.0,
                     check_fingerprint: bool = True, overwrite: bool = False) -> Path:
    """Save ``pipe`` with ``delta`` applied as a new diffusers folder (safetensors weights)."""
    handle = apply_delta(delta, model.weights(delta.layers), scale=scale, check_fingerprint=check_fingerprint)
    try:
        with atomic_path(out_dir, overwrite, directory=True) as tmp:
            pipe.save_pretrained(str(tmp), safe_serialization=True)
    finally:
        handle.remove()
    return Path(out_dir)


def ldm_key_map(single_file: str | Path, pipe) -> dict[str, str]:
    """canonical layer name -> key in an original-layout (ldm/sgm) single-file checkpoint.

    diffusers' own converters rename tensors without copying the ones we edit, so the map is
    read off by tensor identity rather than re-implementing each family's naming scheme.
    """
    from diffusers.loaders import single_file_utils as sfu

    with safe_open(str(single_file), framework="pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}
    by_ptr = {v.data_ptr(): k for k, v in sd.items() if v.ndim == 2}
    out: dict[str, str] = {}
    unet = sfu.convert_ldm_unet_checkpoint(sd, dict(pipe.unet.config))
    for k, v in unet.items():
        if k.endswith(".weight") and v.data_ptr() in by_ptr:
            out["unet." + k[: -len(".weight")]] = by_ptr[v.data_ptr()]
    # Text encoders keep transformers' names under a family-specific prefix in SD 1.x/SDXL-L.
    for k in sd:
        for prefix, comp in (
            ("cond_stage_model.transformer.", "text_encoder."),
            ("conditioner.embedders.0.transformer.", "text_encoder."),
        ):
            if k.startswith(prefix) and k.endswith(".weight"):
                out[comp + k[len(prefix) : -len(".weight")]] = k
        # OpenCLIP layout (SD 2.x, SDXL's second encoder): resblocks.{i}.mlp.c_fc/c_proj = fc1/fc2.
        m = re.match(r"(cond_stage_model\.model|conditioner\.embedders\.1\.model)\.transformer\.resblocks\.(\d+)\.mlp\.(c_fc|c_proj)\.weight$", k)
        if m:
            comp = "text_encoder." if m.group(1).startswith("cond_stage") else "text_encoder_2."
            fc = "fc1" if m.group(3) == "c_fc" else "fc2"
            out[f"{comp}text_model.encoder.layers.{m.group(2)}.mlp.{fc}"] = k
    return out


def export_single_file(source: str | Path, pipe, model, delta: ConceptDelta, out_path: str | Path, *,
                       scale: float = 1.0, check_fingerprint: bool = True, overwrite: bool = False) -> Path:
    """Copy an original-layout ``.safetensors`` checkpoint with the delta baked in (same layout, so
    ComfyUI, A1111 and ``from_single_file`` load it like the source)."""
    check_compatible(delta, model.weights(delta.layers), check_fingerprint=check_fingerprint)
    if Path(source).resolve() == Path(out_path).resolve():
        raise ValueError("refusing to export onto the source checkpoint; choose a new output path")
    keymap = ldm_key_map(source, pipe)
    missing = [n for n in delta.layers if n not in keymap]
    if missing:
        raise ValueError(f"cannot locate {len(missing)} edited layer(s) in {Path(source).name}, e.g. {missing[0]}")
    with safe_open(str(source), framework="pt") as f:
        header = f.metadata() or {}
        sd = {k: f.get_tensor(k) for k in f.keys()}
    for name, ld in delta.layers.items():
        k = keymap[name]
        w = sd[k]
        sd[k] = (w.float() + scale * ld.dense()).to(w.dtype)
    header = dict(header, concept_edit="baked:" + str(delta.metadata.get("base_fingerprint")))
    with atomic_path(out_path, overwrite) as tmp:
        save_file(sd, str(tmp), metadata=header)
    return Path(out_path)
