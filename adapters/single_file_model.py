"""Lazy EditableModel over an original-layout single-file checkpoint (SD 1.x, SD 2.x, SDXL).

Only the text encoder(s) and tokenizer(s) are built; the UNet's cross-attention ``to_k``/``to_v``
(or any other mapped weight) is read from the file, with plain reads rather than a memory map,
when an engine asks for it. The UNet and VAE are never loaded, so editing an SDXL checkpoint costs about the
text encoders' memory plus the weights being edited.

Layer names, prompts, encodings and deltas are exactly those of
:class:`~concept_edit.adapters.diffusers_model.DiffusersModel` on the same model fully loaded.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace

import torch

from .base import CROSS_ATTN_SUFFIXES, canonical_text_path, text_module_path
from .diffusers_model import PICKLE_SUFFIXES, DiffusersModel, ModelLoadError
from .families import detect_family, encoders_from_configs
from .ldm_keymap import (
    TEXT_ENCODERS,
    LayoutError,
    component_keys,
    layout_entries,
    meta_component,
    read_configs,
    single_file_family,
)
from .safetensors_stream import SafetensorsReader, read_safetensors_header

_NEEDS_FULL = ("SingleFileModel loads only the text encoders (and reads edited weights lazily); "
               "{what} needs the full pipeline: load_pipeline(path, config=...) and DiffusersModel")


class TextOnlyPipeline(SimpleNamespace):
    """What a SingleFileModel has of a pipeline: text encoders, tokenizers and the UNet config.

    ``unet`` holds only ``config``; code that runs the UNet, VAE or scheduler needs a full
    pipeline (:func:`~concept_edit.adapters.diffusers_model.load_pipeline`) and gets an
    AttributeError saying so.
    """

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        raise AttributeError(_NEEDS_FULL.format(what=f"pipe.{name}"))

    def __call__(self, *a, **k):
        raise RuntimeError(_NEEDS_FULL.format(what="generating images"))


class ConfigOnlyUNet(SimpleNamespace):
    """The UNet's config, nothing else (its weights stay in the file)."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        raise AttributeError(_NEEDS_FULL.format(what=f"unet.{name}"))


class LazyWeights(Mapping):
    """name -> Parameter, read from the file only when a value is looked up."""

    def __init__(self, model: "SingleFileModel", names: list[str]):
        self._model, self._names = model, names

    def __getitem__(self, name):
        if name not in self._names:
            raise KeyError(name)
        return self._model.weights([name])[name]

    def __iter__(self):
        return iter(self._names)

    def __len__(self):
        return len(self._names)


class SingleFileModel(DiffusersModel):
    """An original-layout ``.safetensors`` checkpoint seen through the EditableModel protocol.

    ``config``: a local diffusers folder of the same architecture (model_index.json, component
    configs, tokenizer folders; its weights, if any, are not read).
    """

    def __init__(self, path: str | Path, config: str | Path, *, dtype: torch.dtype = torch.float32,
                 autocast_dtype: torch.dtype | None = None, batch_size: int = 64):
        path, config = Path(path), Path(config)
        if not path.is_file():
            raise ModelLoadError(f"model file {path} does not exist")
        if path.suffix.lower() in PICKLE_SUFFIXES:
            raise ModelLoadError(f"{path.name} is a pickled checkpoint; lazy single-file editing reads .safetensors only")
        if path.suffix.lower() != ".safetensors":
            raise ModelLoadError(f"unrecognised model file type {path.suffix!r}; expected .safetensors")
        if not (config / "model_index.json").exists():
            raise ModelLoadError(f"config {config} is not a diffusers folder (no model_index.json)")
        self.path, self.config_dir, self.dtype = path, config, dtype
        try:
            self.configs = read_configs(config)
        except LayoutError as e:
            raise ModelLoadError(str(e)) from e
        header, _ = read_safetensors_header(path)
        self.file_keys = {k: v for k, v in header.items() if k != "__metadata__"}
        self.metadata = header.get("__metadata__", {})
        self.layout_family = single_file_family(self.configs, self.file_keys)
        want = detect_family(encoders_from_configs(self.configs))
        if want != self.layout_family:
            raise ModelLoadError(f"{path.name} holds a {self.layout_family} checkpoint but config {config} is {want}")
        encoders = {c: self._load_text_encoder(c) for c in TEXT_ENCODERS if c in self.configs}
        unet_meta = meta_component("unet", self.configs["unet"])
        self._unet_names = [n for n, m in unet_meta.named_modules() if isinstance(m, torch.nn.Linear)]
        self._unet_entries = {
            e.parts[0]: e for e in layout_entries({"unet": list(unet_meta.state_dict().keys())}, self.configs, self.layout_family)
        }
        pipe = TextOnlyPipeline(
            text_encoder=encoders["text_encoder"],
            text_encoder_2=encoders.get("text_encoder_2"),
            tokenizer=self._load_tokenizer("tokenizer"),
            tokenizer_2=self._load_tokenizer("tokenizer_2") if "text_encoder_2" in encoders else None,
            unet=ConfigOnlyUNet(config=unet_meta.config),
            source=path,
        )
        del unet_meta
        self._cache: dict[str, torch.nn.Parameter] = {}
        super().__init__(pipe, autocast_dtype=autocast_dtype, batch_size=batch_size)

    # -- building ---------------------------------------------------------------------------
    def _load_tokenizer(self, sub: str):
        from transformers import CLIPTokenizer

        d = self.config_dir / sub
        if not d.is_dir():
            raise ModelLoadError(f"config {self.config_dir} has no {sub}/ folder")
        return CLIPTokenizer.from_pretrained(str(d), local_files_only=True)

    def _load_text_encoder(self, comp: str) -> torch.nn.Module:
        module = meta_component(comp, self.configs[comp], self.configs["_classes"].get(comp))
        keys = component_keys(comp, module)
        entries = layout_entries({comp: keys}, self.configs, self.layout_family)
        missing = [e.key for e in entries if e.key not in self.file_keys]
        if missing:
            raise ModelLoadError(f"{self.path.name} lacks {len(missing)} {comp} tensor(s) of the config's architecture, e.g. {missing[0]}")
        sd = {}
        # Plain reads into fresh tensors: nothing of the file stays mapped, and fresh tensors are
        # 64-byte aligned like DiffusersModel's (BLAS results can depend on alignment), which
        # keeps encodings bit-identical.
        with SafetensorsReader(self.path) as f:
            for e in entries:
                t = f.get(e.key)
                for part, x in zip(e.parts, e.split(t)):
                    sub = part.split(".", 1)[1]
                    if x.is_floating_point() and x.dtype != self.dtype:
                        x = x.to(self.dtype)
                    elif x is not t and x.untyped_storage().data_ptr() == t.untyped_storage().data_ptr():
                        x = x.clone()  # a slice of a fused tensor: give it its own storage
                    sd[text_module_path(module, sub)] = x
                del t
        module.load_state_dict(sd, strict=True, assign=True)
        return module.eval().requires_grad_(False)

    # -- layers -----------------------------------------------------------------------------
    def cross_attention_weights(self) -> dict[str, torch.nn.Parameter]:
        return self.weights([f"unet.{n}" for n in self._unet_names if n.endswith(CROSS_ATTN_SUFFIXES)])

    def single_file_key(self, name: str) -> str:
        """The file key holding canonical layer ``name``'s weight (UNet layers)."""
        e = self._unet_entries.get(name + ".weight")
        if e is None:
            raise KeyError(f"this {self.family} model does not have layer {name}")
        return e.key

    def weights(self, names) -> dict[str, torch.nn.Parameter]:
        """Canonical layer name -> weight Parameter. UNet weights are read from the file on
        first use (cast to ``dtype``) and cached, so deltas applied to them persist."""
        out, todo = {}, []
        for name in names:
            comp, _, sub = name.partition(".")
            if comp == "unet":
                if name in self._cache:
                    out[name] = self._cache[name]
                else:
                    todo.append((name, self.single_file_key(name)))
            elif comp in TEXT_ENCODERS and getattr(self.pipe, comp, None) is not None:
                enc = getattr(self.pipe, comp)
                try:
                    out[name] = enc.get_submodule(text_module_path(enc, sub)).weight
                except AttributeError as e:
                    raise KeyError(f"this {self.family} model does not have layer {name}") from e
            else:
                raise KeyError(f"this {self.family} model does not have layer {name}")
        if todo:
            with SafetensorsReader(self.path) as f:
                for name, key in todo:
                    if key not in f:
                        raise KeyError(f"{self.path.name} has no tensor {key} (layer {name})")
                    p = torch.nn.Parameter(f.get(key, self.dtype), requires_grad=False)
                    self._cache[name] = out[name] = p
        return {n: out[n] for n in names}

    def all_weights(self) -> Mapping[str, torch.nn.Parameter]:
        """Every Linear weight of the UNet and text encoders (names as DiffusersModel.all_weights);
        UNet values are read only when looked up."""
        names = [f"unet.{n}" for n in self._unet_names]
        for comp in TEXT_ENCODERS:
            m = getattr(self.pipe, comp, None)
            if m is not None:
                names += [f"{comp}.{canonical_text_path(n)}" for n, mod in m.named_modules() if isinstance(mod, torch.nn.Linear)]
        return LazyWeights(self, names)

    def loaded_bytes(self) -> int:
        """Bytes of tensors this model holds (text encoders + UNet weights read so far)."""
        n = sum(p.numel() * p.element_size() for p in self._cache.values())
        for comp in TEXT_ENCODERS:
            m = getattr(self.pipe, comp, None)
            if m is not None:
                n += sum(t.numel() * t.element_size() for t in m.state_dict().values())
        return n

    def __repr__(self):
        return f"SingleFileModel({str(self.path)!r}, family={self.family!r})"
