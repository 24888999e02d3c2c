"""Delta files: kohya-style LoRA ``.safetensors`` and ComfyUI's full-difference (``.diff``) format.

Key naming follows kohya with diffusers block names, which both ComfyUI's LoRA loader and
diffusers' ``load_lora_weights`` understand::

    lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight
    lora_te_text_model_encoder_layers_3_mlp_fc2.lora_up.weight      (SD 1.x / 2.x)
    lora_te1_… / lora_te2_…                                          (SDXL's two encoders)

``alpha`` equals the stored rank, so the LoRA scale is exactly 1. The canonical layer names
and the delta's metadata travel in the safetensors header, so a file loads back exactly.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..adapters.safetensors_stream import read_safetensors_header
from ..core.atomic import atomic_path
from ..core.delta import ConceptDelta, LayerDelta, check_rank

META_KEY = "concept_edit"


def kohya_prefix(component: str, family: str | None) -> str:
    if component == "unet":
        return "lora_unet_"
    if component == "text_encoder":
        return "lora_te1_" if family == "sdxl" else "lora_te_"
    if component == "text_encoder_2":
        return "lora_te2_"
    raise ValueError(f"no LoRA naming for component {component!r}")


def kohya_name(canonical: str, family: str | None) -> str:
    comp, _, path = canonical.partition(".")
    return kohya_prefix(comp, family) + path.replace(".", "_")


def _header(delta: ConceptDelta, names: dict[str, str], extra: dict) -> dict[str, str]:
    return {
        META_KEY: json.dumps(delta.metadata, default=str),
        f"{META_KEY}.layers": json.dumps(names),
        f"{META_KEY}.format": json.dumps(extra),
        "ss_network_module": "networks.lora",
    }


def save_lora(delta: ConceptDelta, path: str | Path, *, rank: int | None = None, overwrite: bool = False) -> dict:
    """Write ``delta`` as a kohya LoRA. Exact when every layer's rank fits ``rank`` (None: exact);
    otherwise SVD-truncated, with each layer's relative error recorded in the metadata.

    Returns {"max_rel_error": …, "errors": {layer: err}}.
    """
    if rank is not None:
        check_rank(rank)
    family = delta.metadata.get("family")
    tensors: dict[str, torch.Tensor] = {}
    names: dict[str, str] = {}
    errors: dict[str, float] = {}
    for canonical, ld in delta.layers.items():
        if rank is not None:
            ld, err = ld.truncated(rank)
            if err:
                errors[canonical] = err
        key = kohya_name(canonical, family)
        names[key] = canonical
        # .clone(): layers may share one right factor in memory; safetensors stores each separately
        tensors[f"{key}.lora_down.weight"] = ld.down.float().clone().contiguous()
        tensors[f"{key}.lora_up.weight"] = ld.up.float().clone().contiguous()
        tensors[f"{key}.alpha"] = torch.tensor(float(ld.rank))
    info = {"kind": "lora", "rank": rank, "max_rel_error": max(errors.values(), default=0.0), "errors": errors}
    with atomic_path(path, overwrite) as tmp:
        save_file(tensors, str(tmp), metadata=_header(delta, names, info))
    return info


def save_diff(delta: ConceptDelta, path: str | Path, *, overwrite: bool = False) -> None:
    """Write dense weight differences under ``<kohya name>.diff`` (ComfyUI's diff patch format)."""
    family = delta.metadata.get("family")
    tensors, names = {}, {}
    for canonical, ld in delta.layers.items():
        key = kohya_name(canonical, family)
        names[key] = canonical
        tensors[f"{key}.diff"] = ld.dense().contiguous()
    with atomic_path(path, overwrite) as tmp:
        save_file(tensors, str(tmp), metadata=_header(delta, names, {"kind": "diff"}))


def check_delta_file(path: str | Path) -> Path:
    """Refuse, with a message naming the file, anything that is not a well-formed ``.safetensors``
    delta file (missing, a folder, another suffix, empty, truncated, random bytes, a header that
    claims more data than the file holds): checked before any tensor is read."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"delta file {path} does not exist")
    if path.is_dir():
        raise ValueError(f"{path} is a folder; a delta is a .safetensors file")
    if path.suffix.lower() != ".safetensors":
        raise ValueError(f"{path.name}: delta files are .safetensors")
    read_safetensors_header(path)
    return path


def _json(path: Path, meta: dict, key: str, default: str):
    try:
        return json.loads(meta.get(key, default))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path.name}: metadata {key!r} is not valid JSON ({e})") from None


def read_metadata(path: str | Path) -> dict:
    """The delta metadata stored in a file's header (empty for foreign LoRAs)."""
    path = check_delta_file(path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    out = _json(path, meta, META_KEY, "{}")
    if f"{META_KEY}.format" in meta:
        out["file_format"] = _json(path, meta, f"{META_KEY}.format", "{}")
    return out


def load_delta(path: str | Path, *, known_layers=None) -> ConceptDelta:
    """Load a LoRA or diff file written by :func:`save_lora`/:func:`save_diff` (or a foreign kohya
    LoRA, whose layer names are resolved against ``known_layers``: canonical names of the model)."""
    path = check_delta_file(path)
    with safe_open(str(path), framework="pt") as f:
        header = f.metadata() or {}
        names = _json(path, header, f"{META_KEY}.layers", "{}")
        meta = _json(path, header, META_KEY, "{}")
        keys = list(f.keys())
        groups: dict[str, dict[str, torch.Tensor]] = {}
        for k in keys:
            base, _, kind = k.partition(".")
            groups.setdefault(base, {})[kind] = f.get_tensor(k)
    if not names:
        if known_layers is None:
            raise ValueError(f"{path.name} has no ConceptEdit layer map; pass the model's layer names to resolve it")
        family = meta.get("family")
        lookup = {}
        for c in known_layers:
            for fam in (family, "sdxl"):
                try:
                    lookup[kohya_name(c, fam)] = c
                except ValueError:
                    pass
        names = {b: lookup[b] for b in groups if b in lookup}
        unknown = [b for b in groups if b not in lookup]
        if unknown:
            raise ValueError(f"{path.name}: {len(unknown)} LoRA keys match no layer of the model, e.g. {unknown[0]}")
    layers = {}
    for base, parts in groups.items():
        canonical = names[base]
        if "diff" in parts:
            dense = parts["diff"].float()
            layers[canonical] = LayerDelta(dense, torch.eye(dense.shape[1])).compact()
        else:
            up, down = parts["lora_up.weight"].float(), parts["lora_down.weight"].float()
            scale = float(parts["alpha"]) / down.shape[0] if "alpha" in parts else 1.0
            layers[canonical] = LayerDelta(up * scale, down)
    return ConceptDelta(layers, meta)
