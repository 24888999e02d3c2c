"""ConceptDelta <-> ComfyUI weight patches, in one place so the nodes stay thin.

A delta is turned into the kohya LoRA state dict :func:`.formats.save_lora` writes
(:func:`.formats.kohya_state_dict`: ``lora_unet_<diffusers path>`` / ``lora_te_`` / ``lora_te1_`` /
``lora_te2_``, ``alpha`` = rank),
and that dict goes through ComfyUI's own LoRA machinery (``comfy.lora.load_lora`` with the key maps
of ``model_lora_keys_unet`` / ``model_lora_keys_clip``). The patches are therefore exactly what
ComfyUI's LoraLoader would produce for the saved file, in whatever patch format the installed
ComfyUI uses, and checkpoint saving, LoRA stacking and ``strength`` behave as for any LoRA.

``comfy`` is imported lazily.
"""
from __future__ import annotations

import math

from ..core.delta import ConceptDelta, LayerDelta
from ..files.formats import kohya_state_dict


class UnloadedKeysError(ValueError):
    pass


MODEL_COMPONENTS = ("unet.", "transformer.")  # the denoiser: UNet, or a FLUX/SD3 transformer


def split_components(delta: ConceptDelta) -> tuple[ConceptDelta, ConceptDelta]:
    """(denoiser part, text-encoder part) of a delta: what patches the MODEL, what patches the CLIP."""
    unet = {k: v for k, v in delta.layers.items() if k.startswith(MODEL_COMPONENTS)}
    te = {k: v for k, v in delta.layers.items() if not k.startswith(MODEL_COMPONENTS)}
    return ConceptDelta(unet, dict(delta.metadata)), ConceptDelta(te, dict(delta.metadata))


def comfy_patches(lora_sd: dict, key_map: dict) -> tuple[dict, list[str]]:
    """ComfyUI patch dict for ``lora_sd`` and the list of LoRA keys ComfyUI did not load."""
    import comfy.lora

    patches = comfy.lora.load_lora(lora_sd, key_map, log_missing=False)
    used = set()
    for base in key_map:
        for suffix in (".lora_up.weight", ".lora_down.weight", ".alpha", ".lora_A.weight", ".lora_B.weight"):
            if base + suffix in lora_sd:
                used.add(base + suffix)
    unloaded = sorted(k for k in lora_sd if k not in used)
    return patches, unloaded


def check_shapes(delta: ConceptDelta, names: dict[str, str], key_map: dict, state_dict: dict) -> None:
    """Refuse a delta whose layers have other shapes than the weights ComfyUI would patch (an SD 1.x
    delta on an SD 2.x model has the same names; ComfyUI would only log shape errors at sampling)."""
    for base, canonical in names.items():
        target = key_map.get(base)
        key = target[0] if isinstance(target, tuple) else target
        w = state_dict.get(key)
        shape = delta.layers[canonical].shape
        if w is not None and tuple(w.shape) != tuple(shape):
            raise UnloadedKeysError(
                f"the delta does not fit this model: {canonical} is {tuple(shape)} in the delta, {tuple(w.shape)} here; "
                f"it was made for a {delta.metadata.get('family', 'different')} model"
            )


def _patched(part: ConceptDelta, owner, module, key_map_of, strength: float, what: str):
    """(clone of ``owner`` (a MODEL or CLIP) with ``part`` added as LoRA patches, number patched):
    the same key mapping, refusals and checks for either component."""
    sd, names, _ = kohya_state_dict(part)
    key_map = key_map_of(module, {})
    patches, unloaded = comfy_patches(sd, key_map)
    if unloaded:
        raise UnloadedKeysError(f"{len(unloaded)} {what} LoRA keys match no layer of this model, e.g. {unloaded[0]}; "
                                f"the delta was made for a {part.metadata.get('family', 'different')} model")
    check_shapes(part, names, key_map, module.state_dict())
    clone = owner.clone()
    loaded = clone.add_patches(patches, strength)
    if len(loaded) != len(patches):
        raise UnloadedKeysError(f"ComfyUI accepted {len(loaded)} of {len(patches)} {what} patches")
    return clone, len(loaded)


def apply_to_comfy(delta: ConceptDelta, model=None, clip=None, *, strength_model: float = 1.0, strength_clip: float = 1.0):
    """Return ``(model_clone, clip_clone, info)`` with ``delta`` added as LoRA patches.

    Inputs are never mutated: a component the delta does not touch is returned as given.
    Raises :class:`UnloadedKeysError` if any layer of the delta has no home in the model.
    """
    import comfy.lora

    for s in (strength_model, strength_clip):
        if not math.isfinite(float(s)):
            raise ValueError(f"strength must be a finite number, got {s}")
    unet_part, te_part = split_components(delta)
    info = {"unet_layers": 0, "text_encoder_layers": 0}
    new_model, new_clip = model, clip
    if unet_part.layers:
        if model is None:
            raise UnloadedKeysError("the delta edits the denoiser's layers but no MODEL is connected")
        new_model, info["unet_layers"] = _patched(unet_part, model, model.model, comfy.lora.model_lora_keys_unet,
                                                  strength_model, "UNet")
    if te_part.layers:
        if clip is None:
            raise UnloadedKeysError("the delta edits text-encoder layers but no CLIP is connected")
        new_clip, info["text_encoder_layers"] = _patched(te_part, clip, clip.cond_stage_model,
                                                         comfy.lora.model_lora_keys_clip, strength_clip, "text-encoder")
    return new_model, new_clip, info


def scaled(delta: ConceptDelta, scale: float) -> ConceptDelta:
    if scale == 1.0:
        return delta
    return ConceptDelta({k: LayerDelta(v.up * scale, v.down) for k, v in delta.layers.items()}, dict(delta.metadata))
