"""Ship a trained run: export its EMA weights to ``testbed/assets/model``, evaluate, write
``testbed/assets/testbed.json`` (object count, demo plan, measurements).

    python -m concept_edit.testbed.finalize --run /work/runs/testbed/run3
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from . import ASSETS, MODEL_DIR


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", type=Path, required=True)
    ap.add_argument("--n-head", type=int, default=100)
    ap.add_argument("--n-tail", type=int, default=100)
    a = ap.parse_args(argv)
    from . import evaluate, train
    from .world import build_world

    tmp = a.run / "export_tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    args = json.loads((a.run / "args.json").read_text()) if (a.run / "args.json").exists() else {}
    train.main(["--out", str(a.run), "--export", str(tmp), "--export-only"])
    if MODEL_DIR.exists():
        shutil.rmtree(MODEL_DIR)
    shutil.copytree(tmp, MODEL_DIR)
    ck = __import__("torch").load(a.run / "ckpt.pt", weights_only=False, map_location="cpu")
    stats = {"steps": ck["step"], "minutes": round(ck["elapsed"] / 60, 1), "batch": int(args.get("batch", 32)),
             "text_encoder": dict(zip(("hidden", "layers", "mlp"), train.checkpoint_text_shape(ck["te"]))),
             "text_probe": ck.get("text_probe")}
    ev = evaluate.main(["--n-head", str(a.n_head), "--n-tail", str(a.n_tail), "--threads", "2", "--out", str(a.run / "eval.json")])
    w = build_world(1000)
    tail = ev.get("tail_train_templates", {}).get("top1", 0.0)
    n_objects = 1000 if tail >= 0.8 else 100
    good = [n for n, v in ev["head_train_templates"]["per_concept"].items()
            if v >= 1 and ev["head_holdout_templates"]["per_concept"].get(n, 0) >= 1]
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
