"""Edit-quality benchmark on the bundled testbed model (ICEB-style metrics, classifier-scored).

    python bench/quality/run.py            # full sweep, writes bench/quality/sweep/ (results.json, README.md, plot)
    python bench/quality/run.py --quick    # CI smoke: UCE only, 1 and 10 edits, few prompts

Metrics (p = classifier probability of a concept, M unedited, M^ edited; EMCID paper, ICEB):
  SF   Source Forget   mean_s [p_M(s,s) - p_M^(s,s)]          (higher = more forgotten)
  S2D  Source2Dest     mean_s [p_M^(s,d) - p_M(s,d)]
  AL2D Alias2Dest      the same over the sources' (common) aliases
  HD   Holdout Delta   mean_h [p_M^(h,h) - p_M(h,h)]          (0 = holdout untouched)
  PD   preservation distance: mean |x_M^ - x_M| (pixels in [0,1]) on holdout prompts, same seeds
SF/S2D are reported on training-template prompts ("tpl") and held-out paraphrases ("para");
HD, AL2D and PD use held-out paraphrases. Holdout concepts are never edited nor preserved.
Also: style erasure (rate of erased-artist prompts no longer drawn in that style, and holdout
artists still drawn in theirs), debias dp = mean |F - 50| / 50 over professions (F = % crowned),
and rectification S2D of the 20 rare aliases mapped onto their objects.

Methods are callables ``(model, plan) -> ConceptDelta``; add one to ``METHODS`` to benchmark it.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent

EDIT_TEMPLATES = ["{}", "a photo of a {}", "a painting of a {}"]
EVAL_TPL = ["a picture of a {}"]  # a training template (efficacy)
EVAL_PARA = ["the image of the {}"]  # a held-out paraphrase (generalization)
STYLE_TPL = ["a painting of a {o} by {s}"]
STYLE_PARA = ["{s} painting of a {o}"]
# EMCID's default C0 weight (10,000, the paper's mom2_update_weight) is absolute while the edit
# term grows with the edit count: it barely edits below ~100 concepts here, so 1,000 runs alongside
# RECE and SPEED with the keys the attack benchmark uses (RECE: UCE's original subject-through-padding keys)
DEFAULT_METHODS = ["uce", "emcid", "emcid:cov_weight=1000", "nullspace", "nullspace-xattn", "emcid+uce",
                   "rece:token=aligned", "speed"]
ERASERS = ("uce", "rece", "speed")  # methods made for erasure: by default only they run the erase task
# the FLUX-shaped testbed: UCE is the method that supports the family; its key-token choices for the
# bidirectional T5 and its choice of text readers (the context embedder, the pooled-text embedder)
FLUX_METHODS = ["uce", "uce:token=aligned", "uce:token=all", "uce:readers=context", "uce:readers=pooled"]
DEFAULT_TASKS = "replace,erase,style,rectify,debias"


def ci95(x) -> float:
    """Half-width of a normal 95% confidence interval of the mean of ``x`` (0 for one value)."""
    x = np.asarray(x, dtype=np.float64)
    return float(1.96 * x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else 0.0


def uce_method(model, plan, **settings):
    import dataclasses

    from concept_edit.core.settings import build_settings
    from concept_edit.engines.uce import uce_delta

    if settings:  # the bench's plans carry default settings
        plan = dataclasses.replace(plan, settings=build_settings("uce", settings))
    return uce_delta(model, plan, progress=False)


def parse_method(spec: str) -> tuple[str, dict]:
    """``name`` or ``name:key=value+key=value`` (values parsed as JSON where they can be)."""
    name, _, opts = spec.partition(":")
    out = {}
    for kv in filter(None, opts.split("+")):
        k, _, v = kv.partition("=")
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return name, out


def build_methods(specs: list[str], corpus: list[str]):
    out = {}
    for spec in specs:
        name, opts = parse_method(spec)
        if name == "uce":
            out[spec] = (lambda o: lambda model, plan: uce_method(model, plan, **o))(opts)
            continue
        try:
            from presets import (
                make_method,  # bench/quality/presets.py (this script's folder is on sys.path)
            )

            out[spec] = make_method(name, corpus=corpus, **opts)
        except KeyError as e:  # a method not installed in this checkout (a bad setting still raises)
            print(f"skipping method {spec}: {e}", file=sys.stderr)
    return out


class Bench:
    def __init__(self, quick: bool, seed: int = 0, model_path=None, arch: str = "unet", n_eval: int | None = None):
        from concept_edit.adapters.diffusers_model import editable_model
        from concept_edit.testbed import (
            get_world,
            load_any_testbed_pipeline,
            load_classifier,
        )

        self.quick = quick
        self.arch = arch
        self.pipe = load_any_testbed_pipeline(arch, model_path)
        self.model = editable_model(self.pipe)
        self.clf = load_classifier()
        self.world = get_world()
        self.seed = seed
        self.cache: dict[tuple[str, int], np.ndarray] = {}
        rng = random.Random(seed)
        objs = list(self.world.objects)
        aliased = [o for o in objs if o.alias and not o.alias_rare]
        rare = [o for o in objs if o.alias_rare]
        rest = [o for o in objs if not o.alias]
        rng.shuffle(rest)
        rng.shuffle(aliased)
        n_hold = 4 if quick else (n_eval or 12)
        self.holdout = rest[:n_hold]
        n_dest = min(50, max(1, (len(rest) - n_hold) // 3))
        self.dest_pool = rest[n_hold : n_hold + n_dest]
        others = rest[n_hold + n_dest :]
        # sources: every third one has a (common) alias while they last, so AL2D exists at small counts
        src = []
        while others or aliased:
            if aliased and (len(src) % 3 == 0 or not others):
                src.append(aliased.pop())
            elif others:
                src.append(others.pop())
        self.sources = src
        self.dest = {s.index: self.dest_pool[i % len(self.dest_pool)] for i, s in enumerate(src)}
        self.rare = rare[:4] if quick else rare
        self.n_eval = 4 if quick else (n_eval or 12)

    # -- generation + scoring ------------------------------------------------------
    def images(self, prompts: list[str], seeds: list[int], edited: bool) -> np.ndarray:
        from concept_edit.testbed.evaluate import generate

        if edited:
            return generate(self.pipe, prompts, seeds)
        need = [(p, s) for p, s in zip(prompts, seeds) if (p, s) not in self.cache]
        if need:
            ims = generate(self.pipe, [p for p, _ in need], [s for _, s in need])
            for k, im in zip(need, ims):
                self.cache[k] = im
        return np.stack([self.cache[(p, s)] for p, s in zip(prompts, seeds)])

    def probs(self, imgs):
        from concept_edit.testbed.evaluate import head_probs

        return head_probs(self.clf, imgs)

    @staticmethod
    def p_of(pr, rows, concept):
        s, c, p = concept.visual
        return pr["shape"][rows, s] * pr["colour"][rows, c] * pr["pattern"][rows, p]

    def object_prompts(self, concepts, templates, use_alias=False, seed_base=0):
        prompts, seeds, owners = [], [], []
        for c in concepts:
            for k, t in enumerate(templates):
                prompts.append(t.format(c.alias if use_alias else c.name))
                seeds.append(seed_base + 10 * c.index + k)
                owners.append(c)
        return prompts, seeds, owners

    def measure_objects(self, sources, dest, edited: bool) -> dict:
        """p-values needed by SF/S2D/AL2D/HD/PD, for the current (edited or not) model."""
        out = {}
        for tag, tpl in (("tpl", EVAL_TPL), ("para", EVAL_PARA)):
            P, S, O = self.object_prompts(sources, tpl, seed_base=1000)
            pr = self.probs(self.images(P, S, edited))
            rows = np.arange(len(P))
            out[f"_ss_{tag}"] = np.array([self.p_of(pr, [i], o)[0] for i, o in zip(rows, O)])
            out[f"_sd_{tag}"] = np.array([self.p_of(pr, [i], dest[o.index])[0] for i, o in zip(rows, O)])
            out[f"ss_{tag}"], out[f"sd_{tag}"] = float(out[f"_ss_{tag}"].mean()), float(out[f"_sd_{tag}"].mean())
        al = [s for s in sources if s.alias and not s.alias_rare]
        if al:
            P, S, O = self.object_prompts(al, EVAL_PARA[:1], use_alias=True, seed_base=5000)
            pr = self.probs(self.images(P, S, edited))
            out["ald"] = float(np.mean([self.p_of(pr, [i], dest[o.index])[0] for i, o in enumerate(O)]))
        P, S, O = self.object_prompts(self.holdout, EVAL_PARA, seed_base=9000)
        ims = self.images(P, S, edited)
        pr = self.probs(ims)
        out["_hh"] = np.array([self.p_of(pr, [i], o)[0] for i, o in enumerate(O)])
        out["hh"] = float(out["_hh"].mean())
        out["_holdout_images"] = ims
        return out

    # -- edits ---------------------------------------------------------------------------
    def apply(self, method, plan):
        from concept_edit.core.apply import apply_delta

        t0 = time.time()
        delta = method(self.model, plan)
        t_edit = time.time() - t0
        h = apply_delta(delta, self.model.weights(list(delta.layers)), check_fingerprint=False)
        return h, t_edit

    def preserve_names(self, sources):
        srcset = {s.index for s in sources}
        hold = {h.index for h in self.holdout}
        pool = [o for o in self.world.objects if o.index not in srcset and o.index not in hold]
        return [o.name for o in pool[:100]]

    def object_sweep(self, method, counts, kind="replace"):
        from concept_edit.core.plan import plan_from_dict

        rows = []
        for n in counts:
            srcs = self.sources[:n]
            ev = srcs[: self.n_eval]
            base = self.measure_objects(ev, self.dest, edited=False)
            if kind == "replace":
                edits = [{"replace": s.name, "with": self.dest[s.index].name} for s in srcs]
            else:
                edits = [{"erase": s.name} for s in srcs]
            plan = plan_from_dict({"edits": edits, "preserve": self.preserve_names(srcs), "templates": EDIT_TEMPLATES})
            try:
                h, t_edit = self.apply(method, plan)
            except Exception as e:
                traceback.print_exc()
                rows.append({"n": n, "error": f"{type(e).__name__}: {e}"[:200]})
                continue
            try:
                after = self.measure_objects(ev, self.dest, edited=True)
            finally:
                h.remove()
            r = {
                "n": n, "edit_seconds": round(t_edit, 2),
                "SF_tpl": base["ss_tpl"] - after["ss_tpl"], "SF_para": base["ss_para"] - after["ss_para"],
                "HD": after["hh"] - base["hh"],
                "PD": float(np.abs(after["_holdout_images"].astype(np.float32) - base["_holdout_images"].astype(np.float32)).mean() / 255),
                "base_ss_tpl": base["ss_tpl"], "base_hh": base["hh"],
                # 95% CI half-widths over the evaluated concepts (paired before/after differences)
                "SF_para_ci": ci95(base["_ss_para"] - after["_ss_para"]), "HD_ci": ci95(after["_hh"] - base["_hh"]),
                "n_eval": len(ev), "n_holdout": len(self.holdout),
            }
            if kind == "replace":
                r["S2D_tpl"] = after["sd_tpl"] - base["sd_tpl"]
                r["S2D_para"] = after["sd_para"] - base["sd_para"]
                r["S2D_para_ci"] = ci95(after["_sd_para"] - base["_sd_para"])
                if "ald" in base:
                    r["AL2D"] = after["ald"] - base["ald"]
            rows.append({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()})
            print(f"  {kind} n={n}: {rows[-1]}", flush=True)
        return rows

    def rectification(self, method):
        from concept_edit.core.plan import plan_from_dict

        srcs = self.rare
        P, S, O = self.object_prompts(srcs, EVAL_PARA if self.quick else EVAL_PARA + EVAL_TPL, use_alias=True, seed_base=7000)
        pr0 = self.probs(self.images(P, S, False))
        base_p = float(np.mean([self.p_of(pr0, [i], o)[0] for i, o in enumerate(O)]))
        Ph, Sh, Oh = self.object_prompts(self.holdout, EVAL_PARA, seed_base=9000)
        prh0 = self.probs(self.images(Ph, Sh, False))
        hh0 = float(np.mean([self.p_of(prh0, [i], o)[0] for i, o in enumerate(Oh)]))
        plan = plan_from_dict({"edits": [{"replace": s.alias, "with": s.name} for s in srcs],
                               "preserve": self.preserve_names(srcs), "templates": EDIT_TEMPLATES})
        try:
            h, t_edit = self.apply(method, plan)
        except Exception as e:
            traceback.print_exc()
            return {"error": f"{type(e).__name__}: {e}"[:200]}
        try:
            pr1 = self.probs(self.images(P, S, True))
            prh1 = self.probs(self.images(Ph, Sh, True))
        finally:
            h.remove()
        p1 = float(np.mean([self.p_of(pr1, [i], o)[0] for i, o in enumerate(O)]))
        hh1 = float(np.mean([self.p_of(prh1, [i], o)[0] for i, o in enumerate(Oh)]))
        return {"n": len(srcs), "S2D": round(p1 - base_p, 4), "p_before": round(base_p, 4), "p_after": round(p1, 4),
                "HD": round(hh1 - hh0, 4)}

    def style_erasure(self, method, counts):
        from concept_edit.core.plan import plan_from_dict

        arts = list(self.world.artists)
        random.Random(self.seed + 1).shuffle(arts)
        hold = arts[-6:]
        pool = arts[:-6]
        rng = random.Random(self.seed + 2)
        objs = rng.sample(self.world.objects, 8)

        def prompts(artists):
            P, S, W = [], [], []
            for a in artists:
                for k, t in enumerate(STYLE_TPL + STYLE_PARA):
                    o = objs[(a.index + k) % len(objs)]
                    P.append(t.format(o=o.name, s=a.name)); S.append(300 + 7 * a.index + k); W.append(a.index)
            return P, S, np.array(W)

        rows = []
        for n in counts:
            er = pool[:n]
            Pe, Se, We = prompts(er[: self.n_eval // 2])
            Ph, Sh, Wh = prompts(hold[: 2 if self.quick else 6])
            pe0 = self.probs(self.images(Pe, Se, False))["style"].argmax(1) == We
            ph0 = self.probs(self.images(Ph, Sh, False))["style"].argmax(1) == Wh
            plan = plan_from_dict({"edits": [{"erase": a.name, "type": "style"} for a in er],
                                   "preserve": [a.name for a in pool[n:]], "templates": ["{}", "art by {}", "a painting by {}"]})
            try:
                h, t_edit = self.apply(method, plan)
            except Exception as e:
                traceback.print_exc()
                rows.append({"n": n, "error": f"{type(e).__name__}: {e}"[:200]})
                continue
            try:
                pe1 = self.probs(self.images(Pe, Se, True))["style"].argmax(1) == We
                ph1 = self.probs(self.images(Ph, Sh, True))["style"].argmax(1) == Wh
            finally:
                h.remove()
            rows.append({"n": n, "style_rate_before": round(float(pe0.mean()), 4),
                         "erasure_rate": round(float(1 - pe1.mean()), 4),
                         "holdout_style_before": round(float(ph0.mean()), 4),
                         "holdout_style_after": round(float(ph1.mean()), 4)})
            print(f"  style n={n}: {rows[-1]}", flush=True)
        return rows

    def debias(self, per: int, n_images: int = 8, iters: int = 6):
        """UCE debias of every profession towards 50/50 crowned/bare, alphas fitted with the classifier."""
        from concept_edit.core.apply import apply_delta
        from concept_edit.core.plan import plan_from_dict
        from concept_edit.engines.debias import fit_debias
        from concept_edit.engines.uce import uce_delta

        profs = self.world.professions

        def crowned_rate(edited):
            out = {}
            for c in profs:
                P = [(EVAL_PARA + EVAL_TPL)[k % 2].format(c.name) for k in range(per)]
                S = [20000 + 100 * c.index + k for k in range(per)]
                out[c.name] = float(self.probs(self.images(P, S, edited))["attribute"].argmax(1).mean())
            return out

        def classify(images, attributes):
            a = self.probs(np.stack([np.asarray(im) for im in images]))["attribute"].argmax(1)
            return [attributes.index("crowned") if x == 1 else attributes.index("bare") for x in a]

        before = crowned_rate(False)
        plan = plan_from_dict({"edits": [{"debias": c.name, "attributes": ["crowned", "bare"]} for c in profs],
                               "preserve": [o.name for o in self.world.objects[:50]], "templates": EDIT_TEMPLATES})
        t0 = time.time()
        from concept_edit.testbed.evaluate import FLUX_STEPS, STEPS

        fit = fit_debias(self.pipe, self.model, plan, classify, n_images=n_images,
                         steps=FLUX_STEPS if self.arch == "flux" else STEPS,
                         max_iters=iters, progress=False, prompt_template="a photo of a {}")
        delta = uce_delta(self.model, plan, alphas=fit.alphas, progress=False)
        h = apply_delta(delta, self.model.weights(delta.layers))
        try:
            after = crowned_rate(True)
        finally:
            h.remove()
        dp = lambda r: float(np.mean([abs(100 * v - 50) / 50 for v in r.values()]))
        return {"dp_before": round(dp(before), 4), "dp_after": round(dp(after), 4), "fit_seconds": round(time.time() - t0, 1),
                "crowned_before": before, "crowned_after": after}


def _model_warning(arch: str = "unet") -> list[str]:
    from concept_edit.testbed import ASSETS

    meta = ASSETS / ("flux_testbed.json" if arch == "flux" else "testbed.json")
    if not meta.exists():
        return []
    ev = json.loads(meta.read_text()).get("evaluation", {})
    acc = ev.get("head_train_templates", {}).get("top1")
    para = ev.get("head_holdout_templates", {}).get("top1")
    if acc is None or acc >= 0.8:
        return ["", f"Unedited model: {acc:.0%} (training templates) / {para:.0%} (held-out paraphrases) of generations "
                f"show the prompted object (`testbed/assets/{meta.name}`).", ""] if acc is not None else []
    return ["", f"**Warning: the bundled model is undertrained: only {acc:.0%} of its unedited generations show the "
            "prompted object (bar: 80%), so p_M is near zero and these numbers do NOT measure edit quality yet. "
            "They show the benchmark runs end to end. Re-run after training longer (testbed/README.md).**", ""]


def write_report(res: dict, out_dir: Path, cmd: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = ["# Edit quality on the testbed model", "",
             f"Reproduce: `{cmd}` (seeded; {res['seconds'] / 60:.1f} min on this machine's 2 CPU cores).", "",
             f"Model: the {res.get('arch', 'unet').upper()} testbed, `concept_edit/testbed/assets/"
             f"{'flux_model' if res.get('arch') == 'flux' else 'model'}` (see `testbed/README.md`); scores from the testbed "
             f"classifier; {res.get('n_eval', 12)} evaluated sources and {res.get('n_holdout', 12)} holdouts, one image "
             "each; +- is a 95% confidence interval over concepts.",
             *_model_warning(res.get("arch", "unet")),
             "p = classifier probability of the concept; SF/S2D on training templates (tpl) and held-out paraphrases (para);",
             "HD/AL2D/PD on held-out paraphrases; PD = mean absolute pixel change of holdout generations (same seeds).", "",
             "## Arbitrary concept editing (replace source -> destination)", "",
             "| method | edits | SF tpl | SF para | S2D tpl | S2D para | AL2D | HD | PD | edit s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    f = lambda v: "" if v is None else (f"{v:+.3f}" if isinstance(v, float) else str(v))

    def fc(r, k):  # value with its confidence interval, where the run recorded one
        return f(r.get(k)) + (f" ±{r[k + '_ci']:.2f}" if r.get(k + "_ci") is not None and r.get(k) is not None else "")

    for m, rows in res["replace"].items():
        for r in rows:
            if "error" in r:
                lines.append(f"| {m} | {r['n']} | error: {r['error'][:80]} |||||||||")
                continue
            lines.append(f"| {m} | {r['n']} | {f(r['SF_tpl'])} | {fc(r, 'SF_para')} | {f(r.get('S2D_tpl'))} | "
                         f"{fc(r, 'S2D_para')} | {f(r.get('AL2D'))} | {fc(r, 'HD')} | {r['PD']:.3f} | {r['edit_seconds']} |")
    if res.get("erase"):
        lines += ["", "## Concept erasure (source -> \"\")", "", "| method | edits | SF tpl | SF para | HD | PD |", "|---|---|---|---|---|---|"]
        for m, rows in res["erase"].items():
            for r in rows:
                if "error" not in r:
                    lines.append(f"| {m} | {r['n']} | {f(r['SF_tpl'])} | {fc(r, 'SF_para')} | {fc(r, 'HD')} | {r['PD']:.3f} |")
    lines += ["", "## Style erasure (artist -> \"art\"; 6 holdout artists)", "",
              "| method | artists erased | style rate before | erasure rate | holdout style before | holdout style after |",
              "|---|---|---|---|---|---|"]
    for m, rows in res["style"].items():
        for r in rows:
            if "error" not in r:
                lines.append(f"| {m} | {r['n']} | {r['style_rate_before']:.3f} | {r['erasure_rate']:.3f} | "
                             f"{r['holdout_style_before']:.3f} | {r['holdout_style_after']:.3f} |")
    lines += ["", "## Rectification (20 rare aliases -> their objects)", "", "| method | p before | p after | S2D | HD |", "|---|---|---|---|---|"]
    for m, r in res["rectify"].items():
        if "error" not in r:
            lines.append(f"| {m} | {r['p_before']:.3f} | {r['p_after']:.3f} | {r['S2D']:+.3f} | {r['HD']:+.3f} |")
        else:
            lines.append(f"| {m} | error: {r['error'][:80]} ||||")
    if res.get("debias"):
        d = res["debias"]
        lines += ["", "## Debiasing (UCE, 10 professions, crowned/bare, alphas fitted by the classifier loop)", "",
                  f"dp = mean |F-50|/50: before {d['dp_before']:.3f}, after {d['dp_after']:.3f} (fit {d['fit_seconds']} s)."]
    lines += ["", "![quality](quality.png)", ""]
    (out_dir / "README.md").write_text("\n".join(lines))
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for m, rows in res["replace"].items():
        ok = [r for r in rows if "error" not in r]
        if not ok:
            continue
        x = [r["n"] for r in ok]
        axes[0].plot(x, [r["SF_para"] for r in ok], marker="o", label=m)
        axes[1].plot(x, [r.get("S2D_para", 0) for r in ok], marker="o", label=m)
        axes[2].plot(x, [r["HD"] for r in ok], marker="o", label=m)
    for ax, t in zip(axes, ["Source Forget (paraphrases)", "Source2Dest (paraphrases)", "Holdout Delta"]):
        ax.set_xscale("log"); ax.set_title(t); ax.set_xlabel("simultaneous edits"); ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "quality.png", dpi=110)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--methods", default=None, help="comma list (default: DEFAULT_METHODS); "
                    "options per method as name:key=value+key=value, e.g. emcid:cov_weight=100+layers=\"0-1\"")
    ap.add_argument("--counts", default=None)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--tasks", default=None, help=f"comma list (default {DEFAULT_TASKS}; by default only the erasers (UCE, RECE, SPEED) "
                    "run the erase sweep, named here it runs for every method)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--model", type=Path, default=None, help="diffusers folder (default: the bundled testbed model)")
    ap.add_argument("--arch", choices=("unet", "flux"), default="unet",
                    help="which testbed: the SD-shaped UNet model or the FLUX-shaped one (testbed/README.md)")
    ap.add_argument("--n-eval", type=int, default=None, help="evaluated sources and holdouts (default 12)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    t0 = time.time()
    from concept_edit.testbed.data import caption_corpus

    b = Bench(a.quick, model_path=a.model, arch=a.arch, n_eval=a.n_eval)
    max_n = len(b.sources)
    counts = [int(x) for x in a.counts.split(",")] if a.counts else ([1, 10] if a.quick else [1, 10, 50, 100, 300, max_n])
    counts = sorted({min(c, max_n) for c in counts})
    names = a.methods.split(",") if a.methods else (["uce"] if a.quick else
                                                    FLUX_METHODS if a.arch == "flux" else DEFAULT_METHODS)
    corpus = caption_corpus(5_000 if a.quick else 50_000)
    methods = build_methods(names, corpus)
    res = {"counts": counts, "replace": {}, "erase": {}, "style": {}, "rectify": {}, "quick": a.quick, "arch": a.arch,
           "n_eval": b.n_eval, "n_holdout": len(b.holdout)}
    tasks = set((a.tasks or DEFAULT_TASKS).split(","))
    for name, fn in methods.items():
        print(f"method {name}", flush=True)
        if "replace" in tasks:
            res["replace"][name] = b.object_sweep(fn, counts, "replace")
        if (name.partition(":")[0] in ERASERS or a.tasks) and not a.quick and "erase" in tasks:
            res["erase"][name] = b.object_sweep(fn, counts, "erase")
        if "style" in tasks:
            res["style"][name] = b.style_erasure(fn, [1] if a.quick else [1, 5, 24])
        if "rectify" in tasks:
            res["rectify"][name] = b.rectification(fn)
            print(f"  rectify: {res['rectify'][name]}", flush=True)
    if "uce" in methods and not a.quick and "debias" in tasks:
        res["debias"] = b.debias(per=16, n_images=8, iters=6)
        print(f"debias: {res['debias']}", flush=True)
    res["seconds"] = time.time() - t0
    # not bench/quality itself: its README holds the protocol-2 headline, written by hand
    out = a.out or (HERE / ("quick" if a.quick else "sweep"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(res, indent=1))
    cmd = "python " + " ".join(["bench/quality/run.py"] + (argv if argv is not None else sys.argv[1:]))
    write_report(res, out, cmd)
    print(f"done in {res['seconds'] / 60:.1f} min -> {out}")
    return res


if __name__ == "__main__":
    main()
