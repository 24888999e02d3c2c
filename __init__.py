"""ConceptEdit: closed-form concept editing for diffusers pipelines and ComfyUI graphs.

This folder is both the ``concept_edit`` Python package and a ComfyUI custom-node pack.
Importing it never imports ComfyUI; the node classes import ``comfy`` lazily when run.
All imports inside the package are relative, because ComfyUI imports the folder under
its directory name rather than ``concept_edit``.
"""
WEB_DIRECTORY = "./web"

# Imported as a package (``concept_edit``, or ComfyUI's folder name) this is the node pack. pytest
# also imports this file, as the package of the repository folder, whose name may not be a Python
# identifier (a clone into "concept-edit/"): then there is no package to import relatively from.
if __package__:
    from .core.version import __version__
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["__version__", "NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
