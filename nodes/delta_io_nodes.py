"""What Save Concept Delta (a LoRA in ComfyUI's loras folder) and Load Concept Delta (with strengths) do;
their V3 node classes are in ``comfy_v3.py``."""
from __future__ import annotations

import json
from pathlib import Path

from .common import edit_summary


def _loras_dir() -> Path:
    import folder_paths

    return Path(folder_paths.get_folder_paths("loras")[0])


def check_inside(directory: Path, prefix: str) -> str:
    """``prefix`` (which may have subfolders) if the file it names stays strictly inside
    ``directory`` once symlinks, '..' and absolute paths are resolved; else a ValueError.
    (ComfyUI's own check compares paths without resolving symlinks.)"""
    prefix = prefix.strip().replace("\\", "/") or "concept_edit"
    root = directory.resolve()
    target = (root / prefix).resolve()
    if root not in target.parents:  # the file is written beside target: target must lie strictly inside
        raise ValueError(f"filename_prefix {prefix!r} leaves the loras folder {directory}")
    return prefix


def save_path(directory: Path, prefix: str) -> Path:
    """Where Save Concept Delta writes: ``<directory>/<prefix>_00001_.safetensors`` with the next
    free counter, named and counted by ComfyUI's ``folder_paths.get_save_image_path`` as the core
    LoraSave node does (``%date%``-style variables included), after :func:`check_inside`."""
    import folder_paths

    prefix = check_inside(directory, prefix)
    folder, name, counter, _, _ = folder_paths.get_save_image_path(prefix, str(directory.resolve()))
    path = Path(folder) / f"{name}_{counter:05}_.safetensors"
    check_inside(directory, path.relative_to(directory.resolve()).as_posix())  # after variable expansion
    return path


def save_delta(delta, filename_prefix: str = "concept_edit/edit", rank: int = 0, format: str = "lora") -> dict:
    """Save Concept Delta: write a CONCEPT_DELTA as a kohya LoRA (or a ComfyUI ``.diff`` file) into
    the loras folder, where ComfyUI's own LoraLoader (and Load Concept Delta) pick it up.
    Returns the node's UI output."""
    from ..core.delta import check_rank
    from ..files.formats import save_diff, save_lora

    if format not in ("lora", "diff"):
        raise ValueError(f"format must be 'lora' or 'diff', got {format!r}")
    if rank:  # 0 = exact (the widget's default); anything else must be a valid rank
        check_rank(rank)
        if format == "diff":
            raise ValueError("rank applies to LoRA files only; a diff file is always exact (set rank to 0)")
    root = _loras_dir()
    path = save_path(root, filename_prefix)
    if format == "diff":
        save_diff(delta, path)
        info = {"kind": "diff", "max_rel_error": 0.0}
    else:
        info = save_lora(delta, path, rank=rank or None)
    rel = path.relative_to(root.resolve()).as_posix()
    summary = edit_summary(delta, extra={"saved": rel, "format": format, "rank_limit": rank or None,
                                         "max_rel_error": info.get("max_rel_error", 0.0)})
    return {"concept_edit": [summary], "concept_edit_saved": [rel]}


def delta_info(path) -> dict:
    """JSON-safe metadata of a delta file for display."""
    from ..files.formats import read_metadata

    meta = read_metadata(path)
    return json.loads(json.dumps(meta, default=str))


def lora_files() -> list[str]:
    """The ``.safetensors`` files of ComfyUI's loras folders (Load Concept Delta's choices)."""
    import folder_paths

    return [f for f in folder_paths.get_filename_list("loras") if f.endswith(".safetensors")]


def load_delta_node(model, clip, delta_name: str, strength_model: float = 1.0, strength_clip: float = 1.0):
    """Load Concept Delta: patch clones of MODEL and CLIP with a delta/LoRA file from the loras
    folder. Returns ``((model, clip, delta), ui)``."""
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
    return (new_model, new_clip, delta), {"concept_edit": [summary]}
