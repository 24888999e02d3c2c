"""RECE reference check: ConceptEdit's closed forms against the official RECE code on the same inputs.

The official code (CharlesGong12/RECE) is extracted from a local git copy into a temporary folder
(``git archive`` of the two files used; nothing is copied into this repository) and its functions
are imported and run on a tiny random-weight SD 1.x pipeline (``concept_edit.testing``), CPU,
float32 as published:

* ``utils/embedding_calculation/close_form_emb.py::close_form_emb_regzero`` (the official default,
  ``--emb_computing close_regzero``) and ``close_form_emb`` with ``old_target_concept`` (the
  "standard" regulariser) against :func:`concept_edit.solvers.rece.adversarial_embeddings`, on the
  UCE-edited weights ConceptEdit computes, over the concept's 77 token states (as the official code);
  ours both from the explicit weights and in the factored form the engine uses (W0 (I + D) Gram sums,
  float32 products);
* ``erase_methods/uce.py::edit_model_adversarial`` (one RECE round, technique "replace", retain
  texts [""]) against the accumulate step of :mod:`concept_edit.engines.rece` (``uce_solve`` on the
  adversarial rows, targets through the current weights).

Their package ``__init__`` files import the whole evaluation stack (pandas, NudeNet, Q16, ...), so
the two files are loaded on their own; ``embedding2img`` / ``setup_seed`` / ``pandas`` are given
stubs that fail if called (they are used only when saving images, which this check does not do).

    python bench/rece_reference.py [--rece-repo /work/.mirror/CharlesGong12+RECE/repo] [--concept cat]
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.machinery
import importlib.util
import io
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import torch

FILES = ("utils/embedding_calculation/close_form_emb.py", "erase_methods/uce.py")


def extract(repo: str, dest: Path) -> None:
    """``git -C repo archive HEAD FILES | tar -x -C dest``."""
    archive = subprocess.run(["git", "-C", repo, "archive", "HEAD", *FILES], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)


def _refuse(*a, **k):
    raise RuntimeError("not available in the reference check (image saving)")


def load_official(root: Path):
    """(close_form_emb module, uce module) imported from ``root`` without their packages' __init__."""
    import diffusers  # noqa: F401  (imported before the stub below is in place)

    if importlib.util.find_spec("pandas") is None:  # only used when saving
        stub = types.ModuleType("pandas")
        stub.__spec__ = importlib.machinery.ModuleSpec("pandas", None)
        stub.DataFrame = _refuse
        sys.modules["pandas"] = stub
    pkg = types.ModuleType("rece_reference_emb")
    pkg.__path__ = [str(root / "utils/embedding_calculation")]
    pkg.embedding2img, pkg.setup_seed = _refuse, _refuse
    sys.modules[pkg.__name__] = pkg
    mods = []
    for name, rel in ((f"{pkg.__name__}.close_form_emb", FILES[0]), ("rece_reference_uce", FILES[1])):
        spec = importlib.util.spec_from_file_location(name, root / rel)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
        mods.append(mod)
    return mods


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|."""
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max()).item()


def quiet(fn, *a, **k):
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*a, **k)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rece-repo", default="/work/.mirror/CharlesGong12+RECE/repo",
                    help="a git copy of CharlesGong12/RECE (read with git archive)")
    ap.add_argument("--concept", default="cat")
    ap.add_argument("--guide", default="", help="the erase guide (UCE target); '' as RECE's object/nudity scripts")
    ap.add_argument("--regs", default="1e-3,0.1", help="regular_scale values to compare")
    ap.add_argument("--family", default="sd1")
    ap.add_argument("--float64", action="store_true",
                    help="run the official functions in float64 too (pipelines and default dtype), to separate "
                         "float32 rounding from formula differences")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    from concept_edit.adapters.diffusers_model import DiffusersModel
    from concept_edit.core.plan import plan_from_dict
    from concept_edit.engines.uce import (
        edit_rows,
        key_spaces,
        preserve_keys,
        uce_delta,
    )
    from concept_edit.solvers.rece import (
        adversarial_embeddings,
        gram,
        rece_system,
        rece_system_factored,
    )
    from concept_edit.solvers.uce import uce_solve
    from concept_edit.testing.tiny_models import build_tiny_pipeline

    with tempfile.TemporaryDirectory(prefix="rece_ref_") as tmp:
        extract(args.rece_repo, Path(tmp))
        official_emb, official_uce = load_official(Path(tmp))

    orig = build_tiny_pipeline(args.family)
    if args.float64:
        orig = orig.to(torch.float64)
        torch.set_default_dtype(torch.float64)  # the official code's torch.eye / torch.zeros
    model = DiffusersModel(orig)
    plan = plan_from_dict({"edits": [{"erase": args.concept, "guide": args.guide}]})  # UCE defaults
    delta = uce_delta(model, plan, progress=False)
    edited = copy.deepcopy(orig)
    em = DiffusersModel(edited)
    with torch.no_grad():
        for n, W in em.cross_attention_weights().items():
            if n in delta.layers:
                W += delta.layers[n].dense().to(W.dtype)
    names = list(model.cross_attention_weights())
    print(f"tiny {args.family}: {len(names)} cross-attention projections, key width "
          f"{orig.text_encoder.config.hidden_size}; UCE erase {args.concept!r} -> {args.guide!r} (lambda 0.5); "
          f"official code in {'float64' if args.float64 else 'float32'}")

    W0 = {n: W.detach().clone() for n, W in model.cross_attention_weights().items()}
    We = {n: W.detach().clone() for n, W in em.cross_attention_weights().items()}
    explicit = rece_system([We[n] for n in names], [W0[n] for n in names])
    # the engine's factored form: W0 (I + left @ right), Gram sums of float32 products
    ((layers, (enc,)),) = key_spaces(model, plan).values()
    _, K, T, w, _ = edit_rows(model, plan, enc=enc)
    sol = uce_solve(K, T, preserve_keys(enc, plan), lam=0.5, erase_scale=w)
    A = torch.eye(K.shape[1], dtype=torch.float64) + sol.left @ sol.right
    kept = [W0[n] for n in names if n not in layers]
    Ge = gram([W0[n] for n in layers], compute_dtype=torch.float32)
    factored = rece_system_factored(Ge, gram(kept, compute_dtype=torch.float32) if kept else None, A)

    rows = []
    guide_emb = None
    for reg in [float(x) for x in args.regs.split(",")]:
        c, adv = quiet(official_emb.close_form_emb_regzero, edited, orig, args.concept, with_to_k=True,
                       save_path=None, regeular_scale=reg)
        ours_x, _ = adversarial_embeddings(explicit, c[0].detach(), lam=reg)
        ours_f, _ = adversarial_embeddings(factored, c[0].detach(), lam=reg)
        rows.append(("close_regzero (default)", reg, rel(ours_x, adv[0].detach()), rel(ours_f, adv[0].detach())))
        _, adv_s = quiet(official_emb.close_form_emb, edited, orig, args.concept, with_to_k=True, save_path=None,
                         old_target_concept=args.guide, regeular_scale=reg)
        with torch.no_grad():
            ids = orig.tokenizer(args.guide, padding="max_length", max_length=orig.tokenizer.model_max_length,
                                 truncation=True, return_tensors="pt").input_ids
            guide_emb = orig.text_encoder(ids)[0][0]
        ours_s, _ = adversarial_embeddings(explicit, c[0].detach(), lam=reg, reference=guide_emb)
        ours_sf, _ = adversarial_embeddings(factored, c[0].detach(), lam=reg, reference=guide_emb)
        rows.append(("close_standardreg", reg, rel(ours_s, adv_s[0].detach()), rel(ours_sf, adv_s[0].detach())))
    print("\nadversarial embedding (77 token states), max |ours - official| / max |official|:")
    print(f"{'official function':26} {'regular_scale':>13} {'ours explicit':>14} {'ours factored':>14}")
    for name, reg, a, b in rows:
        print(f"{name:26} {reg:13g} {a:14.2e} {b:14.2e}")

    # one RECE round (official train.py defaults: replace, lamb 0.1, erase 1, preserve 0.1, retain [""])
    adv_emb = adv[0].detach()
    with torch.no_grad():
        ids = orig.tokenizer([""], padding="max_length", max_length=orig.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        empty = orig.text_encoder(ids)[0][0]
    after = copy.deepcopy(edited)
    quiet(official_uce.edit_model_adversarial, after, [adv_emb], [guide_emb], [""], technique="replace",
          preserve_scale=0.1, erase_scale=1.0, lamb=0.1)
    Wa = {n: W.detach() for n, W in DiffusersModel(after).cross_attention_weights().items()}
    step = uce_solve(adv_emb, guide_emb, empty, lam=0.1, erase_scale=1.0, preserve_scale=0.1)
    worst, worst_w = 0.0, 0.0
    for n in names:
        Wc = We[n].double()
        ours = Wc @ step.left @ step.right
        off = Wa[n].double() - Wc
        worst = max(worst, ((ours - off).norm() / off.norm()).item())
        worst_w = max(worst_w, ((Wc + ours - Wa[n].double()).norm() / Wa[n].double().norm()).item())
    print(f"\none round (edit_model_adversarial vs the accumulate step), over {len(names)} projections:")
    print(f"  max relative difference of the change  {worst:.2e}")
    print(f"  max relative difference of the weights {worst_w:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
