"""Null-space threshold sweep on a validation split of the bundled testbed model: how much the
preserve set's outputs move (leakage) against how well the edits land, per threshold.

    python bench/quality/nullspace_threshold.py --threads 2      # writes bench/quality/nullspace_threshold/

Validation split: the sources are the *last* 100 objects of the quality bench's source order and
the holdouts the 12 before them, so at 10 and 100 edits they never meet the concepts the quality
bench evaluates (its first 100 sources, its own 12 holdouts). Each row replaces n objects with
the bench's destinations, preserving 100 other objects (method preset ``nullspace``: text-encoder
fc2, projector corpus + preserve, destination-state targets), and reports:

  drift   measured relative change of the preserve prompts' UNet-read text states (delta metadata)
  S2D     Source2Dest on held-out paraphrases (classifier), HD  Holdout Delta (classifier)
  kept    editable dimensions per layer (mean), leak  the projector's leakage (mean)
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

THRESHOLDS = [("relative", 1e-3), ("absolute", 5e-3), ("absolute", 1e-2), ("absolute", 2e-2), ("absolute", 5e-2),
              ("absolute", 1e-1)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--counts", default="10,100")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=HERE / "nullspace_threshold")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    from concept_edit.testbed.data import caption_corpus
    from presets import make_method
    from run import Bench

    t0 = time.time()
    b = Bench(False)
    order = b.sources[::-1]
    b.holdout = order[100:112]
    b.sources = order[:100]
    corpus = caption_corpus(50_000)
    counts = [int(c) for c in a.counts.split(",")]
    rows = []
    a.out.mkdir(parents=True, exist_ok=True)
    for mode, thr in THRESHOLDS:
        for n in counts:
            meta = {}

            def method(model, plan, _m=make_method("nullspace", corpus=corpus, threshold=thr, relative=mode == "relative")):
                d = _m(model, plan)
                meta.update(d.metadata)
                return d

            r = b.object_sweep(method, [n], "replace")[0]
            kept = list(meta.get("kept_rank", {}).values())
            leak = list(meta.get("leakage", {}).values())
            rows.append({"threshold": thr, "mode": mode, "n": n, "drift": meta.get("preserve_drift"),
                         "kept": sum(kept) / max(1, len(kept)), "leak": sum(leak) / max(1, len(leak)),
                         **{k: r.get(k) for k in ("S2D_para", "S2D_tpl", "SF_para", "HD", "PD", "edit_seconds", "error")}})
            print(rows[-1], flush=True)
            (a.out / "results.json").write_text(json.dumps({"rows": rows, "seconds": time.time() - t0}, indent=1))
    write_report(rows, a.out, "python " + " ".join(["bench/quality/nullspace_threshold.py"] + (argv or sys.argv[1:])))


def write_report(rows, out: Path, cmd: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = ["# Null-space threshold sweep (validation split)", "", f"Reproduce: `{cmd}`", "",
             "Bundled testbed model; validation sources/holdouts disjoint from the quality bench's evaluation "
             "concepts at 10 and 100 edits; preset `nullspace` (text-encoder fc2, projector corpus + preserve). "
             "drift: measured relative change of the preserve prompts' text states; S2D/HD: classifier, held-out "
             "paraphrases, 12 evaluated sources, 12 holdouts.", "",
             "| threshold | n | drift | S2D (para) | S2D (tpl) | HD | kept dims | leakage |", "|---|---|---|---|---|---|---|---|"]
    f = lambda v, p=3: "" if v is None else f"{v:.{p}f}"
    for r in rows:
        lines.append(f"| {r['mode']} {r['threshold']:g} | {r['n']} | {f(r['drift'], 4)} | {f(r.get('S2D_para'))} | "
                     f"{f(r.get('S2D_tpl'))} | {f(r.get('HD'))} | {r['kept']:.0f} | {f(r['leak'], 4)} |")
    (out / "README.md").write_text("\n".join(lines) + "\n\n![sweep](sweep.png)\n")
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for n in sorted({r["n"] for r in rows}):
        rr = [r for r in rows if r["n"] == n and r.get("S2D_para") is not None]
        for ax, key in zip(axes, ("S2D_para", "HD")):
            ax.plot([r["drift"] for r in rr], [r[key] for r in rr], marker="o", label=f"{n} edits")
            for r in rr:
                ax.annotate(f"{'rel ' if r['mode'] == 'relative' else ''}{r['threshold']:g}", (r["drift"], r[key]), fontsize=7)
    for ax, t in zip(axes, ("Source2Dest (paraphrases)", "Holdout Delta")):
        ax.set_xscale("log"); ax.set_xlabel("preserve drift (relative change of preserved text states)"); ax.set_title(t)
        ax.grid(alpha=0.3); ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "sweep.png", dpi=110)


if __name__ == "__main__":
    main()
