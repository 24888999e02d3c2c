"""Lazy MMDiT model over an original-layout FLUX / SD3 ``.safetensors`` file.

FLUX's transformer alone is 12 B parameters; an edit needs only its text readers (``txt_in`` and
``vector_in.in_layer`` for FLUX, ``context_embedder`` and ``y_embedder.mlp.0`` for SD3) and the
text encoders. So the transformer is never built: the readers' weights are read from the file
when an engine asks for them, and the text encoders and tokenizers come from ``config``, a local
diffusers folder of the same model (FLUX's original files hold only the transformer).
"""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import torch

from .diffusers_model import PICKLE_SUFFIXES, ModelLoadError
from .families import FAMILIES
from .mmdit_model import MMDiTModel
from .safetensors_stream import SafetensorsReader, read_safetensors_header

# where original-layout files keep the transformer: bare (BFL's releases), or inside a checkpoint
PREFIXES = ("", "model.diffusion_model.", "diffusion_model.")


def reader_file_keys(keys, family: str) -> dict[str, str]:
    """canonical reader name -> its weight's key in an original-layout file with ``keys``."""
    keys = set(keys)
    readers = FAMILIES[family].text_readers
    for prefix in PREFIXES:
        found = {r.module: f"{prefix}{r.original}.weight" for r in readers}
        if all(k in keys for k in found.values()):
            return found
    raise ModelLoadError(f"the file holds no {family} text readers ({', '.join(r.original for r in readers)}, "
                         f"with one of the prefixes {', '.join(repr(p) for p in PREFIXES)})")


class MMDiTSingleFile(MMDiTModel):
    """``path``: an original-layout FLUX / SD3 ``.safetensors``; ``config``: a local diffusers folder
    of the same model (FluxPipeline / StableDiffusion3Pipeline) with its text encoders."""

    def __init__(self, path: str | Path, config: str | Path, **kw):
        import diffusers

        path, config = Path(path), Path(config)
        if not path.is_file():
            raise ModelLoadError(f"model file {path} does not exist")
        if path.suffix.lower() in PICKLE_SUFFIXES or path.suffix.lower() != ".safetensors":
            raise ModelLoadError(f"{path.name}: lazy single-file editing reads .safetensors only")
        index = config / "model_index.json"
        if not index.exists():
            raise ModelLoadError(f"config {config} is not a diffusers folder (no model_index.json)")
        cls_name = json.loads(index.read_text())["_class_name"]
        if cls_name not in ("FluxPipeline", "StableDiffusion3Pipeline"):
            raise ModelLoadError(f"config {config} is a {cls_name}, not a FLUX or SD3 pipeline")
        self.path, self.config_dir = path, config
        header, _ = read_safetensors_header(path)
        self.file_keys = {k: v for k, v in header.items() if k != "__metadata__"}
        # text encoders and tokenizers from the folder; no transformer, no VAE
        pipe = getattr(diffusers, cls_name).from_pretrained(str(config), transformer=None, vae=None, local_files_only=True)
        tcfg = json.loads((config / "transformer" / "config.json").read_text())
        pipe.transformer = SimpleNamespace(config=SimpleNamespace(**tcfg))  # its config only
        super().__init__(pipe, **kw)
        self._where = reader_file_keys(self.file_keys, self.family)
        self._read: dict[str, torch.nn.Parameter] = {}

    def file_key(self, name: str) -> str:
        return self._where[name]

    def weights(self, names) -> dict[str, torch.nn.Parameter]:
        names = list(names)
        out = super().weights([n for n in names if not n.startswith("transformer.")])
        todo = [n for n in names if n.startswith("transformer.") and n not in self._read]
        if todo:
            with SafetensorsReader(self.path) as st:
                for n in todo:
                    if n not in self._where:
                        raise KeyError(f"{n} is not a text reader of this {self.family} model; only those are read")
                    self._read[n] = torch.nn.Parameter(st.get(self._where[n], torch.float32), requires_grad=False)
        return {n: out[n] if n in out else self._read[n] for n in names}

    def all_weights(self) -> dict[str, torch.nn.Parameter]:
        return {**self.weights(list(self._where)), **self.text_encoder_weights()}
