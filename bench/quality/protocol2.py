"""Protocol 2: a replace-task benchmark that keeps evaluation concepts apart from everything a
method sees, reports preservation inside and outside the C0 corpus, and carries confidence
intervals (issue 15, "A benchmark that does not flatter").

    python bench/quality/protocol2.py run --part val  --methods ... --counts 10,100,450   # validation cells
    python bench/quality/protocol2.py tune            # choose settings on validation -> protocol2/choices.json
    python bench/quality/protocol2.py run --part test --methods ... --seeds 0,1,2         # test cells
    python bench/quality/protocol2.py report          # protocol2/README.md, results.json, quality.png
    python bench/quality/protocol2.py --quick --out DIR --cache DIR2   # smoke run (UCE, 2 sources, 2 + 2 holdouts)

Split (``make_split``; fixed by ``seed``, written to ``protocol2/split_seed<k>.json``): the
world's 1,000 objects are shuffled; 30% (300) are **out of corpus**: their captions (name or
alias) are dropped from the C0 corpus the methods get, and they are never edited, preserved or
destinations; half of them are validation holdouts, half test holdouts. Of the other 700: 50
destinations, 100 preserved objects (the methods' preserve set), 100 validation and 100 test
holdouts **inside** C0 (their captions stay in the corpus; never edited or preserved), and 350
sources: 100 validation, 100 test, 150 filler. A test run edits test sources, then filler,
then the validation sources and validation holdouts (never the test holdouts), so the largest
test count is 450 with 100 + 100 holdouts left; a validation run is the mirror image.

Counts below 100: ceil(100 / n) disjoint edits of n test sources each (10 edits of 10 at n = 10),
the holdouts divided among them, so every count evaluates 100 sources and 100 + 100 holdouts.

Prompts (never editing templates, never in training): sources in ``the image of the {}``
(paraphrase), name-not-last ``a {} photo`` / ``one {}, a drawing`` / ``{} in the style of
<artist>`` (cycled), and a two-object prompt ``a photo of a {} , the <preserved object>`` (the
unedited model draws the first-named object 70% of the time); holdouts in the paraphrase.
Neighbours: holdouts sharing two of three factors (shape, colour, pattern) with a source edited
in the same edit are reported apart (HD nbr) from the others (HD far).

Metrics (p = classifier probability; paired before/after differences on the same seeds):
  SF      mean_s p_M(s) - p_M^(s), paraphrase
  S2D x   mean_s p_M^(d|s-prompt) - p_M(d|s-prompt) for x in para / nnl / multi
  HD in / out / nbr / far   mean_h p_M^(h) - p_M(h) over holdouts inside / outside C0 / neighbours / others
  PD      mean |x_M^ - x_M| of holdout images (pixels in [0,1])
95% intervals: 1.96 sd / sqrt(N) over the concept-level differences (pooled over seeds).
Every name and alias of the world is one token, so multi-token names are not tested (the model
never learned any).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import re
import sys
import time
import traceback
from pathlib import Path

import numpy as np

from concept_edit.core.settings import COV_RATIO

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
OUT = HERE / "protocol2"

EDIT_TEMPLATES = ["{}", "a photo of a {}", "a painting of a {}"]  # as bench/quality/run.py
PARA = "the image of the {}"
NNL = ["a {} photo", "one {}, a drawing", "{} in the style of {s}"]
MULTI = "a photo of a {} , the {o}"
# plan-level options a spec may carry (not method settings): the editing templates and the preserve set.
# "official": UCE's train_erase.py edits the bare concept only (its extra object templates are opt-in);
# "wide" preserve: every object the method may know of that this edit does not touch, as UCE's
# official script preserves every artist it does not erase (evaluation holdouts stay out).
PLAN_TEMPLATES = {"bench": EDIT_TEMPLATES, "official": ["{}"]}
OOC_FRAC = 0.3
N_DEST, N_PRESERVE, N_HOLD, N_SRC, N_FILL = 50, 100, 100, 100, 150
CORPUS_N = 10_000  # captions drawn before the out-of-corpus drop (C0 is a mean: its scale does not depend on N)

# what each row is: printed next to it in the report
LABELS = {
    "uce": "UCE, package defaults (lambda 0.5, erase 1, preserve 1, last-token keys, 3 templates)",
    "emcid": "EMCID stage II only: targets = destination's own hidden state (not the paper's stage I), alpha 0.5",
    "emcid-auto": "EMCID stage II, destination-state targets, alpha 0.5, C0 weight set by the method from the edit's size",
    "emcid-distill": "EMCID with the paper's stage I (dual self-distillation, 200 steps), alpha 0.5",
    "nullspace": "null-space fc2 editing (AlphaEdit projector, absolute 2e-2), destination-state targets",
    "nullspace-xattn": "null-space cross-attention editing, destination-state targets",
    "emcid+uce": "EMCID stage II (destination-state targets, alpha 0.5), then UCE on cross-attention",
    "rece": "RECE (UCE, then 1 round of closed-form adversarial re-erasure; package defaults)",
    "speed": "SPEED on to_v (IPF, DPA, IEC, retain_scale 1; package defaults)",
}


# ---------------------------------------------------------------------------------------- split
def make_split(world, seed: int = 0, ooc_frac: float = OOC_FRAC, sizes: dict | None = None) -> dict:
    """Roles of the world's objects (indices), deterministic in ``seed``; see the module docstring."""
    z = {"dest": N_DEST, "preserve": N_PRESERVE, "hold": N_HOLD, "src": N_SRC, "fill": N_FILL, **(sizes or {})}
    idx = [o.index for o in world.objects]
    random.Random(f"protocol2-split-{seed}").shuffle(idx)
    n_ooc = round(ooc_frac * len(idx))
    ooc, inc = idx[:n_ooc], idx[n_ooc:]
    need = z["dest"] + z["preserve"] + 2 * z["hold"] + 2 * z["src"] + z["fill"]
    if len(inc) < need or n_ooc < 2 * z["hold"]:
        raise ValueError(f"world too small for this split ({len(inc)} in corpus, need {need})")
    take = iter(inc)
    part = {k: [next(take) for _ in range(z[k2])] for k, k2 in
            (("dest", "dest"), ("preserve", "preserve"), ("val_in", "hold"), ("test_in", "hold"),
             ("val_src", "src"), ("test_src", "src"), ("filler", "fill"))}
    half = n_ooc // 2
    part["val_out"], part["test_out"] = ooc[:half], ooc[half:]
    part["ooc"] = ooc
    # each possible source has one fixed destination
    movable = part["val_src"] + part["test_src"] + part["filler"] + part["val_in"] + part["test_in"]
    part["dest_of"] = {str(s): part["dest"][k % len(part["dest"])] for k, s in enumerate(movable)}
    part["seed"], part["ooc_frac"] = seed, ooc_frac
    return part


def edit_order(split: dict, part: str) -> list[int]:
    """Objects a ``part`` ("test" or "val") run edits, in order: its own sources first, never its holdouts."""
    other = "val" if part == "test" else "test"
    return split[f"{part}_src"] + split["filler"] + split[f"{other}_src"] + split[f"{other}_in"]


def shares_two(a, b) -> bool:
    return sum(x == y for x, y in zip(a.visual, b.visual)) == 2


def protocol_corpus(world, split: dict, n: int = CORPUS_N, seed: int = 0) -> list[str]:
    """The training-distribution caption corpus minus every caption naming an out-of-corpus object."""
    from concept_edit.engines.second_moments import split_mentions
    from concept_edit.testbed.data import caption_corpus

    terms = []
    for i in split["ooc"]:
        o = world.objects[i]
        terms += [o.name] + ([o.alias] if o.alias else [])
    kept, _ = split_mentions(caption_corpus(n, seed=seed, world=world), terms)
    return kept


def groups_for(split: dict, part: str, n: int, n_src: int, n_hold: int) -> list[dict]:
    """The edits a count runs: [{"edited": [...], "eval": [...], "hin": [...], "hout": [...]}]."""
    order = edit_order(split, part)
    hin, hout = split[f"{part}_in"][:n_hold], split[f"{part}_out"][:n_hold]
    if n >= n_src:
        if n > len(order):
            raise ValueError(f"at most {len(order)} edits in this split")
        return [{"edited": order[:n], "eval": order[:n_src], "hin": hin, "hout": hout}]
    G = math.ceil(n_src / n)
    src = split[f"{part}_src"][:n_src]
    return [{"edited": src[g * n:(g + 1) * n], "eval": src[g * n:(g + 1) * n], "hin": hin[g::G], "hout": hout[g::G]}
            for g in range(G)]


# ---------------------------------------------------------------------------------------- stats
def ci95(x) -> float:
    x = np.asarray(x, dtype=np.float64)
    return float(1.96 * x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else float("nan")


def summarise(diffs: dict[str, list]) -> dict:
    out = {}
    for k, v in diffs.items():
        v = np.asarray(v, dtype=np.float64)
        out[k] = {"mean": float(v.mean()) if len(v) else None, "ci": ci95(v) if len(v) else None, "n": int(len(v))}
    return out


def wilson(k: int, n: int) -> tuple[float, float]:
    """95% Wilson interval of a proportion k/n."""
    if n == 0:
        return (float("nan"), float("nan"))
    p, z = k / n, 1.96
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (c - h, c + h)


# ---------------------------------------------------------------------------------------- methods
def resolve_spec(spec: str, n: int, choices: dict | None, seed: int = 0) -> tuple[str, dict, str]:
    """(preset name, settings, label) for a method spec at edit count ``n``.

    ``name:key=value+...`` as run.py; ``key=tuned`` takes the value the validation split of the same
    seed chose for this count (protocol2/choices.json: family -> "seed<k>" -> count)."""
    from run import parse_method

    name, opts = parse_method(spec)
    label = LABELS.get(name, name)
    if name == "uce" and opts:
        label = "UCE"
    for k, v in list(opts.items()):
        if v == "tuned":
            ch = (choices or {}).get(f"{name}:{k}", {}).get(f"seed{seed}", {})
            if str(n) not in ch:
                raise KeyError(f"no validation choice of {k} for {name} at {n} edits on seed {seed}'s split "
                               "(run its validation cells, then `tune`)")
            opts[k] = ch[str(n)]["value"]
            label += f"; {k} {opts[k]:g} (chosen on validation)"
    for k, v in opts.items():
        if k == "cov_weight" and v is None:  # unset: the engine's default, set from the edit's size
            label += f"; C0 weight set by the method from the edit's size (cov_ratio {opts.get('cov_ratio', COV_RATIO):g})"
        elif k == "cov_weight" and "chosen" not in label:
            label += f"; cov_weight {v:g}"
        elif k == "cov_ratio" and opts.get("cov_weight", 0) is not None:  # else in the cov_weight label
            label += f"; cov_ratio {v:g}"
        elif k == "templates":
            label += f"; templates {PLAN_TEMPLATES[v]}"
        elif k == "preserve":
            label += "; preserve set: every object outside the edit and the evaluation holdouts" if v == "wide" else ""
        elif k not in ("cov_weight", "cov_ratio") and f"{k} " not in label:
            label += f"; {k} {v}"
    if name.startswith("emcid") and "cov_weight" not in opts:  # the preset's own C0 weight
        from presets import PRESETS

        pinned = PRESETS[name][1].get("cov_weight")
        if pinned is not None:
            label += f"; cov_weight {pinned:,.0f} (the paper's)"
        elif "cov_ratio" not in opts:
            label += f"; cov_ratio {COV_RATIO:g}: the package's default"
    return name, opts, label


def build_method(name: str, opts: dict, corpus: list[str], cache_dir: Path):
    if name == "uce":
        from run import uce_method

        return lambda model, plan: uce_method(model, plan, **opts)
    from presets import PRESETS, make_method

    if name not in PRESETS:  # a registered engine (rece, speed) with its own settings
        return make_method(name, corpus=corpus, **opts)
    if name.endswith("-distill"):  # stage I targets are cached per concept too
        return make_method(name, corpus=corpus, cache_dir=str(cache_dir), **opts)
    return make_method(name, corpus=corpus, **{"cov_cache_dir": str(Path(cache_dir) / "covariance"), **opts})


# ---------------------------------------------------------------------------------------- bench
class Protocol2:
    def __init__(self, *, seed: int, cache: Path, quick: bool = False, n_src: int = N_SRC, n_hold: int = N_HOLD,
                 corpus_n: int = CORPUS_N, model_path=None, kinds=("para", "nnl", "multi")):
        from concept_edit.adapters.diffusers_model import editable_model
        from concept_edit.testbed import (
            get_world,
            load_classifier,
            load_testbed_pipeline,
        )

        self.world = get_world()
        self.pipe = load_testbed_pipeline(model_path)
        self.model = editable_model(self.pipe)
        self.clf = load_classifier()
        self.seed, self.quick = seed, quick
        self.n_src, self.n_hold, self.kinds = n_src, n_hold, tuple(kinds)
        self.split = make_split(self.world, seed)
        self.cache = Path(cache)
        self.cache.mkdir(parents=True, exist_ok=True)
        self.corpus = protocol_corpus(self.world, self.split, corpus_n)
        self._base_file = self.cache / f"unedited_seed{seed}_{self._model_tag()}.npz"
        self.base = self._load_base()

    def _model_tag(self) -> str:
        from concept_edit.engines.second_moments import model_fingerprint

        h = hashlib.sha256(model_fingerprint(self.model).encode())
        for p in self.pipe.unet.parameters():  # the unet too: unedited images depend on it
            h.update(p.detach().float().numpy().tobytes()[:4096])
        return h.hexdigest()[:12]

    # -- unedited results are cached on disk (prompt, seed) -> (probabilities, image)
    def _load_base(self) -> dict:
        if self._base_file.exists():
            z = np.load(self._base_file, allow_pickle=False)
            keys = [tuple(json.loads(k)) for k in z["keys"]]
            return {k: (z["probs"][i], z["images"][i]) for i, k in enumerate(keys)}
        return {}

    def _save_base(self):
        keys = list(self.base)
        np.savez(self._base_file.with_suffix(".tmp.npz"), keys=np.array([json.dumps(list(k)) for k in keys]),
                 probs=np.stack([self.base[k][0] for k in keys]), images=np.stack([self.base[k][1] for k in keys]))
        self._base_file.with_suffix(".tmp.npz").replace(self._base_file)

    def generate(self, prompts, seeds):
        from concept_edit.testbed.evaluate import generate, head_probs

        ims = generate(self.pipe, prompts, seeds)
        pr = head_probs(self.clf, ims)
        probs = np.concatenate([pr["shape"], pr["colour"], pr["pattern"]], axis=1).astype(np.float32)
        return probs, ims

    def unedited(self, prompts, seeds):
        need = [(p, s) for p, s in zip(prompts, seeds) if (p, s) not in self.base]
        if need:
            probs, ims = self.generate([p for p, _ in need], [s for _, s in need])
            for k, pr, im in zip(need, probs, ims):
                self.base[k] = (pr, im)
            self._save_base()
        return (np.stack([self.base[(p, s)][0] for p, s in zip(prompts, seeds)]),
                np.stack([self.base[(p, s)][1] for p, s in zip(prompts, seeds)]))

    @staticmethod
    def p(probs_row, concept) -> float:
        from concept_edit.testbed.world import COLOURS, SHAPES

        s, c, q = concept.visual
        ns, nc = len(SHAPES), len(COLOURS)
        return float(probs_row[s] * probs_row[ns + c] * probs_row[ns + nc + q])

    # -- prompts of one group: (prompt, seed, kind, concept index, judged concept index)
    def prompts(self, g: dict) -> list[tuple]:
        W, out = self.world, []
        off = 100_000 * self.seed
        pres = self.split["preserve"]
        for i in g["eval"]:
            o = W.objects[i]
            d = self.split["dest_of"][str(i)]
            out.append((PARA.format(o.name), off + 10 * i, "para", i, d))
            if "nnl" in self.kinds:
                t = NNL[i % len(NNL)]
                out.append((t.format(o.name, s=W.artists[i % len(W.artists)].name), off + 10 * i + 1, "nnl", i, d))
            if "multi" in self.kinds:
                comp = W.objects[pres[i % len(pres)]].name
                out.append((MULTI.format(o.name, o=comp), off + 10 * i + 2, "multi", i, d))
        for tag in ("hin", "hout"):
            for h in g[tag]:
                out.append((PARA.format(W.objects[h].name), off + 10 * h + 5, tag, h, h))
        return out

    def run_cell(self, spec: str, part: str, n: int, choices: dict | None, sample_dir: Path | None = None) -> dict:
        from concept_edit.core.apply import apply_delta
        from concept_edit.core.plan import plan_from_dict

        W = self.world
        name, opts, label = resolve_spec(spec, n, choices, self.seed)
        settings = dict(opts)
        templates = PLAN_TEMPLATES[settings.pop("templates", "bench")]
        wide = settings.pop("preserve", "bench") == "wide"
        method = build_method(name, settings, self.corpus, self.cache)
        uses_c0 = name != "uce" and settings.get("c0_exclude_edited", True) and settings.get("projector") != "preserve"
        diffs = {k: [] for k in ("SF", "S2D_para", "S2D_nnl", "S2D_multi", "HD_in", "HD_out", "HD_nbr", "HD_far")}
        pd_sum, pd_n, t_edit, t_gen, p_base_src, p_base_multi = 0.0, 0, 0.0, 0.0, [], []
        samples = []
        groups = groups_for(self.split, part, n, self.n_src, self.n_hold)
        for gi, g in enumerate(groups):
            rows = self.prompts(g)
            P, S = [r[0] for r in rows], [r[1] for r in rows]
            b_probs, b_ims = self.unedited(P, S)
            edited = [W.objects[i] for i in g["edited"]]
            keep = list(self.split["preserve"])
            if wide:
                touched = set(g["edited"]) | {self.split["dest_of"][str(i)] for i in g["edited"]}
                pool = self.split["dest"] + self.split["val_src"] + self.split["test_src"] + self.split["filler"]
                keep += [i for i in pool if i not in touched]  # never a holdout of either part
                keep = list(dict.fromkeys(keep))
            plan = plan_from_dict({
                "edits": [{"replace": o.name, "with": W.objects[self.split["dest_of"][str(o.index)]].name} for o in edited],
                "preserve": [W.objects[i].name for i in keep], "templates": templates})
            t0 = time.time()
            m = method
            if uses_c0:
                # The engine leaves captions naming an edited source out of C0; when most captions go it
                # recomputes C0 of the kept ones at every call. Handing it the kept captions (and
                # c0_exclude_edited off) gives the same C0, which its cache then keeps for the next
                # setting run on the same edit (e.g. three C0 weights at 450 edits).
                from concept_edit.engines.second_moments import split_mentions

                kept, dropped = split_mentions(self.corpus, [o.name for o in edited])
                if len(dropped) > len(kept):
                    m = build_method(name, {**settings, "c0_exclude_edited": False}, kept, self.cache)
            delta = m(self.model, plan)
            t_edit += time.time() - t0
            t1 = time.time()
            h = apply_delta(delta, self.model.weights(list(delta.layers)), check_fingerprint=False)
            try:
                a_probs, a_ims = self.generate(P, S)
            finally:
                h.remove()
            t_gen += time.time() - t1
            for k, r in enumerate(rows):
                kind, ci, ji = r[2], W.objects[r[3]], W.objects[r[4]]
                pb, pa = self.p(b_probs[k], ji), self.p(a_probs[k], ji)
                if kind in ("para", "nnl", "multi"):
                    diffs[f"S2D_{kind}"].append(pa - pb)
                    if kind == "para":
                        diffs["SF"].append(self.p(b_probs[k], ci) - self.p(a_probs[k], ci))
                        p_base_src.append(self.p(b_probs[k], ci))
                    if kind == "multi":  # how often the unedited model draws the first-named object
                        p_base_multi.append(self.p(b_probs[k], ci))
                else:
                    diffs["HD_in" if kind == "hin" else "HD_out"].append(pa - pb)
                    nbr = any(shares_two(ci, e) for e in edited)
                    diffs["HD_nbr" if nbr else "HD_far"].append(pa - pb)
                    pd_sum += float(np.abs(a_ims[k].astype(np.float32) - b_ims[k].astype(np.float32)).mean() / 255)
                    pd_n += 1
            if sample_dir is not None:  # a few images per group for the judge validation
                rng = random.Random(f"{spec}-{n}-{gi}-{self.seed}")
                for k in rng.sample(range(len(rows)), min(4, len(rows))):
                    samples.append({"prompt": P[k], "seed": S[k], "kind": rows[k][2], "edited": True, "image": a_ims[k]})
                k = rng.randrange(len(rows))
                samples.append({"prompt": P[k], "seed": S[k], "kind": rows[k][2], "edited": False, "image": b_ims[k]})
            print(f"  {spec} n={n} group {gi + 1}/{len(groups)}: edit {t1 - t0:.1f}s, {len(P)} images {time.time() - t1:.0f}s",
                  flush=True)
        if sample_dir is not None and samples:
            sample_dir.mkdir(parents=True, exist_ok=True)
            tag = hashlib.sha256(f"{spec}|{part}|{n}|{self.seed}".encode()).hexdigest()[:10]
            np.savez(sample_dir / f"{tag}.npz", images=np.stack([s["image"] for s in samples]),
                     meta=np.array([json.dumps({k: v for k, v in s.items() if k != "image"} | {"spec": spec, "n": n})
                                    for s in samples]))
        return {"spec": spec, "method": name, "settings": {k: v for k, v in opts.items()}, "label": label, "part": part,
                "n": n, "seed": self.seed, "groups": len(groups), "edit_seconds": round(t_edit, 2),
                "generate_seconds": round(t_gen, 1), "corpus_captions": len(self.corpus), "kinds": list(self.kinds), "n_src": self.n_src, "n_hold": self.n_hold,
                "PD": pd_sum / max(1, pd_n), "p_src_unedited": float(np.mean(p_base_src)),
                "p_multi_first_unedited": float(np.mean(p_base_multi)) if p_base_multi else None,
                "diffs": {k: [round(float(x), 5) for x in v] for k, v in diffs.items()}, "metrics": summarise(diffs)}


def cell_path(out: Path, part: str, spec: str, n: int, seed: int) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_.=+" else "_" for c in spec)
    return out / "cells" / part / f"seed{seed}" / f"{safe}__n{n}.json"


# ---------------------------------------------------------------------------------------- tune
AIM = {"s2d": 0.6, "hd_in": -0.05, "hd_out": -0.15}  # issue 15's aim: S2D and Holdout Delta floors


def _mean(c: dict, k: str) -> float:
    return c["metrics"][k]["mean"]


def meets_aim(c: dict, s2d: float, hd_in: float, hd_out: float) -> bool:
    return _mean(c, "S2D_para") >= s2d and _mean(c, "HD_in") >= hd_in and _mean(c, "HD_out") >= hd_out


def aim_score(c: dict) -> float:
    """The fallback when nothing meets the aim: S2D + HD in + HD out."""
    return _mean(c, "S2D_para") + _mean(c, "HD_in") + _mean(c, "HD_out")


def choose(cells: list[dict], s2d: float = AIM["s2d"], hd_in: float = AIM["hd_in"], hd_out: float = AIM["hd_out"]) -> dict:
    """Per count: the setting with the highest S2D (paraphrase) among those that meet the aim (S2D >=
    s2d, HD in >= hd_in, HD out >= hd_out); if none does, the one with the highest S2D + HD in + HD out.
    The S2D floor matters: a C0 weight that edits nothing keeps every holdout."""
    out = {}
    for n in sorted({c["n"] for c in cells}):
        cs = [c for c in cells if c["n"] == n]
        ok = [c for c in cs if meets_aim(c, s2d, hd_in, hd_out)]
        best = max(ok, key=lambda c: _mean(c, "S2D_para")) if ok else max(cs, key=aim_score)
        out[str(n)] = {"spec": best["spec"], "meets_aim": bool(ok), "S2D_para": _mean(best, "S2D_para"),
                       "HD_in": _mean(best, "HD_in"), "HD_out": _mean(best, "HD_out")}
    return out


def choose_across_counts(cells: list[dict], **aim) -> dict:
    """One setting for every edit count (a method's default): the spec that meets the aim (as in
    :func:`choose`) in the most (count, seed) cells; ties by the mean over those cells of S2D + HD in
    + HD out. Every candidate must have a cell at every (count, seed) any of them has."""
    floor = {**AIM, **aim}
    by_spec: dict[str, list[dict]] = {}
    for c in cells:
        by_spec.setdefault(c["spec"], []).append(c)
    where = {(c["n"], c["seed"]) for c in cells}
    short = {s: sorted(where - {(c["n"], c["seed"]) for c in cs}) for s, cs in by_spec.items()}
    if any(short.values()):
        raise ValueError(f"validation cells missing (count, seed): { {s: v for s, v in short.items() if v} }")
    score = {s: (sum(meets_aim(c, **floor) for c in cs), float(np.mean([aim_score(c) for c in cs])))
             for s, cs in by_spec.items()}
    best = max(score, key=score.get)
    return {"spec": best, "cells_meeting_aim": score[best][0], "cells": len(by_spec[best]),
            "mean_S2D_plus_HD": score[best][1], "counts": sorted({n for n, _ in where}),
            "seeds": sorted({k for _, k in where}),
            "others": {s: {"cells_meeting_aim": v[0], "mean_S2D_plus_HD": v[1]} for s, v in score.items() if s != best}}


def tune(out: Path, families: dict) -> dict:
    """families: "preset:key" -> the validation specs that vary it (``preset:key=value``), or
    {"across_counts": specs} for a setting chosen once for every count and seed (a method default).

    Otherwise each seed's split chooses for itself (its test concepts are another seed's validation
    concepts): returns family -> "seed<k>" -> count -> choice."""
    from run import parse_method

    res = {}
    val = _load_cells(out, "val")
    for fam, specs in families.items():
        key = fam.split(":", 1)[1]
        if isinstance(specs, dict):
            ch = choose_across_counts([c for c in val if c["spec"] in specs["across_counts"]])
            res[fam] = {"all": ch | {"value": parse_method(ch["spec"])[1][key]}}
            continue
        by_seed = {}
        for c in val:
            if c["spec"] in specs:
                by_seed.setdefault(c["seed"], []).append(c)
        for seed, cells in sorted(by_seed.items()):
            ch = choose(cells)
            for v in ch.values():
                v["value"] = parse_method(v["spec"])[1][key]
            res.setdefault(fam, {})[f"seed{seed}"] = ch
    return res


# ---------------------------------------------------------------------------------------- report
def fmt(m: dict | None, k: str) -> str:
    if not m or m.get(k) is None or m[k]["mean"] is None:
        return ""
    v = m[k]
    return f"{v['mean']:+.2f} ±{v['ci']:.2f}" if v["ci"] == v["ci"] else f"{v['mean']:+.2f}"


def pooled(cells: list[dict]) -> dict:
    """Metrics pooled over seeds (concept-level differences concatenated)."""
    keys = cells[0]["diffs"].keys()
    return summarise({k: [x for c in cells for x in c["diffs"][k]] for k in keys})


def table(cells: list[dict], counts_note: bool = True) -> list[str]:
    rows = {}
    for c in cells:
        rows.setdefault((c["spec"], c["n"]), []).append(c)
    lines = ["| method (what it is) | edits | seeds | SF | S2D para | S2D name-not-last | S2D two objects | HD in C0 | "
             "HD outside C0 | HD neighbours | HD others | PD | edit s |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (spec, n), cs in sorted(rows.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        m = pooled(cs)
        labels = sorted({c["label"] for c in cs})
        nb = m["HD_nbr"]["n"]
        lines.append(f"| `{spec}`: {' / '.join(labels)} | {n} | {len(cs)} | {fmt(m, 'SF')} | **{fmt(m, 'S2D_para')}** | "
                     f"{fmt(m, 'S2D_nnl')} | {fmt(m, 'S2D_multi')} | **{fmt(m, 'HD_in')}** | **{fmt(m, 'HD_out')}** | "
                     f"{fmt(m, 'HD_nbr')} (N={nb}) | {fmt(m, 'HD_far')} (N={m['HD_far']['n']}) | "
                     f"{np.mean([c['PD'] for c in cs]):.3f} | {np.mean([c['edit_seconds'] for c in cs]):.1f} |")
    return lines


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", nargs="?", default="run", choices=("run", "tune", "report", "split"))
    ap.add_argument("--part", choices=("val", "test"), default="test")
    ap.add_argument("--methods", default="uce")
    ap.add_argument("--counts", default="10,100,450")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--n-src", type=int, default=N_SRC)
    ap.add_argument("--n-hold", type=int, default=N_HOLD)
    ap.add_argument("--corpus-n", type=int, default=CORPUS_N)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--cache", type=Path, default=None, help="unedited images and C0 (default: <cache root>/bench_protocol2)")
    ap.add_argument("--families", default=None, help="tune: JSON {\"preset:key\": [specs]} (default: protocol2/families.json)")
    ap.add_argument("--quick", action="store_true", help="smoke: UCE at 1 and 2 edits, 2 sources, 2+2 holdouts")
    ap.add_argument("--no-samples", action="store_true")
    ap.add_argument("--kinds", default="para,nnl,multi", help="source prompt kinds (para always)")
    a = ap.parse_args(argv)
    import torch

    torch.set_num_threads(a.threads)
    out = a.out
    out.mkdir(parents=True, exist_ok=True)
    if a.quick:
        a.n_src, a.n_hold, a.corpus_n, a.counts = 2, 2, 600, "1,2"
    if a.command == "split":
        from concept_edit.testbed import get_world

        for s in [int(x) for x in a.seeds.split(",")]:
            (out / f"split_seed{s}.json").write_text(json.dumps(make_split(get_world(), s), indent=0))
        return None
    if a.command == "tune":
        fam = json.loads(a.families) if a.families else json.loads((out / "families.json").read_text())
        ch = tune(out, fam)
        (out / "choices.json").write_text(json.dumps(ch, indent=1))
        print(json.dumps(ch, indent=1))
        return ch
    if a.command == "report":
        return report(out)
    from concept_edit.core.cache import cache_root

    cache = a.cache or cache_root() / "bench_protocol2"
    choices = json.loads((out / "choices.json").read_text()) if (out / "choices.json").exists() else {}
    done = []
    for seed in [int(x) for x in a.seeds.split(",")]:
        bench = None
        for spec in a.methods.split(","):
            for n in [int(x) for x in a.counts.split(",")]:
                path = cell_path(out, a.part, spec, n, seed)
                if path.exists():
                    done.append(json.loads(path.read_text()))
                    continue
                if bench is None:
                    t0 = time.time()
                    bench = Protocol2(seed=seed, cache=cache, quick=a.quick, n_src=a.n_src, n_hold=a.n_hold,
                                      corpus_n=a.corpus_n, kinds=a.kinds.split(","))
                    print(f"seed {seed}: corpus {len(bench.corpus)} captions; setup {time.time() - t0:.0f}s", flush=True)
                t0 = time.time()
                try:
                    cell = bench.run_cell(spec, a.part, n, choices, None if a.no_samples else out / "samples")
                except Exception as e:
                    traceback.print_exc()
                    cell = {"spec": spec, "n": n, "seed": seed, "part": a.part, "error": f"{type(e).__name__}: {e}"[:300]}
                    print(cell, flush=True)
                    continue
                cell["seconds"] = round(time.time() - t0, 1)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(cell))
                print(f"{a.part} seed {seed} {spec} n={n}: " + ", ".join(
                    f"{k} {v['mean']:+.3f}±{v['ci']:.3f}" for k, v in cell["metrics"].items() if v["mean"] is not None)
                    + f" ({cell['seconds']:.0f}s)", flush=True)
                done.append(cell)
    return done


def _load_cells(out: Path, part: str) -> list[dict]:
    return [json.loads(f.read_text()) for f in sorted((out / "cells" / part).glob("seed*/*.json"))]


def report(out: Path) -> dict:
    """protocol2/README.md (tables generated from the saved cells, then notes.md), results.json, quality.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    val, test = _load_cells(out, "val"), _load_cells(out, "test")
    choices = json.loads((out / "choices.json").read_text()) if (out / "choices.json").exists() else {}
    judge = json.loads((out / "judge.json").read_text()) if (out / "judge.json").exists() else None
    minutes = lambda cs: sum(c.get("seconds", 0) for c in cs) / 60
    lines = ["# Protocol 2: edit quality with held-apart concepts, holdouts outside C0 and intervals", "",
             "Generated by `python bench/quality/protocol2.py report` from the saved cells (`cells/`); the notes at the "
             "end are written by hand. Commands: `RUN.md`.", "",
             "**Conditions.** UNet testbed (`testbed/assets/model`), classifier judge. Replace task: each source -> a "
             "fixed destination among 50. Split seeded (`split_seed<k>.json`): 30%% of the 1,000 objects are **outside "
             "C0** (their captions are dropped from the corpus the methods get: %s captions of the training "
             "distribution, 10,000 drawn); methods see the edits, the 100-object preserve set and that corpus, never "
             "a holdout. **HD in C0**: 100 holdouts whose captions are in the corpus; **HD outside C0**: 100 holdouts "
             "whose captions are not. Largest count **450** (every test source, filler, validation source and "
             "validation in-C0 holdout; with 1,000 objects 918 edits would leave 82 objects, too few for 100 + 100 "
             "holdouts). Below 100 edits: ceil(100 / n) disjoint edits of n sources, holdouts divided among them, so "
             "every row has 100 sources and 100 + 100 holdouts per seed. S2D para: `the image of the {}`; "
             "name-not-last: `a {} photo` / `one {}, a drawing` / `{} in the style of <artist>`; two objects: "
             "`a photo of a {} , the <preserved object>`. HD neighbours: holdouts sharing two of three factors with "
             "a source of the same edit. ± = 95%% interval over concepts (N per seed = 100; pooled over seeds). "
             "Settings marked *chosen on validation* were chosen by `tune` on the validation split (its own "
             "sources and holdouts) and then run once on test." % (
                 f"{test[0]['corpus_captions']:,}" if test and test[0].get("corpus_captions") else "about 7,200"), ""]
    if test:
        lines += ["## Test split (report)", "", f"Cells: {len(test)}; {minutes(test):.0f} min of cell time in all.", ""]
        lines += table(test)
    if choices:
        lines += ["", "## Choices made on the validation split (`choices.json`)", "",
                  "Rule: per edit count, the highest S2D (paraphrase) among settings that meet the aim (S2D >= 0.6, HD in "
                  "C0 >= -0.05, HD outside >= -0.15); if none does, the highest S2D + HD in + HD out. Each seed's "
                  "split chooses on its own validation concepts.", "",
                  "| setting | split seed | edits | chosen | meets the aim on validation | S2D | HD in | HD out |",
                  "|---|---|---|---|---|---|---|---|"]
        once = {fam: v["all"] for fam, v in choices.items() if "all" in v}
        for fam, seeds in choices.items():
            for seed, ch in sorted(seeds.items()) if fam not in once else ():
                for n, v in sorted(ch.items(), key=lambda kv: int(kv[0])):
                    lines.append(f"| {fam} | {seed[4:]} | {n} | {v['value']:g} | {'yes' if v['meets_aim'] else 'no'} | "
                                 f"{v['S2D_para']:+.2f} | {v['HD_in']:+.2f} | {v['HD_out']:+.2f} |")
        if once:
            lines += ["", "One value for every count (a method default; `choose_across_counts`): the value meeting the aim "
                      "in the most validation cells (count x seed), ties by mean S2D + HD in + HD out.", "",
                      "| setting | chosen | counts | seeds | cells meeting the aim | mean S2D + HD in + HD out | others |",
                      "|---|---|---|---|---|---|---|"]
            for fam, v in once.items():
                others = "; ".join(f"{s.split('=')[-1]}: {o['cells_meeting_aim']}, {o['mean_S2D_plus_HD']:+.2f}"
                                   for s, o in sorted(v["others"].items()))
                lines.append(f"| {fam} | {v['value']:g} | {', '.join(map(str, v['counts']))} | "
                             f"{', '.join(map(str, v['seeds']))} | {v['cells_meeting_aim']} / {v['cells']} | "
                             f"{v['mean_S2D_plus_HD']:+.2f} | {others} |")
    if val:
        lines += ["", "## Validation split (selection only; not a result)", "",
                  f"Cells: {len(val)}; {minutes(val):.0f} min. Sources and holdouts: "
                  f"{val[0].get('n_src', '?')} + {val[0].get('n_hold', '?')} + {val[0].get('n_hold', '?')} per seed; "
                  f"prompt kinds: {', '.join(val[0].get('kinds', []))}.", ""]
        lines += table(val)
    if judge:
        lines += ["", "## Judge check on generated images (`judge.json`, `protocol2_judge.py`)", "",
                  f"{judge['n']} generated images sampled from the runs ({judge['n_edited']} from edited models), unstyled "
                  "prompts; independent labeller: nearest clean render of every (shape, colour, pattern), with jitter "
                  "and crown, in pixel space.", "",
                  "| agreement with the classifier's arg-max | rate | 95% interval |", "|---|---|---|"]
        for k in ("object", "shape", "colour", "pattern"):
            v = judge[k]
            lines.append(f"| {k} | {v['agree']:.3f} ({v['k']}/{judge['n']}) | {v['ci'][0]:.3f}-{v['ci'][1]:.3f} |")
        for k, t in (("object_edited", "object, images from edited models"), ("object_unedited", "object, unedited model")):
            v = judge.get(k)
            if v and v.get("n"):
                lines.append(f"| {t} | {v['agree']:.3f} ({v['k']}/{v['n']}) | {v['ci'][0]:.3f}-{v['ci'][1]:.3f} |")
        c = judge["object_closest_75pct"]
        if c.get("agree") is not None:
            lines.append(f"| object, the 75% of images closest to a render | {c['agree']:.3f} (N={c['n']}) | "
                         f"{c['ci'][0]:.3f}-{c['ci'][1]:.3f} |")
    notes = out / "notes.md"
    if notes.exists():
        lines += ["", notes.read_text().strip()]
    if test:
        lines += ["", "![protocol 2](quality.png)"]
        fig, axes = plt.subplots(1, 3, figsize=(13, 4.6))
        by = {}
        for c in test:  # EMCID+UCE runs at EMCID's validation choice per count: one line
            line = re.sub(r"cov_weight=\d+", "cov_weight=EMCID's", c["spec"]) if c["method"] == "emcid+uce" else c["spec"]
            by.setdefault(line, {}).setdefault(c["n"], []).append(c)
        colours = plt.get_cmap("tab20").colors  # more lines than the default cycle's 10 colours
        for i, (spec, rows) in enumerate(by.items()):
            ns = sorted(rows)
            ms = [pooled(rows[n]) for n in ns]
            for ax, k in zip(axes, ("S2D_para", "HD_in", "HD_out")):
                ax.errorbar(ns, [m[k]["mean"] for m in ms], yerr=[m[k]["ci"] for m in ms], marker="os^D"[i % 4],
                            capsize=3, color=colours[(2 * i) % 20 + (i // 10) % 2], label=spec)
        for ax, t in zip(axes, ("Source2Dest (paraphrase)", "Holdout Delta, holdouts in C0", "Holdout Delta, holdouts outside C0")):
            ax.set_xscale("log"); ax.set_title(t); ax.set_xlabel("simultaneous edits"); ax.grid(alpha=0.3)
        handles, names = axes[0].get_legend_handles_labels()
        fig.legend(handles, names, fontsize=7, loc="lower center", ncol=3)
        fig.tight_layout(rect=(0, 0.2, 1, 1))
        fig.savefig(out / "quality.png", dpi=110)
        plt.close(fig)
    (out / "README.md").write_text("\n".join(lines) + "\n")
    strip = lambda c: {k: v for k, v in c.items() if k != "diffs"}
    groups = {}
    for c in test:
        groups.setdefault((c["spec"], c["n"]), []).append(c)
    res = {"test_cells": [strip(c) for c in test], "val_cells": [strip(c) for c in val], "choices": choices,
           "test_pooled": [{"spec": s, "n": n, "seeds": sorted(c["seed"] for c in cs), "metrics": pooled(cs)}
                           for (s, n), cs in sorted(groups.items())],
           "judge": {k: v for k, v in judge.items() if k != "disagreements"} if judge else None}
    (out / "results.json").write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
