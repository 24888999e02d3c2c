"""ConceptEdit: closed-form concept editing for diffusers pipelines and ComfyUI graphs.

This folder is both the ``concept_edit`` Python package and a ComfyUI custom-node pack.
Importing it never imports ComfyUI: ComfyUI calls ``comfy_entrypoint`` (its V3 extension API),
which imports the node classes (``nodes/comfy_v3.py``). There is deliberately no
``NODE_CLASS_MAPPINGS``: ComfyUI checks it first and would then ignore the entrypoint.
All imports inside the package are relative, because ComfyUI imports the folder under its
directory name rather than ``concept_edit``.
"""
WEB_DIRECTORY = "./web"

# Imported as a package (``concept_edit``, or ComfyUI's folder name) this is the node pack. pytest
# also imports this file, as the package of the repository folder, whose name may not be a Python
# identifier (a clone into "concept-edit/"): then there is no package to import relatively from.
if __package__:
    from .core.version import __version__

    async def comfy_entrypoint():
        """The pack's ComfyUI extension (V3 node schema)."""
        from .nodes.comfy_v3 import comfy_entrypoint as entrypoint

        return await entrypoint()

__all__ = ["__version__", "comfy_entrypoint", "WEB_DIRECTORY"]
