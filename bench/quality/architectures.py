"""UCE on both testbeds side by side: the SD-shaped UNet model (cross-attention to_k/to_v) and the
FLUX-shaped model (context embedder + pooled-text embedder), same world, edits, seeds and classifier.

    python bench/quality/architectures.py --threads 2      # runs both, writes bench/quality/architectures/

Three runs of ``run.py`` (each kept in its own folder with its own README): UCE with its defaults on
the UNet model and on the FLUX model (every task), and on the FLUX model the key-token and
text-reader variants (erase at 10 and 100 edits). This script then writes the
side-by-side table and plot. ``--report-only`` rebuilds them from the saved results.
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
    # debiasing fits its alphas by generating images in a loop: on the FLUX model (true CFG, two
    # transformer passes per step) that is the slowest task; it runs on its own
    "flux_debias": ["--arch", "flux", "--methods", "uce", "--tasks", "debias"],
    "flux_variants": ["--arch", "flux", "--tasks", "erase", "--counts", "10,100",
                      "--methods", "uce:token=aligned,uce:token=all,uce:readers=context,uce:readers=pooled"],
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


def report(cmd: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = {k: json.loads((OUT / k / "results.json").read_text()) for k in RUNS if (OUT / k / "results.json").exists()}
    u, f = res.get("unet", {}), res.get("flux", {})
    meta = {k: json.loads((HERE.parents[1] / "testbed" / "assets" / m).read_text())
            for k, m in (("unet", "testbed.json"), ("flux", "flux_testbed.json"))
            if (HERE.parents[1] / "testbed" / "assets" / m).exists()}
    acc = {k: m["evaluation"]["head_train_templates"]["top1"] for k, m in meta.items()}
    lines = ["# UCE on the UNet and the FLUX testbed", "",
             f"Reproduce: `{cmd}` ({sum(r.get('seconds', 0) for r in res.values()) / 60:.0f} min on 2 CPU cores).", "",
             "Conditions: UCE with its defaults (lambda 0.5, last subject token, preserve set of 100 unedited objects, "
             "templates `{}`, `a photo of a {}`, `a painting of a {}`); the same edits, evaluation prompts, seeds and "
             f"classifier on both models. {N_EVAL} evaluated sources and {N_EVAL} holdout objects (never edited or "
             "preserved), one image each; ± is a 95% confidence interval over concepts. SF/S2D/HD on a held-out "
             "paraphrase template (`the image of the {}`); style rates on 6 holdout artists. "
             + (f"Unedited top-1: UNet {acc.get('unet', 0):.0%}, FLUX {acc.get('flux', 0):.0%} (training templates)."
                if acc else ""), "",
             "UNet: cross-attention `to_k`/`to_v` of 7 blocks. FLUX: `context_embedder` (T5 token states) and "
             "`time_text_embed.text_embedder.linear_1` (pooled CLIP vector).", "",
             "## Replace and erase", "",
             "| task | edits | SF para UNet | SF para FLUX | S2D para UNet | S2D para FLUX | HD UNet | HD FLUX |",
             "|---|---|---|---|---|---|---|---|"]
    for task in ("replace", "erase"):
        ru, rf = _rows(u, task), _rows(f, task)
        for n in sorted(set(ru) | set(rf)):
            a, b = ru.get(n), rf.get(n)
            lines.append(f"| {task} | {n} | {_v(a, 'SF_para')} | {_v(b, 'SF_para')} | {_v(a, 'S2D_para')} | "
                         f"{_v(b, 'S2D_para')} | {_v(a, 'HD')} | {_v(b, 'HD')} |")
    lines += ["", "## Styles, rectification, debiasing", "",
              "| task | n | UNet | FLUX |", "|---|---|---|---|"]
    su = {r["n"]: r for r in u.get("style", {}).get("uce", []) if "error" not in r}
    sf = {r["n"]: r for r in f.get("style", {}).get("uce", []) if "error" not in r}
    for n in sorted(set(su) | set(sf)):
        g = lambda r: "" if r is None else (f"erased {r['erasure_rate']:.2f} (drawn before {r['style_rate_before']:.2f}); "  # noqa: E731
                                            f"holdout {r['holdout_style_before']:.2f} -> {r['holdout_style_after']:.2f}")
        lines.append(f"| style erasure | {n} artists | {g(su.get(n))} | {g(sf.get(n))} |")
    for name, r in (("rectification S2D (20 rare aliases)", "rectify"),):
        a, b = u.get(r, {}).get("uce", {}), f.get(r, {}).get("uce", {})
        h = lambda x: "" if not x or "error" in x else f"{x['S2D']:+.2f} (p {x['p_before']:.2f} -> {x['p_after']:.2f}), HD {x['HD']:+.2f}"  # noqa: E731
        lines.append(f"| {name} | {a.get('n', '')} | {h(a)} | {h(b)} |")
    du, df = u.get("debias"), f.get("debias") or res.get("flux_debias", {}).get("debias")
    d = lambda x: "" if not x else f"dp {x['dp_before']:.2f} -> {x['dp_after']:.2f}"  # noqa: E731
    lines.append(f"| debias (10 professions, 50/50 crowned) | 10 | {d(du)} | {d(df)} |")
    v = res.get("flux_variants", {})
    if v:
        lines += ["", "## FLUX: which keys, which readers (UCE otherwise at its defaults)", "",
                  "T5 is bidirectional: every token's state depends on the subject. `last`: the last subject token "
                  "(default); `aligned`: UCE's original choice, every row from the subject token through the padding, "
                  "source and destination aligned; `all`: aligned plus the template's tokens before the subject. "
                  "`readers=context`/`pooled`: only one of the two text readers is edited.", "",
                  "| variant | task | edits | SF para | S2D para | HD | edit s |", "|---|---|---|---|---|---|---|"]
        variants = [("uce (last, both readers)", f, "uce")] + [(m, v, m) for m in v.get("erase", {})]
        for label, src, m in variants:
            for task in ("erase",):
                for n, r in sorted(_rows(src, task, m).items()):
                    if n in (10, 100):
                        lines.append(f"| {label} | {task} | {n} | {_v(r, 'SF_para')} | {_v(r, 'S2D_para')} | "
                                     f"{_v(r, 'HD')} | {r['edit_seconds']} |")
    lines += ["", "![UNet vs FLUX](architectures.png)", ""]
    (OUT / "README.md").write_text("\n".join(lines))

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for arch, r, style in (("UNet", u, "-"), ("FLUX", f, "--")):
        for task, colour in (("replace", "C0"), ("erase", "C1")):
            rows = _rows(r, task)
            if not rows:
                continue
            x = sorted(rows)
            for ax, k in zip(axes, ("SF_para", "S2D_para", "HD")):
                y = [rows[n].get(k) for n in x]
                if all(val is not None for val in y):
                    e = [rows[n].get(k + "_ci") or 0 for n in x]
                    ax.errorbar(x, y, yerr=e, ls=style, color=colour, marker="o", capsize=3, label=f"{arch} {task}")
    for ax, t in zip(axes, ["Source Forget (paraphrase)", "Source2Dest (paraphrase)", "Holdout Delta"]):
        ax.set_xscale("log"); ax.set_title(t); ax.set_xlabel("simultaneous edits"); ax.grid(alpha=0.3)
    axes[2].legend(fontsize=8)
    fig.suptitle("UCE: UNet testbed (solid) vs FLUX testbed (dashed), 95% CIs", fontsize=10)
    fig.tight_layout()
    fig.savefig(OUT / "architectures.png", dpi=110)
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
