"""SPEED reference check: ConceptEdit's SPEED against the official code on the same inputs, and its time.

The official code (Ouxiang-Li/SPEED) is extracted from a local git copy into a temporary folder
(``git archive`` of ``train_erase_null.py`` and ``src/utils.py``; nothing is copied into this
repository), and its ``edit_model`` is imported and run on a tiny random-weight SD 1.x pipeline
(``concept_edit.testing``), CPU, float32 as published (``--float64``: pipeline and default dtype
float64, to separate rounding from formula differences). Its one third-party dependency,
``kmeans_pytorch`` (0.3, pure Python), is imported if installed or from ``--kmeans-wheel``
(``pip download --no-deps kmeans_pytorch==0.3``); it is called with ``device='cpu'`` instead of the
hard-coded ``'cuda'``. Without it the check says so and runs ConceptEdit's k-means (the same
iteration) in its place.

The official code draws its randomness on the GPU (augmentation noise) and with numpy (k-means
start); the check records what it drew on the CPU and hands the same to ConceptEdit's engine
(``speed_delta(..., noise=, kmeans_init=)``): the k-means starting rows, and for every augmented
copy the official d-dimensional noise projected on ConceptEdit's own least singular direction
(noise @ v v^T = (noise . v) v, whatever v's sign). Compared per edited layer: the retain keys IPF
keeps, the number of augmented copies kept, and the weight change (max |ours - official| / max
|official|); and the invariant keys (k-means centres).

``--time N``: SPEED erasing N concepts (with N retained) against UCE on the same plan, in one
process, median of ``--repeats`` runs each after a warm-up (each with a fresh key cache: prompt
encoding included); ``--family sd15`` for SD 1.5's real sizes (random weights, bench/uce_speed.py's
builder); ``--official``: the official ``edit_model`` too, on the same pipeline and concepts.

    python bench/speed_reference.py [--speed-repo /work/.mirror/Ouxiang-Li+SPEED/repo] [--kmeans-wheel W] [--float64]
    python bench/speed_reference.py --time 100 [--family tiny-sd1|sd15] [--official --kmeans-wheel W]
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.machinery
import importlib.util
import io
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import torch

FILES = ("train_erase_null.py", "src/utils.py")
HERE = Path(__file__).resolve().parent
# retain concepts of the check: more keys than the tiny model's 32 dimensions (a near full-rank
# second moment, so the threshold and the augmentation matter), fewer than the official chunk of 128
RETAIN = ("house bird car horse apple chair table window river mountain flower boat train plane cup bottle book "
          "lamp door road bridge castle forest beach cloud moon star sun rock tower pizza guitar piano clock "
          "shoe hat dress bicycle truck bus snow rain lake island garden kitchen bed sofa mirror candle").split()
TARGETS = ("cat", "tree", "dog")


def extract(repo: str, dest: Path) -> None:
    """``git -C repo archive HEAD FILES | tar -x -C dest``."""
    archive = subprocess.run(["git", "-C", repo, "archive", "HEAD", *FILES], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)


def kmeans_module(wheel: str | None):
    """(a ``kmeans_pytorch`` stand-in module for the official import, whether it wraps the real one,
    the calls: (start indices, centres)). The real k-means runs on the CPU; its numpy start is drawn
    here first (state saved and restored, so it draws the same) and recorded."""
    if wheel:
        sys.path.insert(0, wheel)
    try:
        import kmeans_pytorch as real
    except ImportError:
        real = None
    calls: list[tuple[list[int], torch.Tensor]] = []

    def kmeans(X, num_clusters, distance="euclidean", tol=1e-4, device=None):
        state = np.random.get_state()
        idx = np.random.choice(len(X), num_clusters, replace=False).tolist()
        if real is not None:
            np.random.set_state(state)
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                ids, centres = real.kmeans(X=X, num_clusters=num_clusters, distance=distance, tol=tol,
                                           device=torch.device("cpu"))
        else:
            from concept_edit.solvers.speed import kmeans as ours

            ids, centres = None, ours(X.float(), num_clusters, init=idx, tol=tol)
        calls.append((idx, centres.detach().clone()))
        return ids, centres

    mod = types.ModuleType("kmeans_pytorch")
    mod.kmeans = kmeans
    return mod, real is not None, calls


def load_official(root: Path, kmeans_mod):
    """``train_erase_null`` imported from ``root`` (pandas, used only by its command line, stubbed if absent)."""
    import diffusers  # noqa: F401  (imported before the stub below is in place)

    if importlib.util.find_spec("pandas") is None:
        stub = types.ModuleType("pandas")
        stub.__spec__ = importlib.machinery.ModuleSpec("pandas", None)
        sys.modules["pandas"] = stub
    sys.modules["kmeans_pytorch"] = kmeans_mod
    sys.path.insert(0, str(root))  # for ``from src.utils import seed_everything``
    spec = importlib.util.spec_from_file_location("speed_reference_official", root / FILES[0])
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


class NoiseRecorder:
    """Records, per call of the official ``generate_perturbed_embs`` (one per layer while the filtered
    retain set fits one chunk of 128), its input keys and the noise of each (key, copy)."""

    def __init__(self, mod):
        self.mod, self.calls = mod, []

    def __enter__(self):
        orig_gen, orig_randn = self.mod.generate_perturbed_embs, torch.randn_like

        def randn_like(x, *a, **k):
            out = orig_randn(x, *a, **k)
            self.calls[-1]["noise"].append(out.detach().clone())
            return out

        def gen(ret_embs, P, erase_weight, num_per_sample, mini_batch=8):
            call = {"keys": ret_embs.squeeze(1).detach().clone(), "noise": [], "aug": num_per_sample,
                    "mini": mini_batch}
            self.calls.append(call)
            torch.randn_like = randn_like
            try:
                out = orig_gen(ret_embs, P, erase_weight, num_per_sample, mini_batch)
            finally:
                torch.randn_like = orig_randn
            call["kept"] = out.shape[0]
            return out

        self._restore = (orig_gen, orig_randn)
        self.mod.generate_perturbed_embs = gen
        return self

    def __exit__(self, *exc):
        self.mod.generate_perturbed_embs, torch.randn_like = self._restore

    def per_key_noise(self, call: dict) -> torch.Tensor:
        """(m, aug, d): the noise each input key's copies got (the official loop: mini-batches of 8,
        then copies)."""
        keys, aug, mini = call["keys"], call["aug"], call["mini"]
        out = torch.zeros(keys.shape[0], aug, keys.shape[1], dtype=torch.float64)
        it = iter(call["noise"])
        for i in range(0, keys.shape[0], mini):
            for s in range(aug):
                n = next(it)
                out[i : i + n.shape[0], s] = n.double()
        return out


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|."""
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max()).item()


def official_args(cfg: dict) -> argparse.Namespace:
    return argparse.Namespace(params=cfg.get("params", "V"), aug_num=cfg.get("aug_num", 10),
                              threshold=cfg.get("threshold", 0.1), retain_scale=cfg.get("retain_scale", 1.0),
                              lamb=cfg.get("lamb", 0.0), disable_filter=cfg.get("disable_filter", False))


def our_options(cfg: dict) -> dict:
    """The official flags as ConceptEdit settings. The official code filters (IPF) only when it
    augments; ours has a switch for each."""
    a = official_args(cfg)
    opts = {"layers": "v" if a.params == "V" else "kv", "aug_num": a.aug_num, "threshold": a.threshold,
            "retain_scale": a.retain_scale, "lamb": a.lamb, "filter": a.aug_num > 0 and not a.disable_filter}
    return opts


def compare(mod, kmod_starts, pipe, model, cfg: dict, float64: bool, seed: int = 0) -> dict:
    from concept_edit.core.plan import plan_from_dict
    from concept_edit.engines.speed import null_text_states, speed_delta
    from concept_edit.solvers.speed import invariant_keys, least_direction

    torch.manual_seed(seed)
    np.random.seed(seed)
    W0 = {n: W.detach().clone() for n, W in model.cross_attention_weights().items()}
    n_starts = len(kmod_starts)
    with NoiseRecorder(mod) as rec, contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        edited = mod.edit_model(official_args(cfg), pipe, list(TARGETS), [""] * len(TARGETS), list(RETAIN),
                                baseline="SPEED", emb_size=model.key_dim, device="cpu")
    start, centres = kmod_starts[n_starts]
    plan = plan_from_dict({"method": "speed", "edits": [{"erase": t} for t in TARGETS], "preserve": list(RETAIN),
                           "preserve_empty": False, "templates": ["{}"], "options": our_options(cfg)})
    names = [n for n in W0 if plan.settings.layers == "kv" or n.endswith("to_v")]
    official = {f"unet.{k[: -len('.weight')]}": v for k, v in edited.items()}
    assert sorted(official) == sorted(names), (sorted(official), names)

    # the official retain keys: recorded per layer (IPF-filtered, shuffled) with each copy's noise
    calls = iter(rec.calls)
    by_layer = {n: next(calls) for n in names} if cfg.get("aug_num", 10) else {}
    stats = {"retained_match": True, "augmented": []}

    def noise(name, R, aug):
        call = by_layer[name]
        keys, per = call["keys"].double(), rec.per_key_noise(call)
        v = least_direction(W0[name])
        z = torch.zeros(R.shape[0], aug, dtype=torch.float64)
        dist = torch.cdist(keys, R.double())
        match = dist.argmin(1)
        if (dist.min(1).values > 1e-3 * R.double().norm(dim=1).max()).any() or len(set(match.tolist())) != len(match):
            raise RuntimeError("official retain keys do not match ours")
        z[match] = per @ v
        stats["official_kept"] = stats.get("official_kept", {}) | {name: set(match.tolist())}
        return z

    ours = speed_delta(model, plan, progress=False, noise=noise if by_layer else None,
                       kmeans_init=start if plan.settings.invariant else None)
    worst = 0.0
    rows = []
    for n in names:
        off = official[n].double() - W0[n].double()
        mine = ours.layers[n].dense(torch.float64)
        rows.append((n, rel(mine, off)))
        worst = max(worst, rows[-1][1])
        rep = ours.metadata["layers_report"][n]
        if by_layer:
            call = by_layer[n]
            stats["augmented"].append((rep["augmented"], call["kept"]))
            if rep["retained"] != call["keys"].shape[0]:
                stats["retained_match"] = False
    # invariant keys: the official centres (re-run on the recorded start) against ours
    null = null_text_states(model).double()
    kc = invariant_keys(null, 3, init=start)
    official_kc = torch.cat([null[:1], centres.double()])
    return {"worst": worst, "rows": rows, "stats": stats, "start": start, "kc": rel(kc, official_kc), "ours": ours}


CONFIGS = [
    ("defaults (aug_num 10, IPF, threshold 0.1, retain_scale 1, lamb 0, V)", {}),
    ("celebrity runs (--retain_scale 0.05 --disable_filter)", {"retain_scale": 0.05, "disable_filter": True}),
    ("no augmentation (--aug_num 0: no IPF either)", {"aug_num": 0}),
    ("soft constraint (--lamb 0.1)", {"lamb": 0.1}),
    ("to_k and to_v (--params KV)", {"params": "KV"}),
]


def reference(args) -> int:
    from concept_edit.adapters.diffusers_model import DiffusersModel
    from concept_edit.testing.tiny_models import build_tiny_pipeline

    kmod, real_kmeans, starts = kmeans_module(args.kmeans_wheel)
    with tempfile.TemporaryDirectory(prefix="speed_ref_") as tmp:
        extract(args.speed_repo, Path(tmp))
        mod = load_official(Path(tmp), kmod)
    pipe = build_tiny_pipeline("sd1")
    if args.float64:
        pipe = pipe.to(torch.float64)
        torch.set_default_dtype(torch.float64)  # the official code's torch.eye
    model = DiffusersModel(pipe)
    print(f"tiny sd1: {len(model.cross_attention_weights())} cross-attention projections, key width {model.key_dim}; "
          f"erase {', '.join(TARGETS)} -> \"\", {len(RETAIN)} retain concepts; official code in "
          f"{'float64' if args.float64 else 'float32'}; kmeans_pytorch: "
          f"{'the real one' if real_kmeans else 'NOT available, ConceptEdit k-means in its place'}")
    print(f"\n{'official configuration':66} {'max rel. diff of the weight change':>34}  IPF kept  DPA kept copies")
    out = None
    for label, cfg in CONFIGS:
        r = compare(mod, starts, pipe, model, cfg, args.float64)
        st = r["stats"]
        kept = "-" if not st["augmented"] else ("same" if st["retained_match"] else "DIFFER")
        copies = "-" if not st["augmented"] else ",".join(str(a) for a, _ in st["augmented"]) + (
            " (same)" if all(a == b for a, b in st["augmented"]) else " (official " + ",".join(str(b) for _, b in st["augmented"]) + ")")
        print(f"{label:66} {r['worst']:34.2e}  {kept:8}  {copies}")
        out = out or r
    print(f"\ninvariant keys ([SOT] + 3 k-means centres from the official start {out['start']}): "
          f"max rel. diff {out['kc']:.2e}")
    return 0


# ----------------------------------------------------------------------------- timing
def timing(args) -> int:
    from concept_edit.adapters.diffusers_model import DiffusersModel
    from concept_edit.core.plan import plan_from_dict
    from concept_edit.engines.speed import speed_delta
    from concept_edit.engines.uce import uce_delta

    spec = importlib.util.spec_from_file_location("uce_speed_bench", HERE / "uce_speed.py")
    ub = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ub)
    t = time.perf_counter()
    pipe = ub.build_pipeline(args.family)
    model = DiffusersModel(pipe)
    build = time.perf_counter() - t
    edits, keep = ub.concept_names(args.time)
    base = {"edits": [{"erase": e} for e in edits], "preserve": keep, "templates": ["{}"]}
    variants = [
        ("uce (lambda 0.5, to_k+to_v)", "uce", {}),
        ("uce (to_v only)", "uce", {"layers": "v"}),
        ("speed defaults (IPF, DPA 10, IEC, to_v)", "speed", {}),
        ("speed celebrity (retain_scale 0.05, no IPF)", "speed", {"retain_scale": 0.05, "filter": False}),
        ("speed, no IPF/DPA (one projector)", "speed", {"filter": False, "aug_num": 0}),
    ]
    print(f"{args.family}: {len(model.cross_attention_weights())} cross-attention projections, key width "
          f"{model.key_dim}; {args.time} erased + {args.time} retained pseudo-names, templates ['{{}}'], \"\" "
          f"preserved; torch threads {torch.get_num_threads()}; model built in {build:.1f}s")
    res = {}
    for label, method, opts in variants:
        plan = plan_from_dict(base | {"method": method, "options": opts})
        fn = uce_delta if method == "uce" else speed_delta
        times = []
        for i in range(args.repeats + 1):
            model = DiffusersModel(pipe)  # a fresh key cache: every run encodes its prompts
            t = time.perf_counter()
            d = fn(model, plan, progress=False)
            if i:
                times.append(time.perf_counter() - t)
        res[label] = statistics.median(times)
        print(f"  {label:46} {res[label]:7.3f} s   (keys {d.metadata['seconds']['keys']:.3f} s)")
    if args.official:  # the official edit_model on the same pipeline and concepts (CPU, float32)
        kmod, _, _ = kmeans_module(args.kmeans_wheel)
        with tempfile.TemporaryDirectory(prefix="speed_ref_") as tmp:
            extract(args.speed_repo, Path(tmp))
            mod = load_official(Path(tmp), kmod)
        times = []
        for i in range(args.repeats + 1):
            torch.manual_seed(0)
            np.random.seed(0)
            t = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                mod.edit_model(official_args({}), pipe, list(edits), [""] * len(edits), list(keep), baseline="SPEED",
                               emb_size=model.key_dim, device="cpu")
            if i:
                times.append(time.perf_counter() - t)
        label = "official edit_model (defaults, CPU float32)"
        res[label] = statistics.median(times)
        print(f"  {label:46} {res[label]:7.3f} s")
    ref = res[variants[0][0]]
    for label in res:
        print(f"  {label:46} {res[label] / ref:6.2f} x uce")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--speed-repo", default="/work/.mirror/Ouxiang-Li+SPEED/repo",
                    help="a git copy of Ouxiang-Li/SPEED (read with git archive)")
    ap.add_argument("--kmeans-wheel", help="kmeans_pytorch 0.3 wheel to import from, if it is not installed")
    ap.add_argument("--float64", action="store_true", help="run the official code in float64 too")
    ap.add_argument("--time", type=int, metavar="N", help="time SPEED and UCE erasing N concepts instead")
    ap.add_argument("--family", default="tiny-sd1", help="with --time: tiny-sd1, or sd15 (real sizes)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--official", action="store_true", help="with --time: time the official edit_model too")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    return timing(args) if args.time else reference(args)


if __name__ == "__main__":
    sys.exit(main())
