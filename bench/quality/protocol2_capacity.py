"""Why protocol 2's scale aim is out of reach on the testbed: key geometry, not the C0 weight.

    python bench/quality/protocol2_capacity.py            # ~1.5 min; writes protocol2/capacity.md

For the layers EMCID edits on the UNet testbed (text-encoder ``mlp.fc2``, layers 0-2), with the
engine's own keys (subject token, mean over the edit templates) and C0 (``caption_moments`` over the
protocol-2 corpus, padded positions), this measures:

* how many dimensions the 450 sources' keys occupy, and what share of a holdout's key lies in their
  span (holdouts inside C0 and outside it, the split's ``test_in`` / ``test_out``);
* the *transfer* of a single-layer closed-form edit ``D = R K^T (w C0 + K K^T)^-1``: a key ``k``
  moves by ``R K^T A^-1 k``; with residuals of equal size, ``|K A^-1 k|`` says how far ``k`` moves
  per unit edit. Reported for holdouts relative to the edited sources, per edit count ``n`` and C0
  weight ``w`` (EMCID's ``cov_weight``).

A holdout moved as far as a source is edited as much as a source; no choice of ``w`` helps if the
ratio does not fall with it. This is one layer, without EMCID's spreading over layers; it explains
the measured Holdout Deltas, it does not replace them.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import protocol2 as P  # noqa: E402

LAYERS = [0, 1, 2]
COUNTS = [10, 100, 450]
WEIGHTS = [100, 1000, 10000]
TEMPLATES = ["{}", "a photo of a {}", "a painting of a {}"]


def concept_keys(model, names: list[str], layers: list[int]) -> dict[int, torch.Tensor]:
    """Per layer: (len(names), d) fc2 inputs at the subject token, averaged over TEMPLATES."""
    from concept_edit.adapters.text_encoder import subject_states, tokenize_prompts
    from concept_edit.core.prompts import expand

    prompts = [p for n in names for p in expand(n, TEMPLATES)]
    st = subject_states(model, "text_encoder", tokenize_prompts(model, prompts), fc2_layers=layers)
    return {l: st[("fc2_in", l)].double().view(len(names), len(TEMPLATES), -1).mean(1) for l in layers}


def measure(split_file: Path) -> dict:
    from concept_edit.adapters.diffusers_model import DiffusersModel
    from concept_edit.adapters.text_encoder import fc2_name
    from concept_edit.engines.second_moments import caption_moments
    from concept_edit.testbed import get_world, load_testbed_pipeline

    world, split = get_world(), json.loads(split_file.read_text())
    model = DiffusersModel(load_testbed_pipeline())
    corpus = P.protocol_corpus(world, split)
    sources = (split["test_src"] + split["filler"] + split["val_src"] + split["val_in"])[: max(COUNTS)]
    names = lambda idx: [world.objects[i].name for i in idx]
    c0, _, _ = caption_moments(model, corpus, [fc2_name("text_encoder", l, model) for l in LAYERS],
                               batch_size=128, positions="padded", progress=True)
    ks = concept_keys(model, names(sources), LAYERS)
    kin = concept_keys(model, names(split["test_in"][:100]), LAYERS)
    kout = concept_keys(model, names(split["test_out"][:100]), LAYERS)
    rows = []
    for l in LAYERS:
        C0 = c0[fc2_name("text_encoder", l, model)]
        s = torch.linalg.svdvals(ks[l])
        e = (s**2).cumsum(0) / (s**2).sum()
        Q, _ = torch.linalg.qr(ks[l].T)
        span = {k: float((((H @ Q).norm(dim=1) / H.norm(dim=1)) ** 2).mean()) for k, H in (("in", kin[l]), ("out", kout[l]))}
        geo = {"layer": l, "d": ks[l].shape[1], "dims90": int((e < 0.9).sum()) + 1, "dims99": int((e < 0.99).sum()) + 1,
               "span_in": span["in"], "span_out": span["out"], "cells": []}
        for n in COUNTS:
            K = ks[l][:n]
            for w in WEIGHTS:
                Ainv = torch.linalg.inv(w * C0 + K.T @ K)
                t = lambda X: float((K @ Ainv @ X.T).norm(dim=0).mean())
                ts = t(K)
                geo["cells"].append({"n": n, "w": w, "source": ts, "in": t(kin[l]) / ts, "out": t(kout[l]) / ts})
        rows.append(geo)
    return {"layers": rows, "corpus_captions": len(corpus), "split": split_file.name}


def report(res: dict, seconds: float, threads: int) -> str:
    lines = ["# Protocol 2: key geometry of the testbed's text encoder (why the scale aim is out of reach)", "",
             f"Reproduce: `python bench/quality/protocol2_capacity.py` ({seconds / 60:.1f} min, {threads} thread(s)). "
             f"Split `{res['split']}`; C0 over the protocol-2 corpus ({res['corpus_captions']:,} captions, padded "
             "positions); keys = fc2 inputs at the subject token, mean over the 3 edit templates; 450 sources "
             "(the 450-edit set), 100 holdouts inside C0, 100 outside.", "",
             "| layer | key width | dims holding 90% / 99% of the 450 source keys' energy | "
             "share of a holdout key in their span (in C0 / outside) |", "|---|---|---|---|"]
    for g in res["layers"]:
        lines.append(f"| {g['layer']} | {g['d']} | {g['dims90']} / {g['dims99']} | {g['span_in']:.3f} / {g['span_out']:.3f} |")
    lines += ["", "Transfer of a one-layer closed-form edit (`|K A^-1 k|`, A = w C0 + K K^T): how far a holdout's "
              "key moves relative to an edited source's (1.00 = as far as a source).", "",
              "| layer | edits n | C0 weight w | source (absolute) | holdout in C0 / source | holdout outside C0 / source |",
              "|---|---|---|---|---|---|"]
    for g in res["layers"]:
        for c in g["cells"]:
            lines.append(f"| {g['layer']} | {c['n']} | {c['w']:,} | {c['source']:.3f} | {c['in']:.2f} | {c['out']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--split", type=Path, default=HERE / "protocol2" / "split_seed0.json")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=HERE / "protocol2" / "capacity.md")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    t0 = time.time()
    res = measure(a.split)
    text = report(res, time.time() - t0, a.threads)
    a.out.write_text(text)
    a.out.with_suffix(".json").write_text(json.dumps(res, indent=1))
    print(text)
    return res


if __name__ == "__main__":
    main()
