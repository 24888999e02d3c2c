"""ComfyUI nodes. Importing this package never needs ComfyUI; node functions import ``comfy``,
``folder_paths`` and ``server`` lazily."""
from .attention_nodes import AttentionCapture, AttentionHeatmaps
from .delta_io_nodes import LoadConceptDelta, SaveConceptDelta
from .edit_nodes import EDIT_NODE_NAMES, EDIT_NODES

NODE_CLASS_MAPPINGS: dict = {
    **EDIT_NODES,
    "ConceptEditSaveDelta": SaveConceptDelta,
    "ConceptEditLoadDelta": LoadConceptDelta,
    "ConceptEditAttentionCapture": AttentionCapture,
    "ConceptEditAttentionHeatmaps": AttentionHeatmaps,
}
NODE_DISPLAY_NAME_MAPPINGS: dict = {
    **EDIT_NODE_NAMES,
    "ConceptEditSaveDelta": "Save Concept Delta (ConceptEdit)",
    "ConceptEditLoadDelta": "Load Concept Delta (ConceptEdit)",
    "ConceptEditAttentionCapture": "Attention Capture (ConceptEdit)",
    "ConceptEditAttentionHeatmaps": "Attention Heatmaps (ConceptEdit)",
}

try:  # inside a running ComfyUI: the token route for the word picker
    from .routes import register as _register

    _register()
except Exception:  # pragma: no cover
    pass
