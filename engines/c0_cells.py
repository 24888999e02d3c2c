"""C0 with edited captions left out, from a cached partition of the caption corpus into cells.

The exclusion query: given the captions to drop D (those naming an edited concept), return the
mean second moment over the kept captions K. Recomputing the smaller of D and K on every edit
(the ``direct`` path in :mod:`.second_moments`) is an encoder pass plus a d x d Gram per layer over
up to half the corpus: 45-70 s per edit on the testbed at 300-918 edits.

A *store* keeps, per (model fingerprint, corpus fingerprint, positions, layer set), a partition of
the corpus's captions into cells and, for every cell and layer, the cell's un-normalised sum
``sum_{captions in cell} sum_{positions} k k^T`` (float64, upper triangle packed: d(d+1)/2 values).
It starts as one cell, the whole corpus, taken from the full-corpus cache. A query:

1. every cell entirely inside D or entirely inside K is used as it is;
2. a cell split by D is split in two: the smaller side's captions are encoded and their sums
   computed, the other side's sums are the cell's minus those (float64);
3. the result is the sum over the cells inside K, divided by their sample count;
4. if the store now holds more cells than the budget allows, cells on the same side of this query
   are merged (sums added), smallest first, so this query stays answerable from its cells.

The result is C0 of exactly the kept captions: cells are sets of captions (a caption naming
several edited concepts is in one cell, counted once) and the dropped set is
:func:`.second_moments.mention_mask`, the same whole-word match as before. It differs from a direct
computation over the kept captions only by float64 rounding (summation order; each split adds one
float64 subtraction of the parent's sums).

Cost: a query that the cells already answer (the same edit set again, by another method or another
run; or any set whose captions are unions of cells) reads and adds the cells: no encoder pass. A new
set costs the captions by which it differs from the cells (for a sweep 10 -> 100 -> 300 -> 918
edits, the captions of the added concepts, or the kept ones if fewer), never more than the direct
path. Answering *any* set of concepts from sums alone would need one cell per concept, i.e.
#concepts x layers x d(d+1)/2 x 8 bytes (the testbed's 1,000 objects at 3 layers of 1024: 12.6 GB;
SD 1.5 at 11 layers of 3072: 415 MB per concept); the budget decides how many cells are kept.

Bounds. One cell costs ``sum_layers d(d+1)/2 x 8`` bytes (testbed EMCID layers: 12.6 MB; SD 1.5,
11 layers: 415 MB; SDXL at 10 layers of 3072 and 30 of 5120: 3.5 GB). A store holds at most
``max(2, budget // cell_bytes)`` cells (default budget 1 GiB, ``$CONCEPT_EDIT_C0_CELL_BYTES``), plus a
4-byte-per-caption cell map; at most ``max_stores`` stores (default 3,
``$CONCEPT_EDIT_C0_CELL_STORES``) are kept per cache folder, the least recently used removed first.
So the folder holds at most ``max_stores x max(budget, 2 cells)`` for exclusions, besides the
full-corpus files. Memory: one cell per layer at a time while splitting, merging or summing, plus
the Gram sums of at most ``layers_per_pass`` layers while encoding.

Files (under ``<cache dir>/c0x_<family>_<model fp>_<corpus fp>_<positions>_<layer-set hash>/``):
``partition.safetensors`` (the cell of every caption, int32, and the cell list with sample counts
and fingerprints in its metadata) and ``cell_<id>_<layer #>.safetensors`` (one packed sum). Cell
files are immutable and written before the partition that names them; every file is written
atomically (:mod:`..core.atomic`), and cells no longer named are deleted after the partition is
replaced. A store whose files are missing, mismatched or unreadable (e.g. another process changed
it meanwhile) is rebuilt from the full-corpus sums, so results never depend on a race.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import secrets
import shutil
from pathlib import Path

import torch

from ..core.atomic import atomic_path
from ..core.progress import tqdm

FORMAT = "1"
DEFAULT_BUDGET = 1 << 30
DEFAULT_MAX_STORES = 3
PARTITION = "partition.safetensors"


class _StoreBroken(Exception):
    pass


def cell_budget(budget: int | None = None) -> int:
    if budget is not None:
        return int(budget)
    return int(os.environ.get("CONCEPT_EDIT_C0_CELL_BYTES", DEFAULT_BUDGET))


def store_limit(max_stores: int | None = None) -> int:
    if max_stores is not None:
        return max(1, int(max_stores))
    return max(1, int(os.environ.get("CONCEPT_EDIT_C0_CELL_STORES", DEFAULT_MAX_STORES)))


@functools.lru_cache(maxsize=8)
def _upper(d: int) -> torch.Tensor:
    return torch.ones(d, d, dtype=torch.bool).triu()


def pack(m: torch.Tensor) -> torch.Tensor:
    """The upper triangle of a symmetric d x d matrix, row by row (d(d+1)/2 values)."""
    return m[_upper(m.shape[0])].contiguous()


def unpack(v: torch.Tensor, d: int) -> torch.Tensor:
    m = torch.zeros(d, d, dtype=v.dtype)
    up = _upper(d)
    m[up] = v
    return m + m.triu(1).mT


def store_dir(root: Path, family: str, mfp: str, cfp: str, positions: str, layers: list[str]) -> Path:
    lh = hashlib.sha256(json.dumps(sorted(layers)).encode()).hexdigest()[:10]
    return Path(root) / f"c0x_{family}_{mfp}_{cfp}_{positions}_{lh}"


class _Store:
    """A partition of the corpus into cells, with one packed sum per (cell, layer) on disk."""

    def __init__(self, path: Path, layers: list[str], dims: dict[str, int], ident: dict, n_captions: int):
        self.path, self.layers, self.dims, self.ident, self.n = path, layers, dims, ident, n_captions
        self.cells: list[dict] = []  # {"id", "n_captions", "n_samples": {layer: int}}
        self.assign = torch.zeros(n_captions, dtype=torch.int64)  # caption -> position in self.cells
        self.dirty = False

    # -- files ------------------------------------------------------------------------------
    def _file(self, cell_id: str, li: int) -> Path:
        return self.path / f"cell_{cell_id}_{li}.safetensors"

    def read(self, cell: dict, li: int) -> torch.Tensor:
        from safetensors import safe_open

        f = self._file(cell["id"], li)
        try:
            with safe_open(str(f), "pt") as h:
                meta = h.metadata() or {}
                v = h.get_tensor("sum")
        except Exception as e:  # missing (another process replaced the store) or unreadable
            raise _StoreBroken(f"{f.name}: {e}") from None
        name = self.layers[li]
        d = self.dims[name]
        if (meta.get("cell") != cell["id"] or meta.get("layer") != name or meta.get("key") != self.ident["key"]
                or v.dtype != torch.float64 or v.shape != (d * (d + 1) // 2,)):
            raise _StoreBroken(f"{f.name} does not belong to this store")
        return v

    def write(self, cell_id: str, li: int, v: torch.Tensor) -> None:
        from safetensors.torch import save_file

        f = self._file(cell_id, li)
        try:
            with atomic_path(f, overwrite=True) as tmp:
                save_file({"sum": v.contiguous()}, str(tmp), metadata={"cell": cell_id, "layer": self.layers[li],
                                                                       "key": self.ident["key"]})
        except OSError as e:  # e.g. the folder removed meanwhile by another process's eviction
            raise _StoreBroken(f"{f.name}: {e}") from None

    def load(self) -> None:
        from safetensors import safe_open

        f = self.path / PARTITION
        try:
            with safe_open(str(f), "pt") as h:
                meta = h.metadata() or {}
                assign = h.get_tensor("cell").to(torch.int64)
        except Exception as e:
            raise _StoreBroken(f"{f}: {e}") from None
        try:
            index = json.loads(meta["index"])
        except (KeyError, ValueError) as e:
            raise _StoreBroken(f"{f}: no index") from e
        if index.get("format") != FORMAT or index.get("ident") != self.ident or index.get("layers") != self.layers:
            raise _StoreBroken(f"{f} belongs to another model, corpus, positions or layer set")
        cells = index["cells"]
        if assign.shape != (self.n,) or not cells or int(assign.min()) < 0 or int(assign.max()) >= len(cells):
            raise _StoreBroken(f"{f}: malformed cell map")
        sizes = torch.bincount(assign, minlength=len(cells))
        if any(int(sizes[i]) != c["n_captions"] for i, c in enumerate(cells)):
            raise _StoreBroken(f"{f}: cell sizes do not match the cell map")
        self.cells, self.assign = cells, assign

    def save(self) -> None:
        from safetensors.torch import save_file

        index = {"format": FORMAT, "ident": self.ident, "layers": self.layers, "cells": self.cells}
        try:
            with atomic_path(self.path / PARTITION, overwrite=True) as tmp:
                save_file({"cell": self.assign.to(torch.int32).contiguous()}, str(tmp),
                          metadata={"index": json.dumps(index)})
        except OSError as e:
            raise _StoreBroken(f"{PARTITION}: {e}") from None
        live = {self._file(c["id"], li).name for c in self.cells for li in range(len(self.layers))}
        for p in self.path.glob("cell_*.safetensors"):
            if p.name not in live:
                p.unlink(missing_ok=True)

    def reset(self, sums: dict[str, torch.Tensor], counts: dict[str, int]) -> None:
        """One cell: the whole corpus (``sums``: un-normalised full-corpus sums, d x d). The old files
        are left to :meth:`save` (removed once the new partition is in place), not deleted here:
        another process may be reading them."""
        self.path.mkdir(parents=True, exist_ok=True)
        cid = secrets.token_hex(6)
        for li, name in enumerate(self.layers):
            self.write(cid, li, pack(sums[name]))
        self.cells = [{"id": cid, "n_captions": self.n, "n_samples": {n: int(counts[n]) for n in self.layers}}]
        self.assign = torch.zeros(self.n, dtype=torch.int64)
        self.dirty = True


def _evict(root: Path, keep: Path, max_stores: int) -> list[str]:
    """Remove the least recently used stores beyond ``max_stores`` (``keep`` stays)."""
    stores = []
    for p in Path(root).glob("c0x_*"):
        if p.is_dir() and p != keep:
            part = p / PARTITION
            stores.append((part.stat().st_mtime if part.exists() else 0.0, p))
    stores.sort()
    gone = []
    for _, p in stores[: max(0, len(stores) - (max_stores - 1))]:
        shutil.rmtree(p, ignore_errors=True)
        gone.append(p.name)
    return gone


def excluded_sums(
    captions: list[str],
    dropped: torch.Tensor,
    full_means: dict[str, torch.Tensor],
    full_counts: dict[str, int],
    *,
    sums_of,
    root: Path,
    ident: dict,
    budget: int | None = None,
    max_stores: int | None = None,
    layers_per_pass: int = 8,
    progress: bool = True,
) -> tuple[dict[str, torch.Tensor], dict[str, int], dict] | None:
    """Sums (d x d, float64, un-normalised) and sample counts over the captions not in ``dropped``
    (bool per caption), from the store for ``ident``; returns (sums, counts, info), or None if the
    store could not be used even after rebuilding it (e.g. processes racing on it, a full disk):
    the caller then computes the sums without it.

    ``sums_of(captions, names) -> (sums, counts)`` computes un-normalised sums over some captions
    (the caller's encoder pass); it is asked for at most ``layers_per_pass`` layers at a time. ``ident``: model_fingerprint,
    corpus_fingerprint, positions, family; it names the store with the layers of ``full_means``.
    """
    layers = sorted(full_means)
    dims = {n: int(full_means[n].shape[0]) for n in layers}
    path = store_dir(root, ident["family"], ident["model_fingerprint"], ident["corpus_fingerprint"], ident["positions"], layers)
    ident = {**ident, "key": path.name}
    cell_bytes = sum(d * (d + 1) // 2 * 8 for d in dims.values())
    max_cells = max(2, cell_budget(budget) // cell_bytes)
    info = {"mode": "cells", "store": str(path), "max_cells": max_cells, "cell_bytes": cell_bytes}
    dropped = torch.as_tensor(dropped, dtype=torch.bool)
    out = None
    for attempt in (0, 1):
        st = _Store(path, layers, dims, ident, len(captions))
        try:
            try:
                if attempt:
                    raise _StoreBroken(info["rebuilt"])
                st.load()
                info["rebuilt"] = None
            except _StoreBroken as e:
                info["rebuilt"] = str(e) if path.exists() else "new store"
                st.reset({n: full_means[n] * full_counts[n] for n in layers}, full_counts)
            out = _query(captions, st, dropped, sums_of, max_cells, max(1, layers_per_pass), progress)
            break
        except _StoreBroken as e:
            info["rebuilt"] = str(e)
    if out is None:
        return None
    sums, counts, qinfo = out
    info.update(qinfo)
    info["evicted_stores"] = _evict(root, path, store_limit(max_stores))
    return sums, counts, info


def _query(captions, st: _Store, dropped, sums_of, max_cells, per_pass, progress):
    L = len(st.layers)
    n_cells = len(st.cells)
    size = torch.bincount(st.assign, minlength=n_cells)
    inside = torch.bincount(st.assign[dropped], minlength=n_cells)
    split = [i for i in range(n_cells) if 0 < int(inside[i]) < int(size[i])]
    n_encoded = 0
    for i in tqdm(split, desc="C0 cells", disable=not progress or len(split) < 2, leave=False):
        cell = st.cells[i]
        take_dropped = int(inside[i]) <= int(size[i]) - int(inside[i])
        part = (st.assign == i) & (dropped if take_dropped else ~dropped)
        idx = part.nonzero().flatten()
        part_caps = [captions[j] for j in idx.tolist()]
        n_encoded += len(idx)
        pid, rid = secrets.token_hex(6), secrets.token_hex(6)
        c_part = {}
        for g in range(0, L, per_pass):  # at most per_pass layers' d x d sums in memory at once
            group = st.layers[g : g + per_pass]
            s_part, counts = sums_of(part_caps, group)
            c_part.update(counts)
            for name in group:
                li = st.layers.index(name)
                p = pack(s_part.pop(name).to(torch.float64))
                st.write(pid, li, p)
                st.write(rid, li, st.read(cell, li) - p)
        st.cells[i] = {"id": rid, "n_captions": cell["n_captions"] - len(idx),
                       "n_samples": {n: cell["n_samples"][n] - int(c_part[n]) for n in st.layers}}
        st.cells.append({"id": pid, "n_captions": len(idx), "n_samples": {n: int(c_part[n]) for n in st.layers}})
        st.assign[idx] = len(st.cells) - 1
    # every cell is now inside D or inside K
    side = torch.zeros(len(st.cells), dtype=torch.bool)
    side[st.assign[dropped].unique()] = True
    n_merged = 0
    while len(st.cells) > max_cells:
        # merge the two smallest cells of the side with more cells (this query stays answerable)
        d_cells = [i for i in range(len(st.cells)) if side[i]]
        k_cells = [i for i in range(len(st.cells)) if not side[i]]
        group = d_cells if len(d_cells) >= len(k_cells) else k_cells
        a, b = sorted(group, key=lambda i: st.cells[i]["n_captions"])[:2]
        ca, cb = st.cells[a], st.cells[b]
        mid = secrets.token_hex(6)
        for li in range(L):
            st.write(mid, li, st.read(ca, li) + st.read(cb, li))
        st.cells[a] = {"id": mid, "n_captions": ca["n_captions"] + cb["n_captions"],
                       "n_samples": {n: ca["n_samples"][n] + cb["n_samples"][n] for n in st.layers}}
        st.assign[st.assign == b] = a
        last = len(st.cells) - 1  # move the last cell into b's place
        if b != last:
            st.cells[b] = st.cells[last]
            st.assign[st.assign == last] = b
            side[b] = side[last]
        st.cells.pop()
        side = side[: len(st.cells)]
        n_merged += 1
    kept = [c for i, c in enumerate(st.cells) if not side[i]]
    sums, counts = {}, {}
    for li, name in enumerate(st.layers):
        acc = None
        for c in kept:
            v = st.read(c, li)
            acc = v if acc is None else acc + v
        sums[name] = unpack(acc, st.dims[name])
        counts[name] = sum(c["n_samples"][name] for c in kept)
    if split or n_merged or st.dirty:
        st.save()
    else:  # mark the store as used (eviction is least recently used first)
        os.utime(st.path / PARTITION)
    return sums, counts, {"cells": len(st.cells), "kept_cells": len(kept), "split_cells": len(split),
                          "merged_cells": n_merged, "captions_encoded": n_encoded}
