"""Ship a trained run: export its EMA weights, evaluate them, write the measurements.

    python -m concept_edit.testbed.finalize --run /work/runs/testbed/run3            # the UNet model
    python -m concept_edit.testbed.finalize --arch flux --run /work/runs/flux1       # the FLUX model

UNet: ``testbed/assets/model`` and ``testbed/assets/testbed.json`` (object count, demo plan,
measurements). FLUX: ``testbed/assets/flux_model`` and ``testbed/assets/flux_testbed.json``.
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from . import ASSETS, FLUX_MODEL_DIR, MODEL_DIR


def export_run(arch: str, run: Path) -> Path:
    """Export the run's current checkpoint into the shipped model folder (a temporary copy first)."""
    from . import flux_train, train

    tmp = run / "export_tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    (flux_train if arch == "flux" else train).main(["--out", str(run), "--export", str(tmp), "--export-only"])
    dest = FLUX_MODEL_DIR if arch == "flux" else MODEL_DIR
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(tmp, dest)
    return dest


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", type=Path, required=True)
    ap.add_argument("--arch", choices=("unet", "flux"), default="unet")
    ap.add_argument("--n-head", type=int, default=100)
    ap.add_argument("--n-tail", type=int, default=100)
    a = ap.parse_args(argv)
    import torch

    from . import evaluate, train
    from .world import build_world

    args = json.loads((a.run / "args.json").read_text()) if (a.run / "args.json").exists() else {}
    dest = export_run(a.arch, a.run)
    ck = torch.load(a.run / "ckpt.pt", weights_only=False, map_location="cpu")
    stats = {"steps": ck["step"], "minutes": round(ck["elapsed"] / 60, 1), "batch": int(args.get("batch", 32)),
             "text_probe": ck.get("text_probe")}
    if a.arch == "unet":
        stats["text_encoder"] = dict(zip(("hidden", "layers", "mlp"), train.checkpoint_text_shape(ck["te"])))
    else:
        stats["vocab_completion"] = ck.get("vocab_completion")
        stats["megabytes"] = round(sum(f.stat().st_size for f in dest.rglob("*") if f.is_file()) / 2**20, 1)
    ev = evaluate.main(["--arch", a.arch, "--n-head", str(a.n_head), "--n-tail", str(a.n_tail), "--threads", "2",
                        "--out", str(a.run / "eval.json")])
    w = build_world(1000)
    good = [n for n, v in ev["head_train_templates"]["per_concept"].items()
            if v >= 1 and ev["head_holdout_templates"]["per_concept"].get(n, 0) >= 1]
    if a.arch == "flux":
        meta = {"training": stats, "well_drawn_head_objects": good, "evaluation": ev}
        (ASSETS / "flux_testbed.json").write_text(json.dumps(meta, indent=1))
        print(json.dumps({k: v for k, v in meta.items() if k != "evaluation"}, indent=1))
        return
    tail = ev.get("tail_train_templates", {}).get("top1", 0.0)
    n_objects = 1000 if tail >= 0.8 else 100
    good_objs = [w.object_by_name(n) for n in good if not w.object_by_name(n).alias]
    src, dst, keep, hold = (good_objs + [o for o in w.objects if not o.alias])[:4]
    demo = {
        "edits": [{"erase": w.artists[0].name, "type": "style"}, {"replace": src.name, "with": dst.name}],
        "preserve": [w.artists[1].name, keep.name],
        "holdout": [hold.name],
        "templates": ["{}", "a photo of a {}", "a painting of a {}"],
    }
    meta = {"n_objects": n_objects, "n_objects_trained": 1000, "demo": demo, "training": stats,
            "well_drawn_head_objects": good, "evaluation": ev}
    (ASSETS / "testbed.json").write_text(json.dumps(meta, indent=1))
    print(json.dumps({k: v for k, v in meta.items() if k != "evaluation"}, indent=1))


if __name__ == "__main__":
    main()
