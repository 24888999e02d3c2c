"""The bundled default model: the testbed model shipped in the repository, else a tiny SD 1.x
pipeline built from the configs in this package (random weights, for smoke runs only)."""
from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent
TESTBED_MODEL = HERE / "testbed" / "assets" / "model"


def default_model_path() -> Path:
    if (TESTBED_MODEL / "model_index.json").exists():
        return TESTBED_MODEL
    cache = Path.home() / ".cache" / "concept_edit" / "tiny_sd1"
    if not (cache / "model_index.json").exists():
        from .fileio import atomic_path
        from .tiny_models import build_tiny_pipeline

        with atomic_path(cache, directory=True) as tmp:
            build_tiny_pipeline("sd1").save_pretrained(str(tmp))
    return cache


def default_demo_plan() -> dict:
    """Concepts the demo edits on the bundled model."""
    if TESTBED_MODEL.exists():
        try:
            from .testbed import demo_plan  # provided by the testbed package

            return demo_plan()
        except ImportError:
            pass
    return {
        "edits": [{"erase": "Van Gogh", "type": "style"}, {"replace": "cat", "with": "dog"}],
        "preserve": ["Claude Monet", "a horse"],
        "templates": ["{}", "a painting by {}", "a photo of {}"],
    }
