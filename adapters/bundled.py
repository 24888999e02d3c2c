"""The bundled default model: the testbed model shipped in the repository (testbed/assets/model)."""
from __future__ import annotations

from pathlib import Path

TESTBED_MODEL = Path(__file__).resolve().parents[1] / "testbed" / "assets" / "model"


def default_model_path() -> Path:
    if not (TESTBED_MODEL / "model_index.json").exists():
        from .diffusers_model import ModelLoadError

        raise ModelLoadError(f"the bundled model is missing ({TESTBED_MODEL}); pass --model DIR or FILE")
    return TESTBED_MODEL


def default_demo_plan() -> dict:
    """Concepts the demo edits on the bundled model."""
    from ..testbed import demo_plan

    return demo_plan()
