"""One edit on the FLUX testbed with a thin preserve set: UCE's last-token keys against its aligned
keys (the choice that decides UCE's default ``token`` on FLUX/SD3).

    python bench/quality/flux_token_one_edit.py --threads 2    # ~25 min, writes bench/quality/flux_token_one_edit/

The architectures bench (``architectures/``) scores 10 to 880 edits with a 100-object preserve set;
a user erasing or replacing one concept usually preserves a few. Here: 6 sources (erase each, or
replace it with another object), one edit at a time, preserving 1 or 10 other objects (and ""),
edit templates ``{}``, ``a photo of a {}``, ``a painting of a {}`` (the quality bench's); scored on
the 5 held-out paraphrase templates (never used to edit), one image each, the testbed classifier:

  SF        the source no longer drawn from its prompts
  S2D       (replace) the destination drawn from the source's prompts
  holdout   20 other objects (never edited or preserved) still drawn; HD = holdout - unedited

Sources, destinations, preserved objects and holdouts are disjoint, drawn (seeded) from the
objects the unedited model draws well (``flux_testbed.json``). ± is a 95% interval over the 6 edits.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
OUT = HERE / "flux_token_one_edit"
EDIT_TEMPLATES = ["{}", "a photo of a {}", "a painting of a {}"]
N_SOURCES, N_PRESERVE, N_HOLDOUT = 6, 10, 20


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=OUT)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    from concept_edit.adapters.diffusers_model import editable_model
    from concept_edit.core.apply import apply_delta
    from concept_edit.core.plan import plan_from_dict
    from concept_edit.engines.uce import uce_delta
    from concept_edit.testbed import ASSETS, get_world, load_classifier
    from concept_edit.testbed import load_flux_testbed_pipeline as load_flux
    from concept_edit.testbed.evaluate import concept_hit, generate, head_probs
    from concept_edit.testbed.grammar import HOLDOUT_TEMPLATES
    from run import ci95

    t0 = time.time()
    pipe, clf, world = load_flux(), load_classifier(), get_world()
    pipe.set_progress_bar_config(disable=True)
    good = [world.object_by_name(n) for n in json.loads((ASSETS / "flux_testbed.json").read_text())["well_drawn_head_objects"]]
    random.Random(0).shuffle(good)
    holdouts, rest = good[:N_HOLDOUT], good[N_HOLDOUT:]
    per = 2 + N_PRESERVE  # source, destination, preserved objects
    groups = [rest[i * per:(i + 1) * per] for i in range(N_SOURCES)]
    assert all(len(g) == per for g in groups), "too few well-drawn objects for the split"

    def rate(prompted, judged=None) -> float:
        imgs = generate(pipe, [t.format(o=prompted.name) for t in HOLDOUT_TEMPLATES], 7)
        return float(concept_hit(head_probs(clf, imgs), judged or prompted).mean())

    model = editable_model(pipe)
    base = float(np.mean([rate(o) for o in holdouts]))
    print(f"unedited holdouts drawn {base:.3f}", flush=True)
    rows = []
    for task in ("erase", "replace"):
        for token in ("last", "aligned"):
            for n_pres in (1, N_PRESERVE):
                per_edit = []
                for src, dst, *pres in groups:
                    edit = {"erase": src.name} if task == "erase" else {"replace": src.name, "with": dst.name}
                    plan = plan_from_dict({"edits": [edit], "preserve": [o.name for o in pres[:n_pres]],
                                           "token": token, "templates": EDIT_TEMPLATES})
                    delta = uce_delta(model, plan, progress=False)
                    h = apply_delta(delta, model.weights(delta.layers))
                    try:
                        r = {"SF": 1 - rate(src), "holdout": float(np.mean([rate(o) for o in holdouts]))}
                        if task == "replace":
                            r["S2D"] = rate(src, dst)
                    finally:
                        h.remove()
                    per_edit.append(r)
                row = {"task": task, "token": token, "preserve": n_pres}
                for k in per_edit[0]:
                    v = [r[k] - (base if k == "holdout" else 0) for r in per_edit]
                    key = "HD" if k == "holdout" else k
                    row[key], row[key + "_ci"] = round(float(np.mean(v)), 3), round(ci95(v), 3)
                rows.append(row)
                print(json.dumps(row), flush=True)
    a.out.mkdir(parents=True, exist_ok=True)
    res = {"unedited_holdout": round(base, 3), "rows": rows, "minutes": round((time.time() - t0) / 60, 1),
           "sources": [g[0].name for g in groups], "holdouts": [o.name for o in holdouts]}
    (a.out / "results.json").write_text(json.dumps(res, indent=1))
    f = lambda r, k: "" if k not in r else f"{r[k]:+.2f} ±{r[k + '_ci']:.2f}"  # noqa: E731
    lines = ["# One edit on the FLUX testbed: last-token vs aligned keys, thin preserve sets", "",
             f"Reproduce: `python bench/quality/flux_token_one_edit.py --threads 2` ({res['minutes']} min on 2 CPU "
             "cores). Conditions: see the script's docstring; 6 edits per row, one at a time, 20 holdout objects, "
             f"5 held-out templates, one image each; unedited holdouts drawn {base:.2f}. ± = 95% interval over the "
             "6 edits.", "",
             "| task | token | preserved objects | SF | S2D | HD |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['task']} | {r['token']} | {r['preserve']} | {f(r, 'SF')} | {f(r, 'S2D')} | {f(r, 'HD')} |" for r in rows]
    (a.out / "README.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {a.out / 'README.md'}")


if __name__ == "__main__":
    main()
