"""Bake a delta into a new model on disk. The source is never written to."""
from __future__ import annotations

from pathlib import Path

import torch

from ..adapters.base import canonical_text_path
from ..adapters.ldm_convert import save_single_file
from ..adapters.ldm_keymap import (
    TEXT_ENCODERS,
    Entry,
    entries_for,
    is_pipeline,
    pipeline_configs,
    single_file_family,
)
from ..adapters.safetensors_stream import (
    SafetensorsReader,
    copy_range,
    read_safetensors_header,
    tensor_bytes,
    write_stream,
)
from ..core.apply import apply_delta, check_compatible, check_scale
from ..core.atomic import atomic_path, check_not_inside, check_output
from ..core.delta import ConceptDelta


def _model_sources(pipe, model, *extra) -> list[Path]:
    """Every on-disk input the model was read from (an output must not overlap any of them)."""
    found = [*extra, getattr(pipe, "name_or_path", None), getattr(model, "path", None), getattr(model, "config_dir", None)]
    return [Path(s) for s in found if s and Path(s).exists()]


def export_diffusers(pipe, model, delta: ConceptDelta, out_dir: str | Path, *, scale: float = 1.0,
                     check_fingerprint: bool = True, overwrite: bool = False, source: str | Path | None = None) -> Path:
    """Save ``pipe`` with ``delta`` applied as a new diffusers folder (safetensors weights).
    ``out_dir`` may not be, contain or lie inside the folder the pipeline was loaded from."""
    for src in _model_sources(pipe, model, source):
        check_not_inside(out_dir, src)
    check_output(out_dir, overwrite, directory=True)
    handle = apply_delta(delta, model.weights(delta.layers), scale=scale, check_fingerprint=check_fingerprint, model=model)
    try:
        with atomic_path(out_dir, overwrite, directory=True) as tmp:
            pipe.save_pretrained(str(tmp), safe_serialization=True)
    finally:
        handle.remove()
    return Path(out_dir)


def _canonical_part(name: str) -> str:
    """Delta layer name -> canonical parameter name used by the layout entries."""
    comp, _, sub = name.partition(".")
    if comp in TEXT_ENCODERS:
        sub = canonical_text_path(sub)
    return f"{comp}.{sub}.weight"


def _layout_source(model, pipe):
    """What the layout is computed from: the SingleFileModel's configs, else the pipeline."""
    cfgs = getattr(model, "configs", None)
    if cfgs is not None:
        return cfgs
    if pipe is None:
        pipe = getattr(model, "pipe", None)
    if pipe is None:
        raise ValueError("need the model's pipeline or configs to locate layers in the single file")
    return pipe


def export_single_file(source: str | Path | None, pipe, model, delta: ConceptDelta, out_path: str | Path, *,
                       scale: float = 1.0, check_fingerprint: bool = True, overwrite: bool = False,
                       dtype: torch.dtype | None = None) -> Path:
    """Write an original-layout (ldm/sgm) ``.safetensors`` checkpoint with ``delta`` baked in;
    ComfyUI, A1111 and diffusers' ``from_single_file`` load it like any single file.

    * ``source`` an original-layout ``.safetensors`` file: every tensor is copied byte for byte
      except the edited ones (read, delta added in float32, cast back to the file's dtype),
      streaming one tensor at a time (memory: the largest edited tensor). ``pipe`` may be None
      when ``model`` is a :class:`~concept_edit.adapters.single_file_model.SingleFileModel`.
    * ``source`` None or a diffusers folder: ``pipe`` is converted with
      :func:`concept_edit.adapters.ldm_convert.to_single_file_state_dict` with the delta applied
      (``dtype`` optionally casts, e.g. ``torch.float16``); the pipeline is restored afterwards.

    The source is never written to; the output is written atomically and an existing output is
    refused unless ``overwrite``.
    """
    out_path = Path(out_path)
    if model is None:
        from ..adapters.diffusers_model import DiffusersModel

        model = DiffusersModel(pipe)
    src = Path(source) if source is not None else None
    for s in _model_sources(pipe, model, src):
        check_not_inside(out_path, s)
    check_output(out_path, overwrite)
    weights = model.weights(delta.layers)
    check_compatible(delta, weights, check_fingerprint=check_fingerprint, model=model)
    check_scale(scale)
    if src is not None and src.is_file():
        if dtype is not None:
            raise ValueError("dtype conversion is only supported when exporting from a pipeline")
        if getattr(model, "readers", None):  # MMDiT: the text readers are whole tensors under known names
            from ..adapters.mmdit_single_file import reader_file_keys

            header, _ = read_safetensors_header(src)
            where = reader_file_keys(header, model.family)
            return _stream_bake(src, {where[n]: [(None, n)] for n in delta.layers}, {}, delta, out_path,
                                scale=scale, overwrite=overwrite)
        return _bake_single_file(src, _layout_source(model, pipe), delta, out_path, scale=scale, overwrite=overwrite)
    if pipe is None:
        pipe = getattr(model, "pipe", None)
    if pipe is None or getattr(pipe, "vae", None) is None:
        raise ValueError("exporting a single file needs a single-file source or a full pipeline")
    meta = {"concept_edit": "baked:" + str(delta.metadata.get("base_fingerprint"))}
    handle = apply_delta(delta, weights, scale=scale, check_fingerprint=False)
    try:
        save_single_file(pipe, out_path, overwrite, dtype=dtype, metadata=meta)
    finally:
        handle.remove()
    return out_path


def _bake_single_file(source: Path, layout_source, delta: ConceptDelta, out_path: Path, *, scale: float,
                      overwrite: bool) -> Path:
    header, _ = read_safetensors_header(source)
    header.pop("__metadata__", None)
    family = single_file_family(pipeline_configs(layout_source) if is_pipeline(layout_source) else layout_source, header)
    comps = sorted({n.partition(".")[0] for n in delta.layers})
    bad = [c for c in comps if c not in ("unet",) + TEXT_ENCODERS]
    if bad:
        raise ValueError(f"cannot bake {bad[0]} layers into a single file")
    entries = entries_for(layout_source, tuple(comps), family)
    where = {p: (e, i) for e in entries for i, p in enumerate(e.parts)}
    bake: dict[str, list[tuple[int, str]]] = {}
    entry_of: dict[str, Entry] = {}
    for name in delta.layers:
        hit = where.get(_canonical_part(name))
        if hit is None or hit[0].key not in header:
            raise ValueError(f"cannot locate edited layer {name} in {source.name}")
        e, i = hit
        bake.setdefault(e.key, []).append((i, name))
        entry_of[e.key] = e
    return _stream_bake(source, bake, entry_of, delta, out_path, scale=scale, overwrite=overwrite)


def _stream_bake(source: Path, bake: dict[str, list], entry_of: dict[str, Entry], delta: ConceptDelta,
                 out_path: Path, *, scale: float, overwrite: bool) -> Path:
    """Copy ``source`` tensor by tensor into ``out_path``, adding the delta to the tensors in
    ``bake`` ({file key: [(part index, layer name)]}; a key without an ``entry_of`` entry is one
    whole layer)."""
    header, data_start = read_safetensors_header(source)
    meta = dict(header.pop("__metadata__", None) or {})
    order = sorted(header, key=lambda k: header[k]["data_offsets"][0])
    specs = [(k, header[k]["dtype"], header[k]["shape"]) for k in order]
    meta["concept_edit"] = "baked:" + str(delta.metadata.get("base_fingerprint"))

    with SafetensorsReader(source) as st, open(source, "rb") as raw:
        def emit(key, f):
            if key not in bake:
                a, b = header[key]["data_offsets"]
                copy_range(raw, f, data_start + a, b - a)
                return
            e = entry_of.get(key)
            t = st.get(key)
            parts = e.split(t) if e else [t]
            for i, name in bake[key]:
                i = i or 0
                w = parts[i]
                parts[i] = (w.float() + scale * delta.layers[name].dense()).to(w.dtype)
            new = (e.combine(parts) if e else parts[0]).to(t.dtype)
            if new.shape != t.shape:
                raise ValueError(f"{key}: baked shape {tuple(new.shape)} != {tuple(t.shape)}")
            f.write(tensor_bytes(new))

        with atomic_path(out_path, overwrite) as tmp:
            write_stream(tmp, specs, emit, metadata=meta)
    return out_path
