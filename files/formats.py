"""Delta files: kohya-style LoRA ``.safetensors`` and ComfyUI's full-difference (``.diff``) format.

Key naming follows kohya with diffusers block names, which both ComfyUI's LoRA loader and
diffusers' ``load_lora_weights`` understand::

    lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight
    lora_te_text_model_encoder_layers_3_mlp_fc2.lora_up.weight      (SD 1.x / 2.x)
    lora_te1_… / lora_te2_…                                          (SDXL's two encoders)

``alpha`` equals the stored rank, so the LoRA scale is exactly 1. The canonical layer names
and the delta's metadata travel in the safetensors header, so a file loads back exactly.
LoRAs made elsewhere (kohya names with the original SGM/ldm block names, peft/diffusers files)
load through diffusers' own converters (:func:`resolve_foreign`).
"""
from __future__ import annotations

import json
import math
import re
import warnings
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..adapters.base import canonical_text_path
from ..adapters.safetensors_stream import read_safetensors_header
from ..core.atomic import atomic_path
from ..core.delta import ConceptDelta, LayerDelta, check_rank

META_KEY = "concept_edit"


MMDIT_FAMILIES = ("flux", "sd3")


def kohya_prefix(component: str, family: str | None) -> str:
    """kohya prefix of a component. FLUX / SD3 text encoders are numbered in pipeline order as
    OneTrainer names them and ComfyUI's LoRA loader maps them: ``lora_te1_`` CLIP-L, FLUX
    ``lora_te2_`` T5; SD3 ``lora_te2_`` CLIP-G, ``lora_te3_`` T5."""
    if component == "unet":
        return "lora_unet_"
    if component == "text_encoder":
        return "lora_te1_" if family in ("sdxl", *MMDIT_FAMILIES) else "lora_te_"
    if component == "text_encoder_2":
        return "lora_te2_"
    if component == "text_encoder_3":
        return "lora_te3_"
    raise ValueError(f"no LoRA naming for component {component!r}")


def kohya_name(canonical: str, family: str | None) -> str:
    """The LoRA key of a layer: kohya's ``lora_unet_…``/``lora_te…`` for UNet families. MMDiT
    (``transformer.…``) layers keep their diffusers name, saved in diffusers' own LoRA format
    (``lora_A``/``lora_B``): diffusers 0.42 loads no kohya file that holds only the text readers
    (its FLUX converter drops them, it has none for SD3), and ComfyUI maps diffusers-format keys
    of both families."""
    comp, _, path = canonical.partition(".")
    if comp == "transformer":
        return canonical
    return kohya_prefix(comp, family) + path.replace(".", "_")


def _header(delta: ConceptDelta, names: dict[str, str], extra: dict) -> dict[str, str]:
    return {
        META_KEY: json.dumps(delta.metadata, default=str),
        f"{META_KEY}.layers": json.dumps(names),
        f"{META_KEY}.format": json.dumps(extra),
        "ss_network_module": "networks.lora",
    }


def kohya_state_dict(delta: ConceptDelta, rank: int | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str], dict[str, float]]:
    """The kohya LoRA tensors of ``delta`` (``alpha`` = rank, so the LoRA scale is exactly 1):
    returns (tensors, {kohya name: canonical name}, {canonical name: relative error}).

    ``rank``: None keeps every layer exact; otherwise layers of higher rank are SVD-truncated
    and their relative error recorded. Used for LoRA files and for ComfyUI patches alike.
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
        down, up = ld.down.float().clone().contiguous(), ld.up.float().clone().contiguous()
        if key == canonical:  # diffusers format: no alpha (scale 1)
            tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"] = down, up
        else:
            tensors[f"{key}.lora_down.weight"], tensors[f"{key}.lora_up.weight"] = down, up
            tensors[f"{key}.alpha"] = torch.tensor(float(ld.rank))
    return tensors, names, errors


def save_lora(delta: ConceptDelta, path: str | Path, *, rank: int | None = None, overwrite: bool = False) -> dict:
    """Write ``delta`` as a kohya LoRA. Exact when every layer's rank fits ``rank`` (None: exact);
    otherwise SVD-truncated, with each layer's relative error recorded in the metadata.

    Returns {"max_rel_error": …, "errors": {layer: err}}.
    """
    tensors, names, errors = kohya_state_dict(delta, rank)
    info = {"kind": "lora", "rank": rank, "max_rel_error": max(errors.values(), default=0.0), "errors": errors}
    te = [n for n in delta.layers if n.startswith("text_encoder")]
    if te and delta.metadata.get("family") in MMDIT_FAMILIES:
        warnings.warn(
            f"{Path(path).name}: diffusers (0.42) load_lora_weights does not load the text-encoder layers of this "
            f"{delta.metadata['family']} LoRA ({len(te)} layer(s), e.g. {te[0]}): it has no T5 LoRA support and, under "
            "transformers 5, does not place CLIP LoRA keys either; apply it with concept-edit (apply / export, "
            "files.formats.load_delta + core.apply.apply_delta) or ComfyUI's LoRA loader (docs/mmdit.md)", stacklevel=2)
    info["diffusers_loads_all"] = not (te and delta.metadata.get("family") in MMDIT_FAMILIES)
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
    """Load a LoRA or diff file written by :func:`save_lora`/:func:`save_diff`, or a LoRA made
    elsewhere (see :func:`resolve_foreign`), whose layer names are resolved against
    ``known_layers``: the model's canonical layer names."""
    path = check_delta_file(path)
    with safe_open(str(path), framework="pt") as f:
        header = f.metadata() or {}
        names = _json(path, header, f"{META_KEY}.layers", "{}")
        meta = _json(path, header, META_KEY, "{}")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if names:
        groups = _kohya_groups(tensors)
    else:
        if known_layers is None:
            raise ValueError(f"{path.name} has no ConceptEdit layer map; pass the model's layer names to resolve it")
        groups, names = resolve_foreign(tensors, known_layers, header=header, family=meta.get("family"), label=path.name)
    layers = {}
    for base, parts in groups.items():
        canonical = names[base]
        if "diff" in parts:
            dense = parts["diff"].float()
            layers[canonical] = LayerDelta(dense, torch.eye(dense.shape[1])).compact()
        else:
            if "lora_up.weight" not in parts or "lora_down.weight" not in parts:
                raise ValueError(f"{path.name}: layer {base} lacks its lora_up/lora_down pair")
            up, down = parts["lora_up.weight"].float(), parts["lora_down.weight"].float()
            if down.shape[0] == 0:
                raise ValueError(f"{path.name}: layer {base} has rank 0 (an empty LoRA layer)")
            scale = float(parts["alpha"]) / down.shape[0] if "alpha" in parts else 1.0
            layers[canonical] = LayerDelta(up * scale, down)
    return ConceptDelta(layers, meta)


# -- LoRAs made elsewhere ----------------------------------------------------------------------
KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_", "lora_te3_")
PEFT_PARTS = {".lora_A.weight": "lora_down.weight", ".lora_B.weight": "lora_up.weight"}


def _kohya_groups(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """kohya keys ``<name>.<kind>`` (and diffusers-format ``<module.path>.lora_A/B.weight``, which
    MMDiT layers use) -> {name: {kind: tensor}}, kinds spelled as kohya's."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for k, t in tensors.items():
        peft = next((sfx for sfx in PEFT_PARTS if k.endswith(sfx)), None)
        if peft:
            groups.setdefault(k[: -len(peft)], {})[PEFT_PARTS[peft]] = t
        else:
            base, _, kind = k.partition(".")
            groups.setdefault(base, {})[kind] = t
    return groups


def _canonical(path: str) -> str:
    """``component.module.path`` of a converted LoRA key -> canonical layer name."""
    comp, _, sub = path.partition(".")
    return f"{comp}.{canonical_text_path(sub)}" if comp.startswith("text_encoder") else path


def resolve_foreign(tensors: dict[str, torch.Tensor], known_layers, *, header: dict | None = None,
                    family: str | None = None, label: str = "LoRA"):
    """(groups, names) of a LoRA made elsewhere, in :func:`load_delta`'s kohya shape:
    ``groups`` {name: {"lora_up.weight", "lora_down.weight"[, "alpha"]}}, ``names`` {name: canonical layer}.

    kohya names spelled with diffusers module paths (what :func:`save_lora` writes) resolve
    directly. Other spellings (the SGM/ldm block names kohya's SDXL trainer and A1111 write,
    ``lora_unet_input_blocks_4_1_…``) and peft/diffusers files (``unet.….lora_A.weight``, as
    ``save_lora_weights`` writes) go through diffusers' own LoRA converters. Any key that lands on
    no layer of ``known_layers`` is refused, naming it.
    """
    known = set(known_layers)
    if any(k.endswith(tuple(PEFT_PARTS)) for k in tensors):
        groups, names = _peft_groups(tensors, header or {}, label)
    else:
        groups = _kohya_groups(tensors)
        lookup = {}
        for c in known:
            for fam in (family, "sdxl"):
                try:
                    lookup[kohya_name(c, fam)] = c
                except ValueError:
                    pass
        names = {b: lookup[b] for b in groups if b in lookup}
        rest = {k: t for k, t in tensors.items() if k.partition(".")[0] not in names}
        if rest:
            names.update(_converted_kohya_names(rest, known))
    unknown = [b for b in groups if names.get(b) not in known]
    if unknown:
        raise ValueError(f"{label}: {len(unknown)} LoRA keys match no layer of the model, e.g. {unknown[0]}")
    return groups, names


def _layers_per_block(known) -> int | None:
    """The UNet's layers per down block, read off canonical layer names (for SGM block numbers)."""
    idx = [int(m[1]) for n in known if (m := re.match(r"unet\.down_blocks\.\d+\.(?:attentions|resnets)\.(\d+)\.", n))]
    return max(idx) + 1 if idx else None


def _converted_kohya_names(tensors: dict[str, torch.Tensor], known) -> dict[str, str]:
    """{kohya name: canonical layer} through diffusers' converters (SGM block renumbering, kohya ->
    diffusers -> peft names). Names it cannot place are left out (the caller reports them)."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin
    from diffusers.utils.state_dict_utils import (
        StateDictType,
        convert_state_dict_to_peft,
        convert_unet_state_dict_to_peft,
    )

    sd = {k: t for k, t in tensors.items() if k.startswith(KOHYA_PREFIXES) and k.endswith((".lora_down.weight", ".lora_up.weight"))}
    if not sd:
        return {}
    origin = {id(t): k.partition(".")[0] for k, t in sd.items()}  # the converters move tensors, never copy them
    lpb = _layers_per_block(known)
    try:
        converted, _ = StableDiffusionLoraLoaderMixin.lora_state_dict(
            dict(sd), unet_config=SimpleNamespace(layers_per_block=lpb) if lpb else None
        )
    except (ValueError, KeyError, IndexError):  # a spelling diffusers does not know either
        return {}
    unet = convert_unet_state_dict_to_peft({k: v for k, v in converted.items() if k.startswith("unet.")})
    te = {k: v for k, v in converted.items() if not k.startswith("unet.")}
    if te:
        te = convert_state_dict_to_peft(te, original_type=StateDictType.DIFFUSERS_OLD)
    out = {}
    for k, t in {**unet, **te}.items():
        if k.endswith(".lora_A.weight") and id(t) in origin:
            out[origin[id(t)]] = _canonical(k[: -len(".lora_A.weight")])
    return out


def _peft_groups(tensors: dict[str, torch.Tensor], header: dict, label: str):
    """peft/diffusers keys (``unet.<module>.lora_A.weight`` / ``lora_B``) -> kohya-shaped groups.
    The LoRA scale comes from diffusers' ``lora_adapter_metadata`` (``<component>.lora_alpha``);
    without it diffusers loads alpha = rank, i.e. scale 1, and so do we."""
    adapter = json.loads(header.get("lora_adapter_metadata") or "{}")
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for k, t in tensors.items():
        part = next((p for p in PEFT_PARTS if k.endswith(p)), None)
        if part is None:
            raise ValueError(f"{label}: key {k} is not a LoRA up/down weight (DoRA and other adapters are not supported)")
        groups.setdefault(k[: -len(part)], {})[PEFT_PARTS[part]] = t
    names = {}
    for base, g in groups.items():
        comp = base.partition(".")[0]
        cfg = {k[len(comp) + 1:]: v for k, v in adapter.items() if k.startswith(comp + ".")}
        if cfg.get("alpha_pattern") or cfg.get("use_dora"):
            raise ValueError(f"{label}: per-layer alpha patterns and DoRA are not supported")
        if "lora_alpha" in cfg and "lora_down.weight" in g:
            r = g["lora_down.weight"].shape[0]
            scale = float(cfg["lora_alpha"]) / (math.sqrt(r) if cfg.get("use_rslora") else r)
            g["alpha"] = torch.tensor(scale * r)  # load_delta scales by alpha / rank
        names[base] = _canonical(base)
    return groups, names
