"""ComfyUI as the host of a library computation: its progress bar, its Cancel button, its folders.

The engines are host-neutral: they report their long loops through ``core.progress`` and find
their cache root through ``core.cache``. :func:`comfy_host` plugs ComfyUI into both for the
duration of a node's run:

    with comfy_host():
        delta = compute_delta(em, plan, progress=False)

* progress: every phase (prompt encoding, C0 batches, null-space projectors, stage I, layer
  solves) drives the executing node's bar through ``comfy.utils.ProgressBar``. ComfyUI's server
  hook behind it also raises when the user presses Cancel, which stops the edit at the next step.
* caches: C0 covariances go to :func:`cache_root` instead of ``~/.cache`` (unless
  ``$CONCEPT_EDIT_CACHE`` or a method's ``cov_cache_dir`` says otherwise).

``comfy`` and ``folder_paths`` are imported only when this runs.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

from ..core.cache import host_cache_root
from ..core.progress import reporting

# A folder_paths name, so extra_model_paths.yaml can place it like any model folder.
CACHE_FOLDER = "concept_edit"


def cache_root() -> Path:
    """ConceptEdit's cache folder inside ComfyUI: the first path of the ``concept_edit`` model
    folder, ``<ComfyUI>/models/concept_edit`` unless extra_model_paths.yaml names one.

    Why models/: a C0 file is a large, model-derived file that is slow to recompute and reused
    across sessions, like the files ComfyUI keeps there; ``temp/`` is emptied at every start and
    ``user/`` holds settings and workflows served to the browser. ``--base-directory`` and
    extra_model_paths.yaml move it with the other model folders."""
    import folder_paths

    if CACHE_FOLDER not in folder_paths.folder_names_and_paths:
        folder_paths.add_model_folder_path(CACHE_FOLDER, os.path.join(folder_paths.models_dir, CACHE_FOLDER))
    return Path(folder_paths.get_folder_paths(CACHE_FOLDER)[0])


@contextlib.contextmanager
def comfy_host():
    """Inside this block, library progress drives the running node's ComfyUI progress bar and
    caches default to :func:`cache_root`. Re-entrant."""
    import comfy.utils

    bar = comfy.utils.ProgressBar(1)  # no node id: ComfyUI's hook uses the executing node's

    def report(done: float, total: int, desc: str) -> None:
        bar.update_absolute(done, total)

    with reporting(report), host_cache_root(cache_root()):
        yield
