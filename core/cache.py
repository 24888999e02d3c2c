"""Where ConceptEdit keeps files it can recompute (C0 covariances: ~100–400 MB per model, plus
bounded stores of partial sums for leaving edited concepts out of C0, engines/c0_cells.py).

The root is the first of: ``$CONCEPT_EDIT_CACHE`` (the user's explicit choice); the folder the
host installed with :func:`host_cache_root` for the duration of a run (ComfyUI: a folder under its
``models/``, see ``adapters/comfy_host.py``), so a host's caches live with its other files; and
``~/.cache/concept_edit``. A folder given to a method explicitly (``cov_cache_dir``) beats all
three. Engines ask :func:`cache_root`; only the host knows its folders.
"""
from __future__ import annotations

import contextlib
import os
from contextvars import ContextVar
from pathlib import Path

_HOST_ROOT: ContextVar[Path | None] = ContextVar("concept_edit_host_cache_root", default=None)


def cache_root() -> Path:
    env = os.environ.get("CONCEPT_EDIT_CACHE")
    if env:
        return Path(env)
    host = _HOST_ROOT.get()
    return host if host is not None else Path.home() / ".cache" / "concept_edit"


@contextlib.contextmanager
def host_cache_root(path):
    """Make ``path`` the default cache root inside this block (unless ``$CONCEPT_EDIT_CACHE`` is set)."""
    token = _HOST_ROOT.set(Path(path))
    try:
        yield
    finally:
        _HOST_ROOT.reset(token)
