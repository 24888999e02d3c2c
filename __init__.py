"""ConceptEdit: closed-form concept editing for diffusers pipelines and ComfyUI graphs.

This folder is both the ``concept_edit`` Python package and a ComfyUI custom-node pack.
Importing it never imports ComfyUI; the node classes import ``comfy`` lazily when run.
All imports inside the package are relative, because ComfyUI imports the folder under
its directory name rather than ``concept_edit``.
"""
from .core.version import __version__
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402

WEB_DIRECTORY = "./web"

__all__ = ["__version__", "NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
