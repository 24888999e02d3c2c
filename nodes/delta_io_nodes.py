"""Save Concept Delta (a LoRA in ComfyUI's loras folder) and Load Concept Delta (with strength)."""
from __future__ import annotations

import json
import re
from pathlib import Path

from .common import CATEGORY, DELTA_TYPE, edit_summary


def _loras_dir() -> Path:
    import folder_paths

    return Path(folder_paths.get_folder_paths("loras")[0])


def next_path(directory: Path, prefix: str, ext: str = ".safetensors") -> Path:
    """``<directory>/<prefix>_00001_.safetensors`` with the next free counter (prefix may have
    subfolders; it may not leave ``directory``)."""
    prefix = prefix.strip().replace("\\", "/") or "concept_edit"
    root = directory.resolve()
    target = (root / prefix).resolve()  # symlinks, '..' and absolute prefixes resolved before checking
    if root not in target.parents:  # the file is written beside target: target must lie strictly inside
        raise ValueError(f"filename_prefix {prefix!r} leaves the loras folder {directory}")
    target.parent.mkdir(parents=True, exist_ok=True)
    pat = re.compile(re.escape(target.name) + r"_(\d{5})_" + re.escape(ext) + "$")
    used = [int(m.group(1)) for f in target.parent.iterdir() if (m := pat.match(f.name))]
    return target.parent / f"{target.name}_{max(used, default=0) + 1:05d}_{ext}"


class SaveConceptDelta:
    """Write a CONCEPT_DELTA as a kohya LoRA (or a ComfyUI ``.diff`` file) into the loras folder,
    where ComfyUI's own LoraLoader (and Load Concept Delta) pick it up."""

    RETURN_TYPES = ()
    FUNCTION = "save"
    OUTPUT_NODE = True
    CATEGORY = CATEGORY

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "delta": (DELTA_TYPE,),
                "filename_prefix": ("STRING", {"default": "concept_edit/edit"}),
            },
            "optional": {
                "rank": ("INT", {"default": 0, "min": 0, "max": 4096, "tooltip": "0 = exact; else SVD-truncate each layer"}),
                "format": (["lora", "diff"], {"default": "lora"}),
            },
        }

    def save(self, delta, filename_prefix="concept_edit/edit", rank=0, format="lora"):
        from ..core.delta import check_rank
        from ..files.formats import save_diff, save_lora

        if rank:  # 0 = exact (the widget's default); anything else must be a valid rank
            check_rank(rank)
            if format == "diff":
                raise ValueError("rank applies to LoRA files only; a diff file is always exact (set rank to 0)")
        root = _loras_dir()
        path = next_path(root, filename_prefix)
        if format == "diff":
            save_diff(delta, path)
            info = {"kind": "diff", "max_rel_error": 0.0}
        else:
            info = save_lora(delta, path, rank=rank or None)
        rel = path.relative_to(root.resolve()).as_posix()
        summary = edit_summary(delta, extra={"saved": rel, "format": format, "rank_limit": rank or None,
                                             "max_rel_error": info.get("max_rel_error", 0.0)})
        return {"ui": {"concept_edit": [summary], "concept_edit_saved": [rel]}, "result": ()}


def delta_info(path) -> dict:
    """JSON-safe metadata of a delta file for display."""
    from ..files.formats import read_metadata

    meta = read_metadata(path)
    return json.loads(json.dumps(meta, default=str))


class LoadConceptDelta:
    """Load a delta/LoRA file from the loras folder and patch MODEL and CLIP with it (clones)."""

    RETURN_TYPES = ("MODEL", "CLIP", DELTA_TYPE)
    RETURN_NAMES = ("model", "clip", "delta")
    FUNCTION = "load"
    CATEGORY = CATEGORY

    @classmethod
    def INPUT_TYPES(cls):
        try:
            import folder_paths

            files = [f for f in folder_paths.get_filename_list("loras") if f.endswith(".safetensors")]
        except ImportError:
            files = []
        return {
            "required": {
                "model": ("MODEL",),
                "clip": ("CLIP",),
                "delta_name": (files,),
                "strength_model": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01}),
                "strength_clip": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01}),
            }
        }

    def load(self, model, clip, delta_name, strength_model=1.0, strength_clip=1.0):
        import folder_paths

        from ..adapters.comfy_model import ComfyEditableModel
        from ..files.formats import load_delta
        from .patches import apply_to_comfy

        path = folder_paths.get_full_path_or_raise("loras", delta_name)
        known = None
        try:
            em = ComfyEditableModel(model, clip)
            unet, te = em._names()
            known = list(unet) + list(te)
        except Exception:
            pass
        delta = load_delta(path, known_layers=known)
        new_model, new_clip, info = apply_to_comfy(delta, model, clip, strength_model=strength_model, strength_clip=strength_clip)
        summary = edit_summary(delta, extra={"file": delta_name, "strength_model": strength_model,
                                             "strength_clip": strength_clip, "patched": info})
        summary["metadata"] = delta_info(path)
        return {"ui": {"concept_edit": [summary]}, "result": (new_model, new_clip, delta)}
