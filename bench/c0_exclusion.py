"""C0 with edited captions left out: the cell store (engines/c0_cells.py) against the direct path.

    python bench/c0_exclusion.py                       # the run in bench/README.md
    python bench/c0_exclusion.py --counts 10,100 --corpus-size 5000 --methods emcid   # quicker

On the bundled testbed model with the quality bench's caption corpus (50,000 captions) and its
replace edits (``bench/quality/run.py``: the first n of its 918 sources, their destinations, its
preserve set and templates), times text-encoder edits with the quality bench's presets ``emcid``
and ``nullspace`` (text-encoder site) at each count, in one process, three ways:

* ``direct``: C0 exclusion as before cells (``CONCEPT_EDIT_C0_EXCLUSION=direct``): the dropped
  captions (or the kept ones, when fewer) encoded on every edit;
* ``cells``: the cell store, starting empty and used for the whole sweep in the order a bench runs
  (each count: emcid, then null-space on the same edit set);
* ``cells, first use``: the largest count alone on an empty store (a first-ever exclusion).

Each edit's time is split into the C0 part (the ``second_moments`` call, exclusion included) and
the rest (targets, per-layer keys and solves, for null-space the projector eigendecompositions
and the preserve-drift check), wall clock and CPU seconds. The full-corpus C0 is computed once
before timing (shared by every variant). Results go to a JSON file and a markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "quality"))


class Timer:
    """Wraps second_moments in the engines to time the C0 part of an edit."""

    def __init__(self):
        from concept_edit.engines import emcid, nullspace

        self.mods = (emcid, nullspace)
        self.orig = emcid.second_moments
        self.calls = []

        def timed(*a, **k):
            w, c = time.perf_counter(), time.process_time()
            out = self.orig(*a, **k)
            self.calls.append({"wall": time.perf_counter() - w, "cpu": time.process_time() - c,
                               "exclusion": out[1].get("exclusion"), "n_excluded": out[1]["n_excluded_captions"]})
            return out

        for m in self.mods:
            m.second_moments = timed

    def restore(self):
        for m in self.mods:
            m.second_moments = self.orig


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--counts", default="10,100,300,918")
    ap.add_argument("--methods", default="emcid,nullspace")
    ap.add_argument("--corpus-size", type=int, default=50_000, help="captions (the quality bench uses 50,000)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--variants", default="direct,cells,first", help="comma list of direct, cells, first")
    ap.add_argument("--cache-dir", type=Path, default=None, help="default: a temporary folder, removed at the end")
    ap.add_argument("--out", type=Path, default=None, help="JSON results")
    a = ap.parse_args(argv)

    import torch

    torch.set_num_threads(a.threads)
    from concept_edit.core.plan import plan_from_dict
    from concept_edit.engines.second_moments import second_moments
    from concept_edit.testbed.data import caption_corpus
    from presets import make_method
    from run import EDIT_TEMPLATES, Bench

    b = Bench(quick=False)
    model = b.model
    counts = sorted({min(int(x), len(b.sources)) for x in a.counts.split(",")})
    corpus = caption_corpus(a.corpus_size)
    tmp = Path(tempfile.mkdtemp(prefix="c0_exclusion_")) if a.cache_dir is None else a.cache_dir
    cov_dir = tmp / "covariance"
    # cov_cache_dir only: make_method(cache_dir=...) also sets targets_cache_dir, which the presets'
    # dest_hidden targets refuse
    methods = {m: make_method(m, corpus=corpus, cov_cache_dir=str(cov_dir)) for m in a.methods.split(",")}
    res = {"counts": counts, "corpus_size": len(corpus), "threads": a.threads, "cpu_count": os.cpu_count(),
           "loadavg_start": os.getloadavg(), "runs": []}

    def plan_for(n):
        srcs = b.sources[:n]
        edits = [{"replace": s.name, "with": b.dest[s.index].name} for s in srcs]
        return plan_from_dict({"edits": edits, "preserve": b.preserve_names(srcs), "templates": EDIT_TEMPLATES})

    # the full-corpus C0 of the layers both presets use (EMCID's default layers), once, untimed
    from concept_edit.adapters.text_encoder import fc2_name, resolve_layers

    names = [fc2_name(c, l) for c, ls in resolve_layers(model, None).items() for l in ls]
    t = time.perf_counter()
    _, info = second_moments(model, names, corpus, cache_dir=cov_dir, progress=False)
    res["full_c0_seconds"] = round(time.perf_counter() - t, 1)
    res["full_c0_computed"] = info["computed"]
    print(f"full-corpus C0 ({len(corpus)} captions, {len(names)} layers): {res['full_c0_seconds']} s", flush=True)

    def run(variant, n, mname):
        timer = Timer()
        try:
            w, c = time.perf_counter(), time.process_time()
            methods[mname](model, plan_for(n))
            wall, cpu = time.perf_counter() - w, time.process_time() - c
        finally:
            timer.restore()
        (call,) = timer.calls
        x = call["exclusion"] or {}
        row = {"variant": variant, "n": n, "method": mname, "total_s": round(wall, 2), "total_cpu_s": round(cpu, 2),
               "c0_s": round(call["wall"], 2), "c0_cpu_s": round(call["cpu"], 2),
               "rest_s": round(wall - call["wall"], 2), "rest_cpu_s": round(cpu - call["cpu"], 2),
               "n_excluded_captions": call["n_excluded"], "captions_encoded": x.get("captions_encoded"),
               "cells": x.get("cells"), "loadavg": round(os.getloadavg()[0], 2)}
        res["runs"].append(row)
        print(json.dumps(row), flush=True)
        if a.out:  # partial results survive an interrupted run
            a.out.write_text(json.dumps(res, indent=1))

    variants = a.variants.split(",")
    env = os.environ.get("CONCEPT_EDIT_C0_EXCLUSION")
    try:
        for p in cov_dir.glob("c0x_*"):
            shutil.rmtree(p)
        for n in counts:  # per count: direct, then cells (the store carries over from the smaller counts)
            if "direct" in variants:
                os.environ["CONCEPT_EDIT_C0_EXCLUSION"] = "direct"
                for m in methods:
                    run("direct", n, m)
            if "cells" in variants:
                os.environ["CONCEPT_EDIT_C0_EXCLUSION"] = "cells"
                for m in methods:
                    run("cells", n, m)
        os.environ["CONCEPT_EDIT_C0_EXCLUSION"] = "cells"
        if "first" in variants:
            for p in cov_dir.glob("c0x_*"):
                shutil.rmtree(p)
            run("cells, first use", counts[-1], next(iter(methods)))
    finally:
        if env is None:
            os.environ.pop("CONCEPT_EDIT_C0_EXCLUSION", None)
        else:
            os.environ["CONCEPT_EDIT_C0_EXCLUSION"] = env
        if a.cache_dir is None:
            shutil.rmtree(tmp, ignore_errors=True)
    res["loadavg_end"] = os.getloadavg()
    print(table(res))
    if a.out:
        a.out.write_text(json.dumps(res, indent=1))
    return res


def table(res) -> str:
    rows = ["| variant | method | n | captions dropped | captions encoded | C0 s [cpu] | rest s [cpu] | total s [cpu] | C0 vs direct |",
            "|---|---|---|---|---|---|---|---|---|"]
    direct = {(r["method"], r["n"]): r for r in res["runs"] if r["variant"] == "direct"}
    for r in res["runs"]:
        d = direct.get((r["method"], r["n"]))
        ratio = f"{r['c0_cpu_s'] / d['c0_cpu_s']:.3f}" if d and r["variant"] != "direct" and d["c0_cpu_s"] else ""
        enc = r["captions_encoded"] if r["captions_encoded"] is not None else "—"
        rows.append(f"| {r['variant']} | {r['method']} | {r['n']} | {r['n_excluded_captions']} | {enc} | "
                    f"{r['c0_s']} [{r['c0_cpu_s']}] | {r['rest_s']} [{r['rest_cpu_s']}] | {r['total_s']} [{r['total_cpu_s']}] | {ratio} |")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
