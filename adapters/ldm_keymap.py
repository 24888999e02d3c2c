"""Name maps between diffusers component state dicts and the original single-file layout.

The original ("ldm" for SD 1.x/2.x, "sgm" for SDXL) checkpoint layout is what A1111, ComfyUI
and civitai distribute: one ``.safetensors`` with every component under a fixed prefix::

    model.diffusion_model.   UNet   (input_blocks / middle_block / output_blocks)
    first_stage_model.       VAE    (encoder.down.{i}.block.{j} / decoder.up.{i}... / mid.attn_1)
    cond_stage_model.transformer.         SD 1.x text encoder (transformers CLIP names)
    cond_stage_model.model.               SD 2.x text encoder (OpenCLIP names)
    conditioner.embedders.0.transformer.  SDXL text encoder 1 (transformers CLIP names)
    conditioner.embedders.1.model.        SDXL text encoder 2 (OpenCLIP names)

The mapping is computed from the component configs (block counts, layers per block, which
blocks have attention), so it holds for the real SD1.5/SD2/SDXL shapes and for the tiny test
models alike. Each single-file tensor is one :class:`Entry`: a single-file key, the canonical
diffusers parameter names it is made of (``unet.…``, ``vae.…``, ``text_encoder.text_model.…``)
and how they combine (``copy``; ``conv1x1``: VAE mid-attention linear stored as a 1x1 conv;
``transpose``: OpenCLIP ``text_projection``; ``cat``: OpenCLIP fused q/k/v ``in_proj``).

Canonical text-encoder names always carry ``text_model.`` (transformers >= 5.6 flattens
``CLIPTextModel``, so module paths may lack it; :func:`~concept_edit.adapters.base.text_module_path` converts).
"""
from __future__ import annotations

import contextlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

import torch

from .base import canonical_text_path
from .families import (
    FAMILIES,
    TEXT_ENCODERS,
    UnknownFamilyError,
    detect_family,
    encoders_from_configs,
    encoders_from_keys,
)

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."

# family -> text-encoder component -> (layout, single-file prefix); from the family table
TEXT_ENCODER_LAYOUT = {
    fam.name: {e.component: ("hf" if e.kind == "clip" else "openclip", e.single_file_prefix) for e in fam.text_encoders}
    for fam in FAMILIES.values()
}
COMPONENTS = ("unet", "vae") + TEXT_ENCODERS


class LayoutError(ValueError):
    pass


@dataclass(frozen=True)
class Entry:
    """One tensor of the single file: ``key`` <- ``op`` applied to the canonical ``parts``."""

    key: str
    parts: tuple[str, ...]
    op: str = "copy"  # copy | conv1x1 | transpose | cat

    def combine(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """diffusers tensors (in ``parts`` order) -> the single-file tensor."""
        if self.op == "copy":
            return tensors[0]
        if self.op == "conv1x1":
            t = tensors[0]
            return t.reshape(*t.shape, 1, 1) if t.ndim == 2 else t
        if self.op == "transpose":
            return tensors[0].T.contiguous()
        if self.op == "cat":
            return torch.cat(tensors, 0)
        raise LayoutError(f"unknown op {self.op}")

    def split(self, t: torch.Tensor) -> list[torch.Tensor]:
        """The single-file tensor -> diffusers tensors (in ``parts`` order)."""
        if self.op == "copy":
            return [t]
        if self.op == "conv1x1":
            return [t.reshape(t.shape[0], t.shape[1]) if t.ndim == 4 else t]
        if self.op == "transpose":
            return [t.T.contiguous()]
        if self.op == "cat":
            n = len(self.parts)
            if t.shape[0] % n:
                raise LayoutError(f"{self.key}: dim 0 ({t.shape[0]}) does not split into {n} parts")
            return [c.contiguous() for c in t.chunk(n, 0)]
        raise LayoutError(f"unknown op {self.op}")


# -- configs ---------------------------------------------------------------------------------
def _cfg(c) -> dict:
    if c is None:
        return {}
    if isinstance(c, Mapping):
        return dict(c)
    if hasattr(c, "to_dict"):
        return c.to_dict()
    return dict(c)


def _per_block(v, n: int) -> list[int]:
    return [int(v)] * n if isinstance(v, int) else [int(x) for x in v]


def single_file_family(configs, keys: Iterable[str]) -> str:
    """The family of an original-layout file: from the text-encoder prefixes its ``keys`` carry
    or, if it holds no text encoder, from ``configs`` (component configs or a diffusers folder)."""
    try:
        return detect_family(encoders_from_keys(keys, "single_file_prefix"))
    except UnknownFamilyError:
        if isinstance(configs, (str, Path)):
            configs = read_configs(configs)
        return detect_family(encoders_from_configs(configs))


# -- UNet --------------------------------------------------------------------------------------
_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
           "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
    # SDXL's text_time embedding (and class embeddings) live in label_emb.0
    "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
    "class_embedding.linear_1": "label_emb.0.0", "class_embedding.linear_2": "label_emb.0.2",
}


def _resnet(rest: str, table=_RESNET) -> str:
    head, _, tail = rest.partition(".")
    if head not in table:
        raise KeyError(head)
    return f"{table[head]}.{tail}"


class UNetLayout:
    """diffusers UNet2DConditionModel key -> original key, from the UNet config."""

    def __init__(self, config):
        cfg = _cfg(config)
        self.down_types = list(cfg["down_block_types"])
        self.up_types = list(cfg["up_block_types"])
        n = len(self.down_types)
        lpb = _per_block(cfg["layers_per_block"], n)
        mid = cfg.get("mid_block_type", "UNetMidBlock2DCrossAttn")
        if mid not in ("UNetMidBlock2DCrossAttn", None):
            raise LayoutError(f"unsupported UNet mid block {mid!r} for the original layout")
        self.down: dict[tuple[int, int | str], int] = {}
        i = 1  # input_blocks.0 is conv_in
        for b in range(n):
            for j in range(lpb[b]):
                self.down[(b, j)] = i
                i += 1
            if b < n - 1:
                self.down[(b, "ds")] = i
                i += 1
        self.up: dict[tuple[int, int], int] = {}
        self.up_last: dict[int, int] = {}
        i = 0
        for b, layers in enumerate(reversed(lpb)):
            for j in range(layers + 1):
                self.up[(b, j)] = i
                i += 1
            self.up_last[b] = i - 1

    def key(self, k: str) -> str:
        """Single-file key (with prefix) of the diffusers UNet key ``k`` (no ``unet.``)."""
        try:
            return UNET_PREFIX + self._key(k)
        except (KeyError, AttributeError) as e:
            raise LayoutError(f"UNet key {k!r} has no place in the original layout") from e

    def _key(self, k: str) -> str:
        for d, o in _UNET_TOP.items():
            if k.startswith(d + "."):
                return o + k[len(d):]
        if m := re.match(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)$", k):
            return f"input_blocks.{self.down[(int(m[1]), int(m[2]))]}.0.{_resnet(m[3])}"
        if m := re.match(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)$", k):
            return f"input_blocks.{self.down[(int(m[1]), int(m[2]))]}.1.{m[3]}"
        if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)$", k):
            return f"input_blocks.{self.down[(int(m[1]), 'ds')]}.0.op.{m[2]}"
        if m := re.match(r"mid_block\.resnets\.([01])\.(.+)$", k):
            return f"middle_block.{2 * int(m[1])}.{_resnet(m[2])}"
        if m := re.match(r"mid_block\.attentions\.0\.(.+)$", k):
            return f"middle_block.1.{m[1]}"
        if m := re.match(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)$", k):
            return f"output_blocks.{self.up[(int(m[1]), int(m[2]))]}.0.{_resnet(m[3])}"
        if m := re.match(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)$", k):
            return f"output_blocks.{self.up[(int(m[1]), int(m[2]))]}.1.{m[3]}"
        if m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)$", k):
            b = int(m[1])
            slot = 2 if "CrossAttn" in self.up_types[b] else 1
            return f"output_blocks.{self.up_last[b]}.{slot}.conv.{m[2]}"
        raise KeyError(k)


# -- VAE ---------------------------------------------------------------------------------------
_VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "conv_shortcut": "nin_shortcut"}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


class VAELayout:
    """diffusers AutoencoderKL key -> (original key, op), from the VAE config."""

    def __init__(self, config):
        cfg = _cfg(config)
        self.n_up = len(cfg["up_block_types"])

    def key(self, k: str) -> tuple[str, str]:
        try:
            key, op = self._key(k)
        except (KeyError, AttributeError) as e:
            raise LayoutError(f"VAE key {k!r} has no place in the original layout") from e
        return VAE_PREFIX + key, op

    def _key(self, k: str) -> tuple[str, str]:
        if m := re.match(r"(encoder|decoder)\.conv_norm_out\.(.+)$", k):
            return f"{m[1]}.norm_out.{m[2]}", "copy"
        if re.match(r"((encoder|decoder)\.conv_(in|out)|quant_conv|post_quant_conv)\.(weight|bias)$", k):
            return k, "copy"
        if m := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)$", k):
            return f"encoder.down.{m[1]}.block.{m[2]}.{_resnet(m[3], _VAE_RESNET)}", "copy"
        if m := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)$", k):
            return f"encoder.down.{m[1]}.downsample.conv.{m[2]}", "copy"
        if m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)$", k):
            return f"decoder.up.{self.n_up - 1 - int(m[1])}.block.{m[2]}.{_resnet(m[3], _VAE_RESNET)}", "copy"
        if m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)$", k):
            return f"decoder.up.{self.n_up - 1 - int(m[1])}.upsample.conv.{m[2]}", "copy"
        if m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)$", k):
            return f"{m[1]}.mid.block_{int(m[2]) + 1}.{_resnet(m[3], _VAE_RESNET)}", "copy"
        if m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(weight|bias)$", k):
            # the original stores the mid-attention projections as 1x1 convolutions
            op = "conv1x1" if m[3] == "weight" and m[2] != "group_norm" else "copy"
            return f"{m[1]}.mid.attn_1.{_VAE_ATTN[m[2]]}.{m[3]}", op
        raise KeyError(k)


# -- text encoders ---------------------------------------------------------------------------
_OPENCLIP_TOP = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
}
_OPENCLIP_LAYER = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
                   "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}


def text_encoder_entries(comp: str, keys: Iterable[str], layout: str, prefix: str) -> list[Entry]:
    """Entries of one text encoder; ``keys`` are its canonical keys (no component prefix)."""
    out: list[Entry] = []
    fused: dict[tuple[int, str], dict[str, str]] = {}
    for k in keys:
        if k.endswith("position_ids"):
            continue  # a buffer, recomputed by transformers
        c = f"{comp}.{k}"
        if layout == "hf":
            out.append(Entry(prefix + k, (c,)))
            continue
        if k in _OPENCLIP_TOP:
            out.append(Entry(prefix + _OPENCLIP_TOP[k], (c,)))
        elif k == "text_projection.weight":
            out.append(Entry(prefix + "text_projection", (c,), "transpose"))
        elif m := re.match(r"text_model\.encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)$", k):
            fused.setdefault((int(m[1]), m[3]), {})[m[2]] = c
        elif m := re.match(r"text_model\.encoder\.layers\.(\d+)\.(self_attn\.out_proj|layer_norm[12]|mlp\.fc[12])\.(.+)$", k):
            out.append(Entry(f"{prefix}transformer.resblocks.{m[1]}.{_OPENCLIP_LAYER[m[2]]}.{m[3]}", (c,)))
        else:
            raise LayoutError(f"{comp} key {k!r} has no place in the OpenCLIP layout")
    for (i, wb), qkv in sorted(fused.items()):
        if set(qkv) != {"q", "k", "v"}:
            raise LayoutError(f"{comp} layer {i}: incomplete q/k/v projections")
        out.append(Entry(f"{prefix}transformer.resblocks.{i}.attn.in_proj_{wb}", (qkv["q"], qkv["k"], qkv["v"]), "cat"))
    return out


# -- whole pipeline ----------------------------------------------------------------------------
def layout_entries(components: Mapping[str, Iterable[str]], configs: Mapping[str, dict],
                   family: str | None = None) -> list[Entry]:
    """Every single-file entry, given each component's canonical keys and configs.

    ``components``: component name -> its state-dict keys (text encoders: canonical keys,
    see :func:`canonical_text_key`). Raises :class:`LayoutError` for any key with no place.
    """
    family = family or detect_family(encoders_from_configs(configs))
    out: list[Entry] = []
    if "unet" in components:
        ul = UNetLayout(configs["unet"])
        out += [Entry(ul.key(k), (f"unet.{k}",)) for k in components["unet"]]
    if "vae" in components:
        vl = VAELayout(configs["vae"])
        for k in components["vae"]:
            key, op = vl.key(k)
            out.append(Entry(key, (f"vae.{k}",), op))
    for comp, (layout, prefix) in TEXT_ENCODER_LAYOUT[family].items():
        if comp in components:
            out += text_encoder_entries(comp, components[comp], layout, prefix)
    seen: dict[str, Entry] = {}
    for e in out:
        if e.key in seen:
            raise LayoutError(f"two tensors map onto {e.key}: {seen[e.key].parts} and {e.parts}")
        seen[e.key] = e
    return out


def is_pipeline(obj) -> bool:
    return hasattr(obj, "unet") and hasattr(obj, "text_encoder")


def pipeline_configs(pipe) -> dict[str, dict]:
    out = {}
    for comp in COMPONENTS:
        m = getattr(pipe, comp, None)
        if m is not None:
            out[comp] = _cfg(m.config)
    return out


def component_keys(comp: str, module: torch.nn.Module) -> list[str]:
    keys = list(module.state_dict().keys())
    return [canonical_text_path(k) for k in keys] if comp in TEXT_ENCODERS else keys


def pipeline_entries(pipe) -> list[Entry]:
    comps = {c: component_keys(c, getattr(pipe, c)) for c in COMPONENTS if getattr(pipe, c, None) is not None}
    return layout_entries(comps, pipeline_configs(pipe))


# -- configs without a pipeline ---------------------------------------------------------------
@contextlib.contextmanager
def params_on_meta():
    """Create modules with their parameters on the meta device (buffers stay real, so e.g.
    CLIP's ``position_ids`` is correct). Like accelerate's ``init_empty_weights``."""
    old = torch.nn.Module.register_parameter

    def register(self, name, param):
        old(self, name, param)
        if param is not None and param.device.type != "meta":
            p = self._parameters[name]
            self._parameters[name] = type(p)(p.to("meta"), requires_grad=p.requires_grad)

    torch.nn.Module.register_parameter = register
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = old


def read_configs(folder: str | Path) -> dict:
    """Component configs and class names of a local diffusers folder (no weights read)."""
    folder = Path(folder)
    index_path = folder / "model_index.json"
    if not index_path.exists():
        raise LayoutError(f"{folder} is not a diffusers folder (no model_index.json)")
    index = json.loads(index_path.read_text())
    out: dict = {"_class_name": index.get("_class_name"), "_classes": {}}
    for comp in COMPONENTS:
        spec = index.get(comp)
        if not spec or spec[0] is None:
            continue
        cfg = folder / comp / "config.json"
        if not cfg.exists():
            raise LayoutError(f"{folder}: missing {comp}/config.json")
        out[comp] = json.loads(cfg.read_text())
        out["_classes"][comp] = spec[1]
    return out


def meta_component(comp: str, config: dict, class_name: str | None = None) -> torch.nn.Module:
    """A component built from its config with meta parameters (costs no memory)."""
    with params_on_meta():
        if comp == "unet":
            from diffusers import UNet2DConditionModel

            return UNet2DConditionModel.from_config(config)
        if comp == "vae":
            from diffusers import AutoencoderKL

            return AutoencoderKL.from_config(config)
        import transformers

        cfg = transformers.CLIPTextConfig.from_dict({k: v for k, v in config.items() if not k.startswith("_")})
        cls = getattr(transformers, class_name or "CLIPTextModel")
        return cls(cfg)


def configs_and_modules(pipe_or_configs, components=COMPONENTS):
    """(configs, {comp: module}) from a pipeline, a diffusers folder or a configs dict."""
    if is_pipeline(pipe_or_configs):
        pipe = pipe_or_configs
        mods = {c: getattr(pipe, c) for c in components if getattr(pipe, c, None) is not None}
        return pipeline_configs(pipe), mods
    cfgs = read_configs(pipe_or_configs) if isinstance(pipe_or_configs, (str, Path)) else dict(pipe_or_configs)
    classes = cfgs.get("_classes", {})
    mods = {c: meta_component(c, _cfg(cfgs[c]), classes.get(c)) for c in components if cfgs.get(c)}
    return {c: _cfg(cfgs[c]) for c in COMPONENTS if cfgs.get(c)}, mods


def entries_for(pipe_or_configs, components=COMPONENTS, family: str | None = None) -> list[Entry]:
    cfgs, mods = configs_and_modules(pipe_or_configs, components)
    return layout_entries({c: component_keys(c, m) for c, m in mods.items()}, cfgs, family)


EDIT_SUFFIXES = ("attn2.to_k.weight", "attn2.to_v.weight", "mlp.fc1.weight", "mlp.fc2.weight")


def canonical_to_single_file_keys(pipe_or_configs, *, family: str | None = None) -> dict[str, str]:
    """canonical layer name -> single-file key, for the Linear weights the engines edit:
    the UNet's cross-attention ``attn2.to_k``/``to_v`` and the text encoders' ``mlp.fc1``/``fc2``
    (OpenCLIP: ``mlp.c_fc``/``c_proj``).

    ``pipe_or_configs``: a pipeline, a local diffusers folder (configs only are read) or a
    dict ``{component: config}`` (text encoders: plus ``_classes``).
    """
    comps = ("unet",) + TEXT_ENCODERS
    out = {}
    for e in entries_for(pipe_or_configs, comps, family):
        if e.op == "copy" and e.parts[0].endswith(EDIT_SUFFIXES) and (
            e.parts[0].startswith("unet.") == ("attn2" in e.parts[0])
        ):
            out[e.parts[0][: -len(".weight")]] = e.key
    return out
