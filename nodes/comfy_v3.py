"""The pack's nodes on ComfyUI's V3 node schema, and the extension ComfyUI loads.

Pinned to the versioned ``comfy_api.v0_0_2`` (not ``latest``) so a ComfyUI update cannot change
the API under us. This is the only module that imports ``comfy_api``; ComfyUI imports it through
the pack's ``comfy_entrypoint`` (root ``__init__.py``), never the library. What each node does
lives in host-neutral modules (``edit_nodes``, ``delta_io_nodes``, ``attention_nodes``); the
classes here only declare inputs and outputs and call them.

Node ids, input names and their order are those of the V1 nodes of release 0.1, so saved
workflows (which store widget values by position) keep loading; ``tests/data/node_interface_0.1.json``
holds that interface and a real-host test compares ComfyUI's ``/object_info`` with it.
"""
from __future__ import annotations

from comfy_api.v0_0_2 import ComfyExtension, io

from .attention_nodes import capture, heatmaps_node
from .common import CAPTURE_TYPE, CATEGORY, DELTA_TYPE
from .delta_io_nodes import load_delta_node, lora_files, save_delta
from .edit_nodes import edit_inputs, edit_node, edit_node_ids

Delta = io.Custom(DELTA_TYPE)
Attention = io.Custom(CAPTURE_TYPE)
SOCKETS = {"model": io.Model, "clip": io.Clip}


def patched_outputs() -> list[io.Output]:
    """What the edit nodes and Load Concept Delta return: patched clones and the delta."""
    return [io.Model.Output(display_name="model"), io.Clip.Output(display_name="clip"), Delta.Output(display_name="delta")]


def widget(name: str, spec: tuple, optional: bool) -> io.Input:
    """A V3 input from a host-neutral widget spec ``(type | [choices], options)``."""
    typ, opts = spec[0], dict(spec[1]) if len(spec) > 1 else {}
    common = {"optional": optional, "tooltip": opts.pop("tooltip", None) or None, "default": opts.pop("default", None)}
    if isinstance(typ, (list, tuple)):
        return io.Combo.Input(name, options=list(typ), **common)
    if typ == "STRING":
        return io.String.Input(name, multiline=bool(opts.get("multiline", False)), **common)
    if typ == "BOOLEAN":
        return io.Boolean.Input(name, **common)
    if typ == "INT":
        return io.Int.Input(name, min=opts.get("min"), max=opts.get("max"), **common)
    if typ == "FLOAT":
        return io.Float.Input(name, min=opts.get("min"), max=opts.get("max"), step=opts.get("step"), **common)
    raise TypeError(f"no V3 input for widget type {typ!r} ({name})")


def _edit_node_class(node_id: str, method: str, kind: str, display: str, description: str) -> type[io.ComfyNode]:
    def define_schema(cls):
        inputs = [SOCKETS[n].Input(n) if spec is None else widget(n, spec, opt) for n, spec, opt in edit_inputs(method, kind)]
        return io.Schema(
            node_id=node_id, display_name=display, category=CATEGORY, description=description, inputs=inputs,
            outputs=patched_outputs(),
        )

    def execute(cls, model, clip, **kw) -> io.NodeOutput:
        out = edit_node(method, kind, model, clip, **kw)
        return io.NodeOutput(*out["result"], ui=out["ui"])

    return type(node_id, (io.ComfyNode,), {"define_schema": classmethod(define_schema),
                                           "execute": classmethod(execute), "__doc__": description})


EDIT_NODES = [_edit_node_class(nid, *spec) for nid, spec in edit_node_ids().items()]


class SaveConceptDelta(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ConceptEditSaveDelta", display_name="Save Concept Delta (ConceptEdit)", category=CATEGORY,
            description="Write the delta as a LoRA (or .diff) file into ComfyUI's loras folder, named and "
                        "numbered like the core LoRA save node (<prefix>_00001_.safetensors)",
            inputs=[
                Delta.Input("delta"),
                io.String.Input("filename_prefix", default="concept_edit/edit",
                                tooltip="Path inside the loras folder; subfolders allowed, %date% variables as in Save Image"),
                io.Int.Input("rank", default=0, min=0, max=4096, optional=True,
                             tooltip="0 = exact; else SVD-truncate each layer"),
                io.Combo.Input("format", options=["lora", "diff"], default="lora", optional=True,
                               tooltip="lora: kohya LoRA (ComfyUI, diffusers, A1111); diff: dense weight differences"),
            ],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, delta, filename_prefix="concept_edit/edit", rank=0, format="lora") -> io.NodeOutput:
        return io.NodeOutput(ui=save_delta(delta, filename_prefix, rank, format))


class LoadConceptDelta(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ConceptEditLoadDelta", display_name="Load Concept Delta (ConceptEdit)", category=CATEGORY,
            description="Patch clones of MODEL and CLIP with a saved delta (or a kohya LoRA of the same model); "
                        "refuses a file made for another model",
            inputs=[
                io.Model.Input("model"),
                io.Clip.Input("clip"),
                io.Combo.Input("delta_name", options=lora_files(), tooltip="A delta or LoRA file in the loras folder"),
                io.Float.Input("strength_model", default=1.0, min=-10.0, max=10.0, step=0.01,
                               tooltip="Scale of the UNet part, as on a LoRA loader"),
                io.Float.Input("strength_clip", default=1.0, min=-10.0, max=10.0, step=0.01,
                               tooltip="Scale of the text-encoder part, as on a LoRA loader"),
            ],
            outputs=patched_outputs(),
        )

    @classmethod
    def execute(cls, model, clip, delta_name, strength_model=1.0, strength_clip=1.0) -> io.NodeOutput:
        result, ui = load_delta_node(model, clip, delta_name, strength_model, strength_clip)
        return io.NodeOutput(*result, ui=ui)


class AttentionCapture(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ConceptEditAttentionCapture", display_name="Attention Capture (ConceptEdit)", category=CATEGORY,
            description="A clone of MODEL whose cross-attention is recorded while it samples; feed the capture "
                        "to Attention Heatmaps",
            inputs=[io.Model.Input("model", tooltip="The model to sample with; its cross-attention is recorded")],
            outputs=[io.Model.Output(display_name="model"), Attention.Output(display_name="attention")],
        )

    @classmethod
    def execute(cls, model) -> io.NodeOutput:
        return io.NodeOutput(*capture(model))


class AttentionHeatmaps(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ConceptEditAttentionHeatmaps", display_name="Attention Heatmaps (ConceptEdit)", category=CATEGORY,
            description="How much each chosen word of the prompt was attended to, over layers and steps, "
                        "upsampled to the image: one image per word",
            inputs=[
                Attention.Input("attention"),
                io.Image.Input("images"),
                io.Clip.Input("clip"),
                io.String.Input("prompt", multiline=True, default="", tooltip="The positive (or negative) prompt that was sampled"),
                io.String.Input("words", default="", tooltip="Words of the prompt to map, comma-separated (pick them on the node)"),
                io.Combo.Input("branch", options=["positive", "negative"], default="positive", optional=True,
                               tooltip="Which prompt's attention to show (the sampler's positive or negative)"),
                io.Boolean.Input("overlay", default=True, optional=True, tooltip="Draw the map over the image"),
                io.Float.Input("alpha", default=0.6, min=0.0, max=1.0, step=0.05, optional=True,
                               tooltip="Opacity of the map over the image"),
            ],
            outputs=[io.Image.Output(display_name="heatmaps")],
        )

    @classmethod
    def fingerprint_inputs(cls, **kw):
        return float("nan")  # the capture fills up while the sampler runs: always re-render

    @classmethod
    def execute(cls, attention, images, clip, prompt, words, branch="positive", overlay=True, alpha=0.6) -> io.NodeOutput:
        image, ui = heatmaps_node(attention, images, clip, prompt, words, branch, overlay, alpha)
        return io.NodeOutput(image, ui=ui)


NODES: list[type[io.ComfyNode]] = [*EDIT_NODES, SaveConceptDelta, LoadConceptDelta, AttentionCapture, AttentionHeatmaps]


class ConceptEditExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return NODES


async def comfy_entrypoint() -> ConceptEditExtension:
    from .routes import register

    # GET /concept_edit/tokens for the web extension's word picker. Here rather than in the
    # extension's on_load, which ComfyUI 0.3.64 never calls.
    register()
    return ConceptEditExtension()
