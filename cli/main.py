"""concept-edit: edit, apply, export, info and demo from the command line.

The CLI only parses arguments and calls the library: everything it does is one function call away.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

SUBJECT_TEMPLATE = "a photo of {}"


def _load(args, *, lazy: bool = False):
    """(path, pipe, model). With ``lazy`` and a single-file model, only the text encoders are
    built and edited weights are read on demand (pipe is None): enough to compute or bake a delta."""
    import torch

    from ..adapters.bundled import default_model_path
    from ..adapters.diffusers_model import editable_model, load_pipeline

    path = args.model or default_model_path()
    autocast = torch.bfloat16 if getattr(args, "bf16", False) else None
    if lazy and Path(path).suffix.lower() == ".safetensors":
        from ..adapters.diffusers_model import ModelLoadError
        from ..adapters.single_file_model import SingleFileModel

        if not args.config:
            raise ModelLoadError(f"loading the single file {Path(path).name} needs --config DIR: a local diffusers "
                                 "folder of the same architecture; no model hub is reachable")
        index = Path(args.config) / "model_index.json"
        if index.exists() and json.loads(index.read_text()).get("_class_name") in ("FluxPipeline", "StableDiffusion3Pipeline"):
            from ..adapters.mmdit_single_file import MMDiTSingleFile

            return path, None, MMDiTSingleFile(path, args.config, autocast_dtype=autocast)
        return path, None, SingleFileModel(path, args.config, autocast_dtype=autocast)
    pipe = load_pipeline(path, config=args.config, allow_pickle=args.allow_pickle)
    return path, pipe, editable_model(pipe, autocast_dtype=autocast)


EDIT_FLAGS = ("erase", "erase_style", "replace", "moderate", "debias", "guide")
# CLI flag (argparse dest) -> plan key; given with --plan, these override the plan's values
SETTING_FLAGS = {"lam": "lambda", "token": "token", "layers": "layers"}
PLAN_FLAGS = {"preserve": "preserve", "template": "templates", "method": "method"}


def _set_values(items) -> dict:
    """--set KEY=VALUE pairs; VALUE is read as YAML (numbers, true/false, lists, null)."""
    import yaml

    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SystemExit(f"concept-edit: error: --set takes KEY=VALUE, got {item!r}")
        out[key.strip()] = yaml.safe_load(value) if value.strip() else ""
    return out


def _edits_from_flags(args) -> list[dict]:
    from ..core.plan import PlanError, split_quoted

    edits = [{"erase": c} for c in args.erase or []]
    edits += [{"erase": c, "type": "style"} for c in args.erase_style or []]
    for r in args.replace or []:
        if "=" not in r:
            raise PlanError(f"--replace takes SOURCE=DESTINATION, got {r!r}")
        s, d = r.split("=", 1)
        edits.append({"replace": s, "with": d})
    edits += [{"moderate": c} for c in args.moderate or []]
    for d in args.debias or []:
        parts = split_quoted(d, ":", unquote=False)
        if len(parts) not in (2, 3):
            raise PlanError(f"--debias takes CONCEPT:attr1,attr2[:alpha1,alpha2] (quote a name containing ':' or ','), got {d!r}")
        e = {"debias": split_quoted(parts[0])[0], "attributes": split_quoted(parts[1])}
        if len(parts) > 2:
            try:
                e["alphas"] = [float(x) for x in parts[2].split(",")]
            except ValueError:
                raise PlanError(f"--debias {d!r}: alphas must be numbers") from None
        edits.append(e)
    if args.guide is not None:
        for e in edits:
            if "erase" in e:
                e.pop("type", None)
                e["guide"] = args.guide
    return edits


def plan_dict_from_args(args) -> dict:
    """The edit-file mapping the flags describe. With --plan, the file is read and the setting flags
    (--method, --lambda, --token, --layers, --template, --preserve, --set) replace its values;
    edit flags (--erase…, --replace, --moderate, --debias, --guide) are refused: give edits in one place."""
    from ..core.plan import PlanError, read_plan_file

    given = {dest: getattr(args, dest) for dest in (*SETTING_FLAGS, *PLAN_FLAGS) if getattr(args, dest) is not None}
    sets = _set_values(args.set)
    if args.plan:
        used = [f"--{f.replace('_', '-')}" for f in EDIT_FLAGS if getattr(args, f)]
        if used:
            raise PlanError(f"{', '.join(used)} cannot be combined with --plan: list the edits in the plan file")
        d = read_plan_file(args.plan)
        if not isinstance(d, dict):
            raise PlanError(f"{args.plan}: an edit file is a mapping with an 'edits' list")
        d = dict(d)
    else:
        d = {"edits": _edits_from_flags(args)}
        if not d["edits"]:
            raise PlanError("nothing to edit: give --plan FILE or at least one of --erase, --erase-style, --replace, --moderate, --debias")
    options = dict(d.pop("options", None) or {})
    for dest, key in {**SETTING_FLAGS, **PLAN_FLAGS}.items():
        if dest in given:
            if key in SETTING_FLAGS.values():
                options.pop(key, None)
            d[key] = given[dest]
    for key, value in sets.items():
        d.pop(key, None)
        options[key] = value
    if options:
        d["options"] = options
    return d


def _plan_from_args(args):
    from ..core.plan import plan_from_dict

    return plan_from_dict(plan_dict_from_args(args))


def _preflight(args, *, suffixes: dict, inputs=()):
    """Refuse bad settings and unwritable outputs before any model is loaded or computed.
    ``suffixes`` maps an allowed lower-case output suffix to whether that output is a folder."""
    from ..core.apply import check_scale
    from ..core.atomic import check_not_inside, check_output
    from ..core.delta import check_rank
    from ..files.formats import check_delta_file

    out = Path(args.output)
    suffix = out.suffix.lower()
    if suffix not in suffixes:
        want = " or ".join(f"'{s}'" if s else "no suffix (a folder)" for s in suffixes)
        raise ValueError(f"output {out}: expected {want}, got {suffix!r}")
    if getattr(args, "scale", None) is not None:
        check_scale(args.scale)
    if getattr(args, "rank", None) is not None:
        check_rank(args.rank)
        if args.format == "diff":
            raise ValueError("--rank applies to LoRA files only; a --format diff file is always exact")
    for d in getattr(args, "delta", None) or []:
        check_delta_file(d)
    for src in [getattr(args, "model", None), getattr(args, "config", None), *inputs]:
        if src:
            check_not_inside(out, src)
    check_output(out, args.overwrite, directory=suffixes[suffix])
    return out


def _save(delta, out, fmt, rank, overwrite):
    from ..files.formats import save_diff, save_lora

    if fmt == "diff":
        save_diff(delta, out, overwrite=overwrite)
        return {}
    return save_lora(delta, out, rank=rank, overwrite=overwrite)


def cmd_edit(args):
    from ..engines.registry import compute_delta

    _preflight(args, suffixes={".safetensors": False})
    plan = _plan_from_args(args)
    # UCE, RECE and SPEED need only text encoders and the cross-attention weights; EMCID/null-space run the UNet.
    path, pipe, model = _load(args, lazy=plan.method in ("uce", "rece", "speed"))
    t0 = time.perf_counter()
    delta = compute_delta(model, plan)
    dt = time.perf_counter() - t0
    info = _save(delta, args.output, args.format, args.rank, args.overwrite)
    print(f"{len(plan.edits)} edit(s) on {path} [{model.family}] in {dt:.2f}s -> {args.output} "
          f"({len(delta.layers)} layers, rank <= {delta.max_rank})")
    if delta.metadata.get("ridge"):
        print(f"note: the edit system was ill-conditioned (condition ~{delta.metadata['condition']:.3g}); "
              f"regularized with ridge {delta.metadata['ridge']:.3g}")
    if info.get("max_rel_error"):
        print(f"rank {args.rank} truncation: max relative error {info['max_rel_error']:.3g}")


def _prompts(args, delta):
    if args.prompt:
        return args.prompt
    concepts = [e["source"] for e in delta.metadata.get("edits", [])] + delta.metadata.get("preserve", [])[:3]
    return [SUBJECT_TEMPLATE.format(c) for c in concepts]


def before_after(pipe, model, delta, prompts, *, scale=1.0, seed=0, steps=20, force=False):
    """(before images, after images) with identical seeds; the delta is removed afterwards."""
    from ..adapters.generate import generate
    from ..core.apply import apply_delta

    before = generate(pipe, prompts, seed=seed, steps=steps)
    handle = apply_delta(delta, model.weights(delta.layers), scale=scale, check_fingerprint=not force, model=model)
    try:
        after = generate(pipe, prompts, seed=seed, steps=steps)
    finally:
        handle.remove()
    return before, after


def _write_grid(prompts, before, after, out, overwrite):
    from ..adapters.generate import image_grid
    from ..core.atomic import atomic_path

    grid = image_grid([before, after], ["before", "after"], prompts)
    with atomic_path(out, overwrite) as tmp:
        grid.save(tmp, format="PNG")


def _load_deltas(paths, model, *, force=False):
    """One delta, or several stacked into one (their sum). Each is checked against the model on
    its own first (unless ``force``), so the error names the file that does not fit."""
    from ..core.apply import check_compatible
    from ..files.formats import load_delta

    known = model.all_weights()
    deltas = [load_delta(p, known_layers=known) for p in paths]
    for p, d in zip(paths, deltas):
        try:
            check_compatible(d, model.weights(d.layers), check_fingerprint=not force, model=model)
        except (ValueError, KeyError) as e:
            raise ValueError(f"{Path(p).name}: {e.args[0] if e.args else e}") from e
    delta = deltas[0]
    for d in deltas[1:]:
        delta = delta.stacked(d)
    return delta


def cmd_apply(args):
    _preflight(args, suffixes={".png": False})
    path, pipe, model = _load(args)
    delta = _load_deltas(args.delta, model, force=args.force)
    prompts = _prompts(args, delta)
    before, after = before_after(pipe, model, delta, prompts, scale=args.scale, seed=args.seed, steps=args.steps, force=args.force)
    _write_grid(prompts, before, after, args.output, args.overwrite)
    print(f"before/after grid for {len(prompts)} prompt(s) -> {args.output}")


def cmd_export(args):
    from ..files.export import export_diffusers, export_single_file

    out = _preflight(args, suffixes={".safetensors": False, "": True})
    single_out = out.suffix.lower() == ".safetensors"
    path, pipe, model = _load(args, lazy=single_out)
    delta = _load_deltas(args.delta, model, force=args.force)
    kw = dict(scale=args.scale, check_fingerprint=not args.force, overwrite=args.overwrite)
    if single_out:
        # From a single file: stream it, rewriting only edited tensors. From a folder: convert.
        source = None if Path(path).is_dir() else path
        export_single_file(source, pipe, model, delta, out, **kw)
    else:
        export_diffusers(pipe, model, delta, out, source=path, **kw)
    print(f"edited model -> {out}")


def cmd_info(args):
    from ..files.formats import load_delta, read_metadata

    meta = read_metadata(args.delta)
    delta = load_delta(args.delta) if meta else None
    out = {"metadata": meta}
    if delta:
        out["layers"] = {n: {"shape": list(ld.shape), "rank": ld.rank} for n, ld in delta.layers.items()}
    print(json.dumps(out, indent=2, default=str))


def cmd_demo(args):
    from ..adapters.bundled import default_demo_plan, default_model_path
    from ..core.plan import plan_from_dict
    from ..engines.registry import compute_delta
    from ..files.formats import save_lora

    args.model = args.model or str(default_model_path())
    path, pipe, model = _load(args)
    spec = default_demo_plan()
    prompts = spec.pop("demo_prompts", None)
    plan = plan_from_dict(spec)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    delta = compute_delta(model, plan)
    dt = time.perf_counter() - t0
    stamp = time.strftime("%Y%m%d-%H%M%S")
    delta_path = out / f"demo-{stamp}.safetensors"
    save_lora(delta, delta_path)
    prompts = prompts or [SUBJECT_TEMPLATE.format(e.source) for e in plan.edits] + [SUBJECT_TEMPLATE.format(c) for c in plan.preserve]
    before, after = before_after(pipe, model, delta, prompts, seed=args.seed, steps=args.steps)
    grid_path = out / f"demo-{stamp}.png"
    _write_grid(prompts, before, after, grid_path, False)
    print(f"model: {path} [{model.family}]")
    print(f"edited {len(plan.edits)} concept(s) in {dt:.2f}s: " + ", ".join(f"{e.kind} {e.source!r}" for e in plan.edits))
    print(f"delta -> {delta_path}\nbefore/after grid -> {grid_path}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="concept-edit", description="Closed-form concept editing for diffusion models")
    sub = p.add_subparsers(dest="command", required=True)

    def model_args(sp):
        sp.add_argument("--model", help="diffusers folder or single .safetensors (default: the bundled model)")
        sp.add_argument("--config", help="local diffusers folder with the configs for a single-file model")
        sp.add_argument("--allow-pickle", action="store_true", help="allow loading pickled .ckpt/.pt checkpoints")

    e = sub.add_parser("edit", help="compute an edit and save it as a delta file")
    model_args(e)
    e.add_argument("--plan", help="YAML/JSON edit file listing many concepts")
    e.add_argument("--erase", action="append", help="object concept to erase (guide: '')")
    e.add_argument("--erase-style", action="append", help="style concept to erase (guide: 'art')")
    e.add_argument("--guide", help="override the erase guide concept")
    e.add_argument("--replace", action="append", help="SOURCE=DESTINATION")
    e.add_argument("--moderate", action="append", help="concept to move towards the unconditional output")
    e.add_argument("--debias", action="append",
                   help='CONCEPT:attr1,attr2[:alpha1,alpha2]; quote a name containing ":" or "," (\'"16:9 photo":a,b\')')
    e.add_argument("--preserve", action="append", help="concept to keep unchanged (repeatable; with --plan: replaces its list)")
    e.add_argument("--method", help="uce (default), rece, speed, emcid, nullspace or emcid+uce")
    e.add_argument("--lambda", dest="lam", type=float, help="the method's lambda (UCE default 0.5, nullspace 1.0)")
    e.add_argument("--token", choices=["last", "aligned", "all"], help="key tokens (default last; all: T5 keys of FLUX/SD3)")
    e.add_argument("--layers", help="layers to edit: kv | v (cross-attention) or text-encoder layers such as 0-2")
    e.add_argument("--template", action="append", help="prompt template with {} (repeatable; default '{}')")
    e.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="any setting of the method (repeatable), e.g. --set alpha=0.3 --set cov_weight=1000; "
                        "see docs/settings.md")
    e.add_argument("--rank", type=int, help="cap the LoRA rank (SVD-truncated, error recorded)")
    e.add_argument("--format", choices=["lora", "diff"], default="lora")
    e.add_argument("--bf16", action="store_true", help="encode prompts under bfloat16 autocast (faster)")
    e.add_argument("-o", "--output", required=True)
    e.add_argument("--overwrite", action="store_true")
    e.set_defaults(func=cmd_edit)

    a = sub.add_parser("apply", help="generate before/after images with a delta applied")
    model_args(a)
    a.add_argument("delta", nargs="+", help="delta file(s); several are applied together")
    a.add_argument("--prompt", action="append")
    a.add_argument("--scale", type=float, default=1.0)
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--steps", type=int, default=20)
    a.add_argument("--force", action="store_true", help="apply even if the delta was made for another model")
    a.add_argument("-o", "--output", required=True)
    a.add_argument("--overwrite", action="store_true")
    a.set_defaults(func=cmd_apply)

    x = sub.add_parser("export", help="bake a delta into a new model (diffusers folder or single file)")
    model_args(x)
    x.add_argument("delta", nargs="+", help="delta file(s); several are baked in together")
    x.add_argument("--scale", type=float, default=1.0)
    x.add_argument("--force", action="store_true")
    x.add_argument("-o", "--output", required=True)
    x.add_argument("--overwrite", action="store_true")
    x.set_defaults(func=cmd_export)

    i = sub.add_parser("info", help="print a delta file's metadata")
    i.add_argument("delta")
    i.set_defaults(func=cmd_info)

    d = sub.add_parser("demo", help="edit the bundled model, write the delta and a before/after grid")
    model_args(d)
    d.add_argument("-o", "--output", default="out/demo")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--steps", type=int, default=20)
    d.set_defaults(func=cmd_demo)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, OSError, KeyError) as e:
        # Bad input (files, settings, paths): one line naming the problem, no traceback. Outputs are
        # written atomically, so nothing was written.
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"concept-edit: error: {msg}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
