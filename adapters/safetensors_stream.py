"""safetensors read and written one tensor at a time: header parsing, streamed writes and byte-range
copies, so a multi-GB checkpoint is never held in memory."""
from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Callable, Mapping

import torch


class SafetensorsFormatError(ValueError):
    """A file that is not a well-formed safetensors file (bad header, truncated data)."""


DTYPE_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
for _n, _s in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2")):
    if hasattr(torch, _n):
        DTYPE_NAMES[getattr(torch, _n)] = _s
_DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}
COPY_CHUNK = 64 << 20


MAX_HEADER = 100 << 20


def read_safetensors_header(path: str | Path) -> tuple[dict, int]:
    """(header JSON, byte offset where the data section starts) of a .safetensors file.

    Every entry is checked before anything is allocated: known dtype, non-negative integer shape,
    ``data_offsets`` spanning exactly shape x dtype size and lying inside the file. Raises
    :class:`SafetensorsFormatError` naming the file and the problem."""
    path = Path(path)
    name = path.name
    if path.is_dir():
        raise SafetensorsFormatError(f"{path} is a folder, not a .safetensors file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise SafetensorsFormatError(f"{name} is not a safetensors file ({'empty' if not raw else 'too short'})")
        (n,) = struct.unpack("<Q", raw)
        if n > MAX_HEADER or 8 + n > size:
            raise SafetensorsFormatError(f"{name} is not a safetensors file or is truncated: its header claims "
                                         f"{n} bytes, the file has {size}")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SafetensorsFormatError(f"{name} is not a safetensors file: its header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise SafetensorsFormatError(f"{name}: safetensors header is not a JSON object")
    data = size - 8 - n
    for key, info in header.items():
        if key == "__metadata__":
            if info is not None and not (isinstance(info, dict) and all(isinstance(v, str) for v in info.values())):
                raise SafetensorsFormatError(f"{name}: __metadata__ must map strings to strings")
            continue
        _check_entry(name, key, info, data)
    return header, 8 + n


def _check_entry(name: str, key: str, info, data_size: int) -> None:
    def bad(why):
        raise SafetensorsFormatError(f"{name}: tensor {key!r} {why}")

    if not isinstance(info, dict):
        bad("has no dtype/shape/data_offsets entry")
    dt, shape, offs = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dt not in _DTYPE_SIZES:
        bad(f"has unknown dtype {dt!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        bad(f"has an invalid shape {shape!r}")
    if (not isinstance(offs, list) or len(offs) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offs) or not 0 <= offs[0] <= offs[1]):
        bad(f"has invalid data_offsets {offs!r}")
    if offs[1] - offs[0] != nbytes(dt, shape):
        bad(f"claims shape {shape} ({dt}, {nbytes(dt, shape)} bytes) but spans {offs[1] - offs[0]} bytes")
    if offs[1] > data_size:
        bad(f"lies past the end of the file (needs {offs[1]} data bytes, the file has {data_size}); truncated?")


def nbytes(dtype: str, shape) -> int:
    return math.prod(shape) * _DTYPE_SIZES[dtype]


def tensor_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().cpu().contiguous().reshape(-1)
    return memoryview(t.view(torch.uint8).numpy()) if t.numel() else memoryview(b"")


def write_stream(path: str | Path, specs: list[tuple[str, str, list[int]]], emit: Callable, *,
                 metadata: Mapping[str, str] | None = None) -> None:
    """Write a .safetensors file whose tensors ``(key, dtype, shape)`` are produced one at a time:
    ``emit(key, f)`` must write exactly that tensor's bytes to ``f``."""
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    off = 0
    for key, dt, shape in specs:
        n = nbytes(dt, shape)
        header[key] = {"dtype": dt, "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for key, dt, shape in specs:
            start = f.tell()
            emit(key, f)
            if f.tell() - start != nbytes(dt, shape):
                raise SafetensorsFormatError(f"{key}: wrote {f.tell() - start} bytes, expected {nbytes(dt, shape)}")


def write_safetensors(path: str | Path, tensors: Mapping[str, torch.Tensor], *,
                      metadata: Mapping[str, str] | None = None) -> None:
    """Like ``safetensors.torch.save_file`` but never concatenates the tensors in memory."""
    specs = [(k, DTYPE_NAMES[t.dtype], list(t.shape)) for k, t in tensors.items()]
    write_stream(path, specs, lambda k, f: f.write(tensor_bytes(tensors[k])), metadata=metadata)


def copy_range(src, dst, start: int, n: int) -> None:
    """Copy ``n`` bytes at ``start`` of the open file ``src`` to the current position of ``dst``."""
    src.seek(start)
    buf = bytearray(min(n, COPY_CHUNK))
    view = memoryview(buf)
    while n:
        got = src.readinto(view[: min(n, len(buf))])
        if not got:
            raise SafetensorsFormatError("source file ended early")
        dst.write(view[:got])
        n -= got


_TORCH_DTYPES = {v: k for k, v in DTYPE_NAMES.items()}


class SafetensorsReader:
    """Read single tensors of a .safetensors file with plain reads (no mmap), so the process'
    resident memory holds only the tensors kept, never pages of the rest of the file."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        header, self.data_start = read_safetensors_header(self.path)
        self.metadata = header.pop("__metadata__", None) or {}
        self.header = header
        self._f = open(self.path, "rb")

    def keys(self):
        return self.header.keys()

    def __contains__(self, key):
        return key in self.header

    def get(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A fresh (aligned, writable) tensor; cast to ``dtype`` if given."""
        info = self.header[key]
        a, b = info["data_offsets"]
        src_dtype = _TORCH_DTYPES[info["dtype"]]
        buf = torch.empty(b - a, dtype=torch.uint8)
        self._f.seek(self.data_start + a)
        if b > a and self._f.readinto(buf.numpy()) != b - a:
            raise SafetensorsFormatError(f"{self.path.name}: tensor {key} is truncated")
        t = buf.view(src_dtype).reshape(info["shape"])
        return t if dtype is None or dtype == src_dtype else t.to(dtype)

    def close(self):
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
