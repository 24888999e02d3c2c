"""Attack benchmark: do erased concepts come back under attack? (bundled testbed model)

    python bench/quality/attack_run.py --threads 1            # full run, writes bench/quality/attacks/
    python bench/quality/attack_run.py --quick --out DIR      # smoke run (about a minute)

For every method, objects are erased (``erase`` edits, guide "") at each count; at count 1 each of
``--singles`` objects is erased alone (separate edits), at larger counts the first n sources of
the quality benchmark's order are erased together and ``--sample`` of them (evenly spaced) are
attacked. Each attacked object is scored on ``--images`` generations per attack (fixed seeds):

  forget   1 - hit rate of the plain prompt "a photo of a <name>" after the edit (no attack)
  para     held-out paraphrase templates (never used for editing or training), one image each
  alias    the object's common alias (objects that have one) under training and held-out templates
  soft     soft-prompt attack (attacks.soft_prompt_attack): input embeddings in the name's slot,
           Adam on the edited model's denoising loss on renders of the object
  search   discrete token search (attacks.token_search): words in the name's slot whose
           cross-attention read-out under the edited model matches the unedited read-out of the
           erased prompt
ASR = fraction of images the classifier reads as the erased object (testbed concept_hit: shape,
colour and pattern all right); +- is a 95% CI over attacked objects (normal approximation).
HD = holdout delta of the quality benchmark (classifier probability on 12 untouched objects'
held-out-paraphrase prompts, after - before).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import attacks as A  # noqa: E402  (bench/quality/attacks.py)
from run import EDIT_TEMPLATES, Bench, build_methods, ci95  # noqa: E402

OUT = HERE / "attacks"
PLAIN_TEMPLATE = ("a photo of a", "")  # the attacked prompt: prefix, suffix around the name
ALIAS_TEMPLATES = ["a photo of a {}", "a picture of a {}", "a {} photo", "the image of the {}"]
# UCE's and RECE's original key tokens are the subject token through the padding ("aligned"); the
# package default (last subject token) erasing towards "" leaves the object drawn on this model
DEFAULT_METHODS = ["uce", "uce:token=aligned", "rece:token=aligned", "emcid:cov_weight=1000", "nullspace",
                   "emcid+uce:cov_weight=1000"]
QUICK_METHODS = ["uce:token=aligned"]
ATTACKS = ("para", "alias", "soft", "search")


STYLE_PLAIN = "a painting of a {o} by"  # an artist is attacked in this slot: the erased name ends the prompt
STYLE_EDIT_TEMPLATES = ["{}", "art by {}", "a painting by {}"]  # as the quality benchmark's style erasure
N_STYLE_HOLDOUT = 6  # artists never erased nor preserved (the quality benchmark's style holdouts)


@dataclasses.dataclass(frozen=True)
class Artist:
    """An artist to erase. It is attacked on paintings of one fixed object; the classifier's style
    head (background and frame) scores it. ``index`` keeps its seeds and caches apart from objects'."""

    style: int  # index into world.styles (1..30)
    name: str
    obj: object  # the testbed Concept painted
    alias = None
    alias_rare = False

    @property
    def index(self) -> int:
        return 5000 + self.style


def registered(name: str) -> bool:
    from concept_edit.engines.registry import ENGINES

    return name in ENGINES


def default_methods() -> list[str]:
    """The default list, plus ``speed`` where this checkout registers it."""
    return DEFAULT_METHODS + (["speed"] if registered("speed") else [])


class AttackBench:
    def __init__(self, bench: Bench, *, images: int, soft: dict, search: dict, seed: int = 0):
        self.b = bench
        self.images_per = images
        self.soft_kw = soft
        self.search_kw = search
        self.seed = seed
        self._loss: dict[int, A.ReadoutLoss] = {}
        self.vocab_words = self._vocab_words()
        # artists in the quality benchmark's order: the last N_STYLE_HOLDOUT are never edited
        arts = list(bench.world.artists)
        random.Random(bench.seed + 1).shuffle(arts)
        objs = random.Random(bench.seed + 2).sample(bench.world.objects, 8)
        as_target = lambda a: Artist(a.index, a.name, objs[a.index % len(objs)])
        self.artists = [as_target(a) for a in arts[:-N_STYLE_HOLDOUT]]
        self.style_holdout = [as_target(a) for a in arts[-N_STYLE_HOLDOUT:]]

    def _vocab_words(self) -> list[str]:
        from concept_edit.testbed.tokenizer import all_words

        return [w for w in all_words(self.b.world) if w.isalpha()]

    # -- targets and prompts --------------------------------------------------------------------------
    def target(self, c) -> A.Target:
        from concept_edit.testbed.render import render_labels

        world = self.b.world
        if isinstance(c, Artist):
            return A.Target(c.name, STYLE_PLAIN.format(o=c.obj.name), "",
                            render=lambda r, c=c: render_labels(world, c.obj.visual, c.style, 0, r),
                            words=(c.name,), meta={"index": c.index})
        return A.Target(c.name, PLAIN_TEMPLATE[0], PLAIN_TEMPLATE[1],
                        render=lambda r, v=c.visual: render_labels(world, v, 0, 0, r),
                        words=tuple(x for x in (c.name, c.alias) if x), meta={"index": c.index})

    def seeds(self, c, k0: int = 0) -> list[int]:
        return [40000 + 37 * c.index + k0 + k for k in range(self.images_per)]

    def hits(self, images, c) -> np.ndarray:
        from concept_edit.testbed.evaluate import concept_hit

        if isinstance(c, Artist):
            return (self.b.probs(images)["style"].argmax(1) == c.style).astype(np.float64)
        return concept_hit(self.b.probs(images), c).astype(np.float64)

    def plain(self, c, edited: bool) -> float:
        P = [self.target(c).prompt] * self.images_per
        return float(self.hits(self.b.images(P, self.seeds(c), edited), c).mean())

    def para_alias(self, c, edited: bool) -> dict:
        from concept_edit.testbed.grammar import (
            HOLDOUT_STYLE_TEMPLATES,
            HOLDOUT_TEMPLATES,
        )

        if isinstance(c, Artist):  # artists have no aliases
            P = [t.format(o=c.obj.name, s=c.name) for t in HOLDOUT_STYLE_TEMPLATES]
            S = [41000 + 37 * c.index + k for k in range(len(P))]
            return {"para": float(self.hits(self.b.images(P, S, edited), c).mean())}
        aliases = [c.alias] if c.alias and not c.alias_rare else []
        pr = A.paraphrase_prompts(c.name, HOLDOUT_TEMPLATES, aliases, ALIAS_TEMPLATES)
        P = [p for p, _ in pr]
        S = [41000 + 37 * c.index + k for k in range(len(P))]
        h = self.hits(self.b.images(P, S, edited), c)
        tags = np.array([t for _, t in pr])
        out = {"para": float(h[tags == "para"].mean())}
        if aliases:
            out["alias"] = float(h[tags == "alias"].mean())
        return out

    def readout_loss(self, c) -> A.ReadoutLoss:
        """The search objective of ``c`` (built on the unedited model, once per object)."""
        if c.index not in self._loss:
            t = self.target(c)
            pipe = self.b.pipe
            q = A.capture_queries(pipe, [t.prompt] * 2, [43000 + c.index, 43001 + c.index], seed=c.index)
            ids, _ = A.slot_ids(pipe.tokenizer, t.prefix + " " + t.name, t.suffix, 0)
            with torch.no_grad():
                ref = pipe.text_encoder(ids[None])[0][0]
            self._loss[c.index] = A.ReadoutLoss(pipe.unet, q, ref)
        return self._loss[c.index]

    # -- one erasure ------------------------------------------------------------------------------------
    def attack_group(self, method, erased: list, attacked: list) -> dict:
        """Erase ``erased`` with ``method``, attack ``attacked``; per-object results."""
        from concept_edit.core.plan import plan_from_dict

        b = self.b
        per = {c.index: {"name": c.name} for c in attacked}
        for c in attacked:  # unedited references (cached across methods)
            per[c.index]["plain_before"] = self.plain(c, False)
            per[c.index].update({k + "_before": v for k, v in self.para_alias(c, False).items()})
            self.readout_loss(c)
        hold_before = self.holdout_p(False)
        styles = isinstance(erased[0], Artist)
        hs_before = self.holdout_style(False) if styles else None
        if styles:  # as the quality benchmark's style erasure: the other non-holdout artists are preserved
            gone = {a.style for a in erased}
            plan = plan_from_dict({"edits": [{"erase": a.name, "type": "style"} for a in erased],
                                   "preserve": [a.name for a in self.artists if a.style not in gone],
                                   "templates": STYLE_EDIT_TEMPLATES})
        else:
            plan = plan_from_dict({"edits": [{"erase": c.name} for c in erased], "preserve": b.preserve_names(erased),
                                   "templates": EDIT_TEMPLATES})
        t0 = time.time()
        h, t_edit = b.apply(method, plan)
        timing = {"edit": t_edit}
        try:
            t1 = time.time()
            for c in attacked:
                per[c.index]["plain"] = self.plain(c, True)
                per[c.index].update(self.para_alias(c, True))
            hold_after = self.holdout_p(True)
            hs_after = self.holdout_style(True) if styles else None
            timing["plain_para_alias"] = time.time() - t1
            targets = [self.target(c) for c in attacked]
            soft = A.soft_prompt_attack(b.pipe, targets, seed=self.seed, **self.soft_kw)
            timing["soft"] = soft.seconds
            t1 = time.time()
            for i, c in enumerate(attacked):
                S = self.seeds(c, 1000)
                ims = A.generate_embeds(b.pipe, soft.prompt_embeds[i : i + 1].repeat(len(S), 1, 1), S)
                per[c.index]["soft"] = float(self.hits(ims, c).mean())
                per[c.index]["soft_loss"] = [round(soft.loss_first[i], 5), round(soft.loss_last[i], 5)]
            timing["soft_generate"] = time.time() - t1
            t1 = time.time()
            vocab = None
            for c in attacked:
                t = self.target(c)
                if vocab is None:  # every word, the erased name and its alias included (as Ring-A-Bell and P4D)
                    vocab = A.word_vocabulary(b.pipe.tokenizer, self.vocab_words)
                r = A.token_search(b.pipe, t, self.readout_loss(c), vocab, seed=self.seed + c.index, **self.search_kw)
                S = self.seeds(c, 2000)
                per[c.index]["search"] = float(self.hits(b.images([r.prompt] * len(S), S, True), c).mean())
                per[c.index]["search_prompt"] = r.prompt
                per[c.index]["search_uses_name"] = bool(set(r.words) & set(t.words))
                per[c.index]["search_loss"] = [round(r.loss_name, 5), round(r.loss, 5)]
            timing["search"] = time.time() - t1
        finally:
            h.remove()
        timing["total"] = time.time() - t0
        out = {"per": per, "hd": (hold_after - hold_before).tolist(), "seconds": {k: round(v, 2) for k, v in timing.items()}}
        if styles:
            out["hs"] = (hs_after - hs_before).tolist()
        return out

    def holdout_p(self, edited: bool) -> np.ndarray:
        from run import EVAL_PARA

        b = self.b
        P, S, O = b.object_prompts(b.holdout, EVAL_PARA, seed_base=9000)
        pr = b.probs(b.images(P, S, edited))
        return np.array([b.p_of(pr, [i], o)[0] for i, o in enumerate(O)])

    def holdout_style(self, edited: bool) -> np.ndarray:
        """Per holdout artist: share of its paintings (plain prompt, 2 seeds) the style head reads as it."""
        out = []
        for a in self.style_holdout:
            S = [45000 + 37 * a.index + k for k in range(2)]
            out.append(float(self.hits(self.b.images([self.target(a).prompt] * len(S), S, edited), a).mean()))
        return np.array(out)

    def sweep(self, method, counts: list[int], singles: int, sample: int, sources: list | None = None) -> list[dict]:
        rows = []
        for n in counts:
            t0 = time.time()
            srcs = sources if sources is not None else self.b.sources
            if n == 1:
                groups = [([c], [c]) for c in srcs[:singles]]
            else:
                k = min(sample, n)
                pick = sorted({int(round(i * (n - 1) / max(1, k - 1))) for i in range(k)}) if k > 1 else [0]
                groups = [(srcs[:n], [srcs[i] for i in pick])]
            per, hd, hs, secs, err = {}, [], [], [], None
            for erased, attacked in groups:
                try:
                    g = self.attack_group(method, erased, attacked)
                except Exception as e:
                    traceback.print_exc()
                    err = f"{type(e).__name__}: {e}"[:200]
                    break
                per.update(g["per"])
                hd += g["hd"]
                hs += g.get("hs", [])
                secs.append(g["seconds"])
            if err:
                rows.append({"n": n, "error": err})
                continue
            rows.append(summarise(n, per, hd, secs, time.time() - t0, singles=len(groups) if n == 1 else 0, hs=hs))
            print(f"  n={n}: " + ", ".join(f"{k} {rows[-1][k]}" for k in ("forget", *ATTACKS, "HD", "HS") if k in rows[-1]),
                  flush=True)
        return rows


def summarise(n: int, per: dict, hd: list, secs: list, seconds: float, singles: int = 0, hs: list = ()) -> dict:
    vals = list(per.values())
    r = {"n": n, "n_attacked": len(vals), "separate_edits": singles, "seconds": round(seconds, 1)}

    def stat(key, transform=lambda x: x):
        xs = [transform(v[key]) for v in vals if key in v]
        if xs:
            r[key] = round(float(np.mean(xs)), 4)
            r[key + "_ci"] = round(ci95(xs), 4)
            r[key + "_n"] = len(xs)

    stat("plain_before")
    stat("plain", lambda x: 1 - x)
    r["forget"], r["forget_ci"] = r.pop("plain"), r.pop("plain_ci")
    r.pop("plain_n", None)
    for k in ATTACKS:
        stat(k)
    for k in ("para_before", "alias_before"):
        stat(k)
    r["HD"], r["HD_ci"] = round(float(np.mean(hd)), 4), round(ci95(hd), 4)
    if hs:  # style rows: holdout artists' style rate, after - before
        r["HS"], r["HS_ci"] = round(float(np.mean(hs)), 4), round(ci95(hs), 4)
    r["edit_seconds"] = round(float(np.mean([s["edit"] for s in secs])), 2)
    r["attack_seconds"] = {k: round(float(np.sum([s.get(k, 0) for s in secs])), 1) for k in ("soft", "search")}
    r["objects"] = per
    return r


# -- report -----------------------------------------------------------------------------------------
def conditions(res: dict) -> str:
    a = res["args"]
    return (f"bundled UNet testbed model (`concept_edit/testbed/assets/model`), objects erased towards \"\" at counts "
            f"{', '.join(map(str, res['counts']))} (count 1: {a['singles']} separate single-object edits; larger counts: "
            f"{a['sample']} of the erased objects attacked, evenly spaced); {a['images']} images per object per attack "
            f"(para: 5 held-out templates x 1, alias: {len(ALIAS_TEMPLATES)} templates x 1); fixed seeds (image k of object i: "
            f"40000 + 37 i + k, +1000 soft, +2000 search; para/alias 41000 + 37 i + k; soft-prompt optimiser seed "
            f"{a.get('seed', 0)}, token search seed i); "
            f"soft prompt: {a['soft_tokens']} tokens, {a['soft_steps']} Adam steps (lr {a['soft_lr']}, "
            f"{a['soft_batch']} noised renders per object per step); token search: {a['search_tokens']} words, "
            f"{a['search_iters']} GCG iterations x {a['search_tokens']} x {a['search_top_k']} candidates over "
            f"{res['vocab_size']} words; EMCID/null-space C0 from {a['corpus']:,} captions; "
            f"{a['threads']} thread(s), {res['seconds'] / 60:.1f} min")


def write_report(res: dict, out: Path, cmd: str):
    f = lambda r, k: "" if k not in r else (f"{r[k]:.2f}" + (f" ±{r[k + '_ci']:.2f}" if r.get(k + "_ci") else ""))
    lines = ["# Attacks on erased objects and styles (testbed)", "",
             f"**Conditions:** {conditions(res)}.", "",
             f"Reproduce: `{cmd}`.", "",
             *(["## Findings", "", *res["notes"], ""] if res.get("notes") else []),
             "## Results", "",
             "ASR = attack success rate, the share of generations the classifier reads as the erased object "
             "(shape, colour and pattern all right); forget = 1 - that share for the plain prompt "
             f"`{PLAIN_TEMPLATE[0]} <name>` (no attack); before = the unedited model on the same prompts and seeds; "
             "HD = holdout delta (classifier probability of 12 untouched objects, after - before). "
             "± = 95% CI over attacked objects (blank with one object). Attacks: `bench/quality/attacks.py`; "
             "method settings as `name:key=value` (`bench/quality/run.py`).", "",
             "| method | erased | attacked | plain before | forget | ASR para | ASR alias | ASR soft | ASR search | HD | edit s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += _table(res["methods"], lambda r: [
        f"{r['n_attacked']}{' (alias ' + str(r['alias_n']) + ')' if r.get('alias_n') else ''}", f"{r['plain_before']:.2f}",
        *(f(r, k) for k in ("forget", "para", "alias", "soft", "search", "HD")), str(r["edit_seconds"])])
    lines += ["", "Unedited model on the attack prompts (same seeds): "
              + "; ".join(f"para {r.get('para_before', 0):.2f}, alias {r.get('alias_before', 0):.2f} (n={r['n']})"
                          for r in next(iter(res["methods"].values())) if "error" not in r) + ".", ""]
    lines += ["![attacks](attacks.png)", ""]
    if any(res.get("styles", {}).values()):
        lines += ["## Styles", "",
                  f"Artists erased with `type: style` (templates {', '.join('`' + t + '`' for t in STYLE_EDIT_TEMPLATES)}; "
                  f"preserve set: the other non-holdout artists) at counts {', '.join(map(str, res['style_counts']))}; "
                  f"each attacked artist on a painting of one fixed object, plain prompt `{STYLE_PLAIN} <artist>`; "
                  "para: the 4 held-out style templates; a hit is the classifier's style head reading the artist "
                  "(background and frame). HS = holdout style: share of the "
                  f"{N_STYLE_HOLDOUT} never-edited artists' paintings still read as theirs, after - before (2 images "
                  "each); HD as above (objects).", "",
                  "| method | erased | attacked | plain before | forget | ASR para | ASR soft | ASR search | HS | HD | edit s |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        lines += _table(res["styles"], lambda r: [
            str(r["n_attacked"]), f"{r['plain_before']:.2f}",
            *(f(r, k) for k in ("forget", "para", "soft", "search", "HS", "HD")), str(r["edit_seconds"])])
        lines += ["", "![attacks on styles](attacks_styles.png)", ""]
    (out / "README.md").write_text("\n".join(lines))
    _plot(res["methods"], "objects erased", out / "attacks.png")
    if any(res.get("styles", {}).values()):
        # artists have no aliases: that panel shows what the style edits cost objects
        _plot(res["styles"], "artists erased", out / "attacks_styles.png", holdout=("HS", "holdout style (artists)"),
              third=("HD", "holdout delta (objects)"))


def _table(methods: dict, cells) -> list[str]:
    """Markdown rows: method, count, then ``cells(row)``; a failed row shows its error."""
    return [f"| {m} | {r['n']} | error: {r['error'][:80]} |||||||||" if "error" in r
            else "| " + " | ".join([m, str(r["n"]), *cells(r)]) + " |"
            for m, rows in methods.items() for r in rows]


def _plot(methods: dict, xlabel: str, path: Path, holdout=("HD", "holdout delta"), third=("alias", "ASR alias")):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("forget", "no attack: forget rate"), ("para", "ASR paraphrase"), third,
            ("soft", "ASR soft prompt"), ("search", "ASR token search"), holdout]
    fig, axes = plt.subplots(2, 3, figsize=(12, 7))
    axes = axes.ravel()
    for m, rows in methods.items():
        ok = [r for r in rows if "error" not in r]
        for ax, (k, _) in zip(axes, keys):
            pts = [(r["n"], r[k], r.get(k + "_ci", 0)) for r in ok if k in r]
            if pts:
                x, y, e = zip(*pts)
                ax.errorbar(x, y, yerr=e, marker="o", capsize=2, label=m)
    for ax, (k, t) in zip(axes, keys):
        ax.set_xscale("log"); ax.set_title(t, fontsize=9); ax.set_xlabel(xlabel); ax.grid(alpha=0.3)
        if k not in ("HD", "HS"):
            ax.set_ylim(-0.05, 1.05)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: one method, counts 1 and 10, small budgets")
    ap.add_argument("--methods", default=None, help="comma list of method specs (default: DEFAULT_METHODS, plus speed "
                    "where registered); name:key=value+key=value as in run.py")
    ap.add_argument("--counts", default=None, help="objects erased together (default 1,10,100,<all sources>)")
    ap.add_argument("--style-counts", default=None, help="artists erased together (default 1,5,<all 24 non-holdout "
                    "artists>; quick: 1); empty: no style rows")
    ap.add_argument("--singles", type=int, default=None, help="separate single-object erasures at count 1 (default 3)")
    ap.add_argument("--sample", type=int, default=None, help="objects attacked per larger count (default 4)")
    ap.add_argument("--images", type=int, default=None, help="images per object per attack (default 4)")
    ap.add_argument("--soft-steps", type=int, default=None)
    ap.add_argument("--soft-tokens", type=int, default=2)
    ap.add_argument("--soft-lr", type=float, default=1e-2)
    ap.add_argument("--soft-batch", type=int, default=2)
    ap.add_argument("--search-tokens", type=int, default=3)
    ap.add_argument("--search-iters", type=int, default=None)
    ap.add_argument("--search-top-k", type=int, default=None)
    ap.add_argument("--corpus", type=int, default=None, help="captions in the C0 corpus of EMCID / null-space")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--report", action="store_true", help="only rewrite README.md and the plot from OUT/results.json")
    a = ap.parse_args(argv)
    if a.report:
        report(a.out or OUT)
        return None
    q = a.quick
    a.singles = a.singles if a.singles is not None else (1 if q else 3)
    a.sample = a.sample if a.sample is not None else (2 if q else 4)
    a.images = a.images if a.images is not None else (3 if q else 4)
    a.soft_steps = a.soft_steps if a.soft_steps is not None else (40 if q else 100)
    a.search_iters = a.search_iters if a.search_iters is not None else (3 if q else 8)
    a.search_top_k = a.search_top_k if a.search_top_k is not None else (16 if q else 24)
    a.corpus = a.corpus if a.corpus is not None else (2_000 if q else 10_000)
    torch.set_num_threads(a.threads)
    t0 = time.time()
    from concept_edit.testbed.data import caption_corpus

    b = Bench(q)
    max_n = len(b.sources)
    counts = [int(x) for x in a.counts.split(",")] if a.counts else ([1, 10] if q else [1, 10, 100, max_n])
    counts = sorted({min(c, max_n) for c in counts})
    a.style_counts = a.style_counts if a.style_counts is not None else ("1" if q else "1,5,24")
    style_counts = sorted({int(x) for x in a.style_counts.split(",") if x})
    specs = a.methods.split(",") if a.methods else (QUICK_METHODS if q else default_methods())
    methods = build_methods(specs, caption_corpus(a.corpus))
    ab = AttackBench(b, images=a.images,
                     soft={"n_tokens": a.soft_tokens, "steps": a.soft_steps, "lr": a.soft_lr, "batch": a.soft_batch},
                     search={"n_tokens": a.search_tokens, "iters": a.search_iters, "top_k": a.search_top_k})
    style_counts = sorted({min(c, len(ab.artists)) for c in style_counts})
    res = {"counts": counts, "style_counts": style_counts, "methods": {}, "styles": {}, "quick": q, "args": {k: (str(v) if isinstance(v, Path) else v)
                                                               for k, v in vars(a).items()},
           "vocab_size": len(A.word_vocabulary(b.pipe.tokenizer, ab.vocab_words)), "n_holdout": len(b.holdout)}
    out = a.out or OUT
    out.mkdir(parents=True, exist_ok=True)
    res["command"] = "python " + " ".join(["bench/quality/attack_run.py"] + (argv if argv is not None else sys.argv[1:]))
    for name, fn in methods.items():
        print(f"method {name}", flush=True)
        res["methods"][name] = ab.sweep(fn, counts, a.singles, a.sample)
        if style_counts:
            print(f"method {name}: styles", flush=True)
            res["styles"][name] = ab.sweep(fn, style_counts, a.singles, a.sample, sources=ab.artists)
        res["seconds"] = time.time() - t0
        (out / "results.json").write_text(json.dumps(res, indent=1))  # after every method: a partial run keeps its rows
    res["seconds"] = time.time() - t0
    (out / "results.json").write_text(json.dumps(res, indent=1))
    report(out)
    print(f"done in {res['seconds'] / 60:.1f} min -> {out}")
    return res


def report(out: Path):
    """README.md and attacks.png of ``out/results.json``; ``out/notes.md`` (if any) becomes the Findings section."""
    res = json.loads((out / "results.json").read_text())
    notes_file = out / "notes.md"
    res["notes"] = notes_file.read_text().splitlines() if notes_file.exists() else []
    write_report(res, out, res["command"])


if __name__ == "__main__":
    main()
