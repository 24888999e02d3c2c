"""Is the classifier a fair judge of *generated* images? An independent, rule-based labeller
compared with it on a sample of images the protocol-2 runs generated (edited and unedited).

    python bench/quality/protocol2_judge.py --samples bench/quality/protocol2/samples --out bench/quality/protocol2

The labeller learns nothing: it renders every (shape, colour, pattern) of the world with the
testbed renderer (white background, the renderer's +-1 px jitter, with and without the crown)
and labels an image by its nearest render in pixel space (least squares), reporting the
distance. The classifier labels it by the arg-max of its shape, colour and pattern heads.
Agreement on the object (all three factors) and per factor, with 95% Wilson intervals, over the
unstyled prompts (the labeller has no backgrounds or frames; prompts naming an artist are
excluded). Disagreements are kept with their images' distances: an image far from every
render (a blend, a broken sample) is one neither labeller can be right about.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from protocol2 import wilson  # noqa: E402  (the benchmark's own interval)


def template_labels(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(visuals (N,3) of the nearest render, RMS pixel distance to it in [0,255]) for uint8 images (N,32,32,3)."""
    from concept_edit.testbed.render import render
    from concept_edit.testbed.world import COLOURS, PATTERNS, SHAPES

    x = images.reshape(len(images), -1).astype(np.float32)
    xx = (x * x).sum(1)
    best_d = np.full(len(x), np.inf, dtype=np.float64)
    best_v = np.zeros((len(x), 3), dtype=np.int64)

    class _Jitter:  # render() draws its jitter from rng.integers(-1, 2, size=2)
        def __init__(self, dy, dx):
            self.v = np.array([dy, dx])

        def integers(self, *a, **k):
            return self.v

    for s in range(len(SHAPES)):  # one shape at a time keeps memory small
        vis, T = [], []
        for c in range(len(COLOURS)):
            for p in range(len(PATTERNS)):
                for crown in (0, 1):
                    for dy in (-1, 0, 1):
                        for dx in (-1, 0, 1):
                            T.append(render(s, c, p, attribute=crown, rng=_Jitter(dy, dx)).reshape(-1))
                            vis.append((s, c, p))
        T = np.stack(T).astype(np.float32)
        d = xx[:, None] + (T * T).sum(1)[None, :] - 2 * x @ T.T
        j = d.argmin(1)
        dj = d[np.arange(len(x)), j]
        better = dj < best_d
        best_d[better] = dj[better]
        best_v[better] = np.array(vis)[j[better]]
    return best_v, np.sqrt(np.maximum(best_d, 0) / x.shape[1])


def classifier_labels(images: np.ndarray) -> np.ndarray:
    from concept_edit.testbed import load_classifier
    from concept_edit.testbed.evaluate import head_probs

    pr = head_probs(load_classifier(), images)
    return np.stack([pr["shape"].argmax(1), pr["colour"].argmax(1), pr["pattern"].argmax(1)], 1)


def load_samples(folder: Path) -> tuple[np.ndarray, list[dict]]:
    ims, meta = [], []
    for f in sorted(Path(folder).glob("*.npz")):
        z = np.load(f, allow_pickle=False)
        ims.append(z["images"])
        meta += [json.loads(m) for m in z["meta"]]
    return (np.concatenate(ims) if ims else np.zeros((0, 32, 32, 3), np.uint8)), meta


def agreement(images: np.ndarray, meta: list[dict]) -> dict:
    keep = [i for i, m in enumerate(meta) if " style of " not in m["prompt"] and " by " not in m["prompt"]]
    ims = images[keep]
    meta = [meta[i] for i in keep]
    tv, dist = template_labels(ims)
    cv = classifier_labels(ims)
    out = {"n": len(ims), "n_edited": sum(m["edited"] for m in meta)}
    for name, cols in (("object", [0, 1, 2]), ("shape", [0]), ("colour", [1]), ("pattern", [2])):
        same = (tv[:, cols] == cv[:, cols]).all(1)
        k = int(same.sum())
        out[name] = {"agree": k / max(1, len(ims)), "k": k, "ci": wilson(k, len(ims))}
    close = dist <= np.quantile(dist, 0.75) if len(dist) else dist
    same = (tv == cv).all(1)
    for tag, sel in (("object_edited", np.array([m["edited"] for m in meta], bool)),
                     ("object_unedited", ~np.array([m["edited"] for m in meta], bool))):
        k, n = int(same[sel].sum()), int(sel.sum())
        out[tag] = {"agree": k / n if n else None, "k": k, "n": n, "ci": wilson(k, n)}
    out["object_closest_75pct"] = {"agree": float(same[close].mean()) if close.any() else None, "n": int(close.sum()),
                                   "ci": wilson(int(same[close].sum()), int(close.sum()))}
    out["rms_distance_quartiles"] = [float(q) for q in np.quantile(dist, [0.25, 0.5, 0.75])] if len(dist) else []
    out["_disagree_idx"] = [i for i in range(len(ims)) if not same[i]]
    out["_images"] = ims
    out["disagreements"] = [{"prompt": m["prompt"], "spec": m.get("spec"), "edited": m["edited"], "template": tv[i].tolist(),
                             "classifier": cv[i].tolist(), "rms": round(float(dist[i]), 1)}
                            for i, m in enumerate(meta) if not same[i]][:40]
    return out


def load_unedited(cache_file: Path, k: int, seed: int = 0) -> tuple[np.ndarray, list[dict]]:
    """``k`` random unedited images from a protocol-2 cache file (prompt, seed) -> (probabilities, image)."""
    z = np.load(cache_file, allow_pickle=False)
    keys = [json.loads(x) for x in z["keys"]]
    idx = np.random.default_rng(seed).choice(len(keys), min(k, len(keys)), replace=False)
    return z["images"][idx], [{"prompt": keys[i][0], "seed": keys[i][1], "edited": False, "spec": None} for i in idx]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=Path, default=HERE / "protocol2" / "samples")
    ap.add_argument("--unedited", type=Path, nargs="*", default=[], help="protocol-2 unedited-image cache files to sample")
    ap.add_argument("--n-unedited", type=int, default=200)
    ap.add_argument("--out", type=Path, default=HERE / "protocol2")
    a = ap.parse_args(argv)
    ims, meta = load_samples(a.samples)
    for f in a.unedited:
        i2, m2 = load_unedited(f, a.n_unedited)
        ims, meta = np.concatenate([ims, i2]), meta + m2
    res = agreement(ims, meta)
    a.out.mkdir(parents=True, exist_ok=True)
    sheet(res.pop("_images"), res.pop("_disagree_idx"), res["disagreements"], a.out / "judge_disagreements.png")
    (a.out / "judge.json").write_text(json.dumps(res, indent=1))
    print(json.dumps({k: v for k, v in res.items() if k != "disagreements"}, indent=1))
    return res


def sheet(ims: np.ndarray, idx: list[int], info: list[dict], path: Path, cols: int = 8) -> None:
    """The disagreeing images, 4x enlarged, titled with both labels (shape/colour/pattern names)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from concept_edit.testbed.world import COLOURS, PATTERNS, SHAPES

    idx = idx[: len(info)]
    if not idx:
        return
    name = lambda v: f"{SHAPES[v[0]]} {COLOURS[v[1]]} {PATTERNS[v[2]]}"
    rows = math.ceil(len(idx) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.9, rows * 2.3), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i, d in zip(axes.flat, idx, info):
        ax.imshow(ims[i], interpolation="nearest")
        ax.set_title(f"T: {name(d['template'])}\nC: {name(d['classifier'])}\nrms {d['rms']}", fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    main()
