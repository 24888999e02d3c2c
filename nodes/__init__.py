"""ComfyUI nodes. The node logic (``edit_nodes``, ``delta_io_nodes``, ``attention_nodes``, ``common``,
``patches``) needs no ComfyUI to import; ``comfy_v3`` declares the V3 node classes and is imported
only by ComfyUI, through the pack's ``comfy_entrypoint``."""
