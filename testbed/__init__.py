"""The testbed: a small SD-shaped text-to-image model trained here, and its evaluator.

* :func:`load_testbed_pipeline` - the shipped ``StableDiffusionPipeline`` (32x32 images).
* :func:`load_flux_testbed_pipeline` - the shipped FLUX-shaped ``FluxPipeline`` (same world).
* :func:`load_classifier` - the CNN that names object (shape/colour/pattern), style, attribute.
* :func:`get_world` - concepts, aliases, artists, professions; :mod:`.grammar` holds templates.
* :func:`.evaluate.generate` / :func:`.evaluate.head_probs` - generate and score.
"""
from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).parent / "assets"
MODEL_DIR = ASSETS / "model"
FLUX_MODEL_DIR = ASSETS / "flux_model"  # the FLUX-shaped testbed (flux_train.py)
CLASSIFIER_PATH = ASSETS / "classifier.safetensors"


def get_world(n_objects: int | None = None):
    """The concept world of the shipped model (deterministic)."""
    from .world import build_world

    if n_objects is None:
        n_objects = shipped_object_count()
    return build_world(n_objects)


def shipped_object_count() -> int:
    import json

    meta = ASSETS / "testbed.json"
    if meta.exists():
        return int(json.loads(meta.read_text()).get("n_objects", 1000))
    return 1000


def load_testbed_pipeline(path: str | Path | None = None, dtype=None):
    """The bundled model as a ``StableDiffusionPipeline`` (local folder, no safety checker)."""
    import torch
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import logging as dlog

    dlog.set_verbosity_error()
    path = Path(path) if path else model_dir()
    pipe = StableDiffusionPipeline.from_pretrained(
        path, safety_checker=None, requires_safety_checker=False, local_files_only=True,
        dtype=dtype or torch.float32,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_flux_testbed_pipeline(path: str | Path | None = None, dtype=None):
    """The bundled FLUX-shaped model as a ``FluxPipeline`` (stored in float16, loaded in float32);
    ``CONCEPT_EDIT_FLUX_TESTBED_MODEL`` overrides the folder, e.g. for a training snapshot."""
    import os

    import torch
    from diffusers import FluxPipeline
    from diffusers.utils import logging as dlog

    dlog.set_verbosity_error()
    path = Path(path or os.environ.get("CONCEPT_EDIT_FLUX_TESTBED_MODEL") or FLUX_MODEL_DIR)
    pipe = FluxPipeline.from_pretrained(path, local_files_only=True, dtype=dtype or torch.float32)
    pipe.default_sample_size = 32  # its images are 32x32 (the pipeline's default size is this x vae_scale_factor 1)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_any_testbed_pipeline(which: str = "unet", path: str | Path | None = None):
    """``which``: "unet" (the SD-shaped model) or "flux" (the FLUX-shaped one)."""
    if which not in ("unet", "flux"):
        raise ValueError(f"testbed model must be 'unet' or 'flux', got {which!r}")
    return load_flux_testbed_pipeline(path) if which == "flux" else load_testbed_pipeline(path)


def model_dir() -> Path:
    """The bundled model folder (``CONCEPT_EDIT_TESTBED_MODEL`` overrides it, e.g. for a training snapshot)."""
    import os

    return Path(os.environ.get("CONCEPT_EDIT_TESTBED_MODEL") or MODEL_DIR)


def load_classifier(path: str | Path | None = None):
    from .classifier import load_classifier as _load

    return _load(path or CLASSIFIER_PATH)


__all__ = ["get_world", "load_testbed_pipeline", "load_flux_testbed_pipeline", "load_any_testbed_pipeline",
           "load_classifier", "MODEL_DIR", "FLUX_MODEL_DIR", "CLASSIFIER_PATH", "ASSETS"]


def demo_plan() -> dict:
    """Edits ``concept-edit demo`` runs on the bundled model: erase one artist, replace one object."""
    import json

    meta = ASSETS / "testbed.json"
    d = json.loads(meta.read_text()).get("demo") if meta.exists() else None
    if d:
        return {k: v for k, v in d.items() if k != "holdout"}
    w = get_world()
    o = w.objects
    return {
        "edits": [{"erase": w.artists[0].name, "type": "style"}, {"replace": o[0].name, "with": o[1].name}],
        "preserve": [w.artists[1].name, o[2].name, o[3].name],
        "templates": ["{}", "a photo of a {}", "a painting of a {}"],
    }


def demo_holdout() -> str:
    """An object the demo edit must leave alone (checked by the efficacy test)."""
    import json

    meta = ASSETS / "testbed.json"
    d = json.loads(meta.read_text()).get("demo") if meta.exists() else None
    if d and d.get("holdout"):
        return d["holdout"][0]
    return get_world().objects[3].name


__all__ += ["demo_plan", "demo_holdout"]
