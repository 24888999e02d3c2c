"""What every delta's metadata says about how it was made (shared by all engines)."""
from __future__ import annotations

import time

from ..core.apply import base_fingerprint
from ..core.plan import EditPlan
from ..core.version import __version__


def delta_metadata(model, plan: EditPlan, method: str, layer_names, t0: float, **extra) -> dict:
    """Method, family, edits, preserve set, the settings in effect, base fingerprint, version, timing."""
    meta = {
        "method": method,
        "family": model.family,
        "edits": [vars(e) for e in plan.edits],
        "preserve": plan.preserve,
        "hyperparameters": {**plan.settings.effective(), "templates": plan.templates, "preserve_empty": plan.preserve_empty},
        **base_fingerprint(model, list(layer_names)),
        "concept_edit_version": __version__,
    }
    if plan.dropped_preserve:
        meta["preserve_dropped"] = plan.dropped_preserve  # edited concepts named in preserve
    meta.update(extra)
    meta.setdefault("seconds", {})["total"] = round(time.perf_counter() - t0, 4)
    return meta
