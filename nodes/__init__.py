"""ComfyUI nodes (filled in by the node-pack work; importing must not need ComfyUI)."""
NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
