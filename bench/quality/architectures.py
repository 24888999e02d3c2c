"""Every method on both testbeds side by side: the SD-shaped UNet model and the FLUX-shaped model,
same world, edits, seeds and classifier. UCE edits the text readers (UNet cross-attention to_k/to_v;
FLUX context embedder + pooled-text embedder); EMCID and null-space edit the text encoder's MLP
(CLIP fc2 on the UNet model, T5 wo on FLUX).

    python bench/quality/architectures.py --threads 2      # runs both, writes bench/quality/architectures/

Runs of ``run.py`` (each kept in its own folder with its own README, ``RUNS``): UCE with its defaults
on the UNet model and on the FLUX model (every task; on FLUX also with aligned keys), on the FLUX
model the key-token and text-reader variants (erase at 10 and 100 edits), and EMCID and null-space
on both. This script then writes the side-by-side table and plot (``notes.md`` in the output folder
becomes its Findings section). ``--report-only`` rebuilds them from the saved results.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "architectures"
COUNTS = "1,10,100,918"
N_EVAL = 50
RUNS = {  # folder: run.py arguments
    "unet": ["--arch", "unet", "--methods", "uce", "--counts", COUNTS],
    "flux": ["--arch", "flux", "--methods", "uce", "--counts", COUNTS, "--tasks", "replace,erase,style,rectify"],
    # UCE's original aligned keys at every count and task (the variants below only at 10 and 100)
    "flux_aligned": ["--arch", "flux", "--methods", "uce:token=aligned", "--counts", COUNTS,
                     "--tasks", "replace,erase,style,rectify"],
    # debiasing fits its alphas by generating images in a loop: on the FLUX model (true CFG, two
    # transformer passes per step) that is the slowest task; it runs on its own
    "flux_debias": ["--arch", "flux", "--methods", "uce", "--tasks", "debias"],
    "flux_variants": ["--arch", "flux", "--tasks", "erase", "--counts", "10,100",
                      "--methods", "uce:token=aligned,uce:token=all,uce:readers=context,uce:readers=pooled"],
    "flux_variants_replace": ["--arch", "flux", "--tasks", "replace", "--counts", "10,100",
                              "--methods", "uce:token=aligned,uce:token=all,uce:readers=context,uce:readers=pooled"],
    # the text-encoder editors (EMCID, null-space): CLIP fc2 on the UNet model, T5 wo on FLUX
    "unet_te": ["--arch", "unet", "--methods", "emcid,nullspace", "--counts", COUNTS,
                "--tasks", "replace,erase,style,rectify"],
    "flux_te": ["--arch", "flux", "--methods", "emcid-t5,nullspace-t5", "--counts", COUNTS,
                "--tasks", "replace,erase,style,rectify"],
}


def run_all(threads: int, only: list[str]) -> None:
    sys.path.insert(0, str(HERE))
    import run as quality

    for name, args in RUNS.items():
        if only and name not in only:
            continue
        print(f"== {name}", flush=True)
        quality.main([*args, "--n-eval", str(N_EVAL), "--threads", str(threads), "--out", str(OUT / name)])


def _rows(res: dict, task: str, method: str = "uce") -> dict[int, dict]:
    return {r["n"]: r for r in res.get(task, {}).get(method, []) if "error" not in r}


def _v(r: dict | None, k: str) -> str:
    if r is None or r.get(k) is None:
        return ""
    ci = r.get(k + "_ci")
    return f"{r[k]:+.2f}" + (f" ±{ci:.2f}" if ci is not None else "")


# method label -> (run folder, method name) on the UNet testbed and on the FLUX testbed
PAIRS = {
    "UCE": (("unet", "uce"), ("flux", "uce")),
    "UCE, aligned tokens": (("unet", "uce:token=aligned"), ("flux_aligned", "uce:token=aligned")),
    "EMCID": (("unet_te", "emcid"), ("flux_te", "emcid-t5")),
    "null-space": (("unet_te", "nullspace"), ("flux_te", "nullspace-t5")),
}


def report(cmd: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = {k: json.loads((OUT / k / "results.json").read_text()) for k in RUNS if (OUT / k / "results.json").exists()}
    meta = {k: json.loads((HERE.parents[1] / "testbed" / "assets" / m).read_text())
            for k, m in (("unet", "testbed.json"), ("flux", "flux_testbed.json"))
            if (HERE.parents[1] / "testbed" / "assets" / m).exists()}
    acc = {k: m["evaluation"]["head_train_templates"]["top1"] for k, m in meta.items()}
    side = lambda run, task, m: res.get(run, {}).get(task, {}).get(m)  # noqa: E731
    lines = ["# Every method on the UNet and the FLUX testbed", "",
             f"Reproduce: `{cmd}` ({sum(r.get('seconds', 0) for r in res.values()) / 60:.0f} min on 2 CPU cores, "
             "the machine otherwise idle).", "",
             "Conditions: the same edits, evaluation prompts, seeds and classifier on both models; preserve set of 100 "
             "unedited objects; edit templates `{}`, `a photo of a {}`, `a painting of a {}`. "
             f"{N_EVAL} evaluated sources and {N_EVAL} holdout objects (never edited or preserved), one image each; "
             "± is a 95% confidence interval over concepts. SF/S2D/HD on a held-out paraphrase template "
             "(`the image of the {}`); style rates on 6 holdout artists. "
             + (f"Unedited top-1: UNet {acc.get('unet', 0):.0%}, FLUX {acc.get('flux', 0):.0%} (training templates). "
                if acc else "")
             + "This is `run.py`'s protocol (holdouts' captions are in the C0 corpus); protocol 2 (`protocol2/`) is "
             "the stricter one for the text-encoder methods, on the UNet model.", "",
             "Methods, each with its defaults: **UCE** (lambda 0.5, last subject token; the row `UCE, aligned tokens` is "
             "FLUX with `token: aligned`, the UNet column empty) edits the readers of text: "
             "on the UNet cross-attention `to_k`/`to_v` of 7 blocks, on FLUX `context_embedder` (T5 token states) and "
             "`time_text_embed.text_embedder.linear_1` (pooled CLIP vector). **EMCID** (stage II, destination-state "
             "targets, alpha 0.5, C0 weight 10,000) and **null-space** (AlphaEdit-style projector from the corpus and "
             "the preserve set, threshold 2e-2, destination-state targets) edit the text encoder's MLP: on the UNet "
             "model CLIP `mlp.fc2` of layers 0-2, on FLUX the T5 encoder's `DenseReluDense.wo` of blocks 0-2 (presets "
             "`emcid-t5`, `nullspace-t5`); C0 from 50,000 testbed captions, captions naming an edited concept left "
             "out. Debiasing is UCE's.", ""]
    lines += ["## Replace and erase", "",
              "| method | task | edits | SF para UNet | SF para FLUX | S2D para UNet | S2D para FLUX | HD UNet | HD FLUX | "
              "edit s UNet | edit s FLUX |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for label, ((ru_, mu), (rf_, mf)) in PAIRS.items():
        for task in ("replace", "erase"):
            ru, rf = _rows(res.get(ru_, {}), task, mu), _rows(res.get(rf_, {}), task, mf)
            for n in sorted(set(ru) | set(rf)):
                a, b = ru.get(n), rf.get(n)
                es = lambda r: "" if r is None else str(r.get("edit_seconds", ""))  # noqa: E731
                lines.append(f"| {label} | {task} | {n} | {_v(a, 'SF_para')} | {_v(b, 'SF_para')} | "
                             f"{_v(a, 'S2D_para') if task == 'replace' else ''} | "
                             f"{_v(b, 'S2D_para') if task == 'replace' else ''} | {_v(a, 'HD')} | {_v(b, 'HD')} | "
                             f"{es(a)} | {es(b)} |")
    lines += ["", "## Styles, rectification, debiasing", "",
              "| method | task | n | UNet | FLUX |", "|---|---|---|---|---|"]
    g = lambda r: "" if r is None else (f"style drawn {r['style_rate_before']:.2f} -> {1 - r['erasure_rate']:.2f}; "  # noqa: E731
                                        f"holdout artists {r['holdout_style_before']:.2f} -> {r['holdout_style_after']:.2f}")
    h = lambda x: "" if not x or "error" in x else f"{x['S2D']:+.2f} (p {x['p_before']:.2f} -> {x['p_after']:.2f}), HD {x['HD']:+.2f}"  # noqa: E731
    for label, ((ru_, mu), (rf_, mf)) in PAIRS.items():
        su = {r["n"]: r for r in side(ru_, "style", mu) or [] if "error" not in r}
        sf = {r["n"]: r for r in side(rf_, "style", mf) or [] if "error" not in r}
        for n in sorted(set(su) | set(sf)):
            lines.append(f"| {label} | style erasure | {n} artists | {g(su.get(n))} | {g(sf.get(n))} |")
        a, b = side(ru_, "rectify", mu) or {}, side(rf_, "rectify", mf) or {}
        if a or b:
            lines.append(f"| {label} | rectification S2D (20 rare aliases) | 20 | {h(a)} | {h(b)} |")
    du = res.get("unet", {}).get("debias")
    df = res.get("flux", {}).get("debias") or res.get("flux_debias", {}).get("debias")
    d = lambda x: "" if not x else f"dp {x['dp_before']:.2f} -> {x['dp_after']:.2f}"  # noqa: E731
    lines.append(f"| UCE | debias (10 professions, 50/50 crowned) | 10 | {d(du)} | {d(df)} |")
    v = {**res.get("flux_variants", {}), "replace": res.get("flux_variants_replace", {}).get("replace", {})}
    if v.get("erase") or v.get("replace"):
        f = res.get("flux", {})
        lines += ["", "## FLUX: which keys, which readers (UCE otherwise at its defaults)", "",
                  "T5 is bidirectional: every token's state depends on the subject. `last`: the last subject token "
                  "(default); `aligned`: UCE's original choice, every row from the subject token through the padding, "
                  "source and destination aligned; `all`: aligned plus the template's tokens before the subject. "
                  "`readers=context`/`pooled`: only one of the two text readers is edited.", "",
                  "| variant | task | edits | SF para | S2D para | HD | edit s |", "|---|---|---|---|---|---|---|"]
        names = list(dict.fromkeys([*v.get("erase", {}), *v.get("replace", {})]))
        variants = [("uce (last, both readers)", f, "uce")] + [(m, v, m) for m in names]
        for task in ("erase", "replace"):
            for label, src, m in variants:
                for n, r in sorted(_rows(src, task, m).items()):
                    if n in (10, 100):
                        lines.append(f"| {label} | {task} | {n} | {_v(r, 'SF_para')} | "
                                     f"{_v(r, 'S2D_para') if task == 'replace' else ''} | {_v(r, 'HD')} | "
                                     f"{r['edit_seconds']} |")
    lines += ["", "![UNet vs FLUX](architectures.png)", ""]
    notes = OUT / "notes.md"
    if notes.exists():
        lines += ["## Findings (by hand)", "", notes.read_text()]
    (OUT / "README.md").write_text("\n".join(lines))

    fig, axes = plt.subplots(len(PAIRS), 3, figsize=(13, 3.3 * len(PAIRS)), squeeze=False)
    for row, (label, sides) in zip(axes, PAIRS.items()):
        for arch, (run, m), style in zip(("UNet", "FLUX"), sides, ("-", "--")):
            for task, colour in (("replace", "C0"), ("erase", "C1")):
                rows = _rows(res.get(run, {}), task, m)
                x = sorted(rows)
                for ax, k in zip(row, ("SF_para", "S2D_para", "HD")):
                    y = [rows[n].get(k) for n in x]
                    if x and all(val is not None for val in y) and not (task == "erase" and k == "S2D_para"):
                        e = [rows[n].get(k + "_ci") or 0 for n in x]
                        ax.errorbar(x, y, yerr=e, ls=style, color=colour, marker="o", capsize=3, label=f"{arch} {task}")
        for ax, t in zip(row, ["Source Forget (paraphrase)", "Source2Dest (paraphrase)", "Holdout Delta"]):
            ax.set_xscale("log"); ax.set_title(f"{label}: {t}", fontsize=9); ax.set_xlabel("simultaneous edits")
            ax.grid(alpha=0.3)
        if row[2].get_legend_handles_labels()[0]:
            row[2].legend(fontsize=7)
    fig.suptitle("UNet testbed (solid) vs FLUX testbed (dashed), 95% CIs", fontsize=10)
    fig.tight_layout()
    fig.savefig(OUT / "architectures.png", dpi=100)
    plt.close(fig)
    print(f"wrote {OUT / 'README.md'}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", default="", help="comma list of runs to (re)do: " + ",".join(RUNS))
    ap.add_argument("--report-only", action="store_true")
    a = ap.parse_args(argv)
    t0 = time.time()
    if not a.report_only:
        run_all(a.threads, [x for x in a.only.split(",") if x])
    report("python bench/quality/architectures.py --threads 2")
    print(f"{(time.time() - t0) / 60:.1f} min")


if __name__ == "__main__":
    main()
