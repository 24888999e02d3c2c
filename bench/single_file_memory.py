"""Peak memory of editing an original-layout single file lazily vs loading the whole pipeline.

Writes a random-weight single file of the real SDXL (or SD1.5) shapes (configs from
bench/configs/), then measures, each in a fresh subprocess, peak RSS (ru_maxrss) of:

  imports   python + torch + diffusers + transformers + concept_edit imported, nothing loaded
  te        SingleFileModel(path, config): the text encoder(s) built from the file, nothing else
  edit      SingleFileModel + a UCE edit of N concepts (reads the cross-attention to_k/to_v)
  export    the edit above, then export_single_file(...) streaming the baked copy to disk
  full      load_pipeline(path, config=...) (diffusers' from_single_file; dtype --full-dtype)

Results go to a markdown table (bench/single_file_memory.md by default). Nothing is
downloaded. Big files go to --work (default /work/tmp/single_file_bench), never the repo.

    .venv/bin/python bench/single_file_memory.py --family sdxl
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CONFIGS = HERE / "configs"
FAMILIES = {
    "sdxl": {
        "pipeline": "StableDiffusionXLPipeline",
        "unet": "sdxl_unet", "vae": "sdxl_vae",
        "text_encoder": ("sdxl_text_encoder", "CLIPTextModel", "<|endoftext|>"),
        "text_encoder_2": ("sdxl_text_encoder_2", "CLIPTextModelWithProjection", "!"),
        "scheduler": ("EulerDiscreteScheduler", {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
                                                 "steps_offset": 1, "timestep_spacing": "leading", "num_train_timesteps": 1000}),
    },
    "sd15": {
        "pipeline": "StableDiffusionPipeline",
        "unet": "sd15_unet", "vae": "sd15_vae",
        "text_encoder": ("sd15_text_encoder", "CLIPTextModel", "<|endoftext|>"),
        "scheduler": ("DDIMScheduler", {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
                                        "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1}),
    },
}
CONCEPTS = ["cat", "dog", "horse", "Van Gogh", "Picasso", "car", "tree", "house", "bird", "guitar",
            "boat", "apple", "lion", "castle", "robot", "flower"]


def _json(name: str) -> dict:
    return {k: v for k, v in json.loads((CONFIGS / f"{name}.json").read_text()).items() if k != "_source"}


def write_config_folder(family: str, out: Path) -> Path:
    """A local diffusers folder with configs and tokenizers only (no weights)."""
    from concept_edit.testing.tokenizer_files import write_clip_tokenizer

    spec = FAMILIES[family]
    out.mkdir(parents=True, exist_ok=True)
    index = {"_class_name": spec["pipeline"], "_diffusers_version": "0.42.1",
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
             "scheduler": ["diffusers", spec["scheduler"][0]]}
    for comp, tok in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")):
        if comp not in spec:
            continue
        name, cls, pad = spec[comp]
        index[comp] = ["transformers", cls]
        index[tok] = ["transformers", "CLIPTokenizer"]
        (out / comp).mkdir(exist_ok=True)
        (out / comp / "config.json").write_text(json.dumps(_json(name), indent=1))
        write_clip_tokenizer(out / tok, pad_token=pad)
    if family == "sdxl":
        index.update(force_zeros_for_empty_prompt=True, image_encoder=[None, None], feature_extractor=[None, None])
    else:
        index.update(safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False,
                     image_encoder=[None, None])
    for comp in ("unet", "vae"):
        (out / comp).mkdir(exist_ok=True)
        (out / comp / "config.json").write_text(json.dumps(_json(spec[comp]), indent=1))
    (out / "scheduler").mkdir(exist_ok=True)
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps({"_class_name": spec["scheduler"][0], **spec["scheduler"][1]}))
    (out / "model_index.json").write_text(json.dumps(index, indent=1))
    return out


def write_random_single_file(config: Path, path: Path, dtype: str = "float16", seed: int = 0) -> dict:
    """Random weights of the configs' shapes in the original layout, one tensor at a time."""
    import torch
    from concept_edit.adapters.base import canonical_text_path
    from concept_edit.adapters.ldm_keymap import (
        TEXT_ENCODERS,
        configs_and_modules,
        entries_for,
    )
    from concept_edit.adapters.safetensors_stream import (
        DTYPE_NAMES,
        tensor_bytes,
        write_stream,
    )

    dt = getattr(torch, dtype)
    cfgs, mods = configs_and_modules(config)
    canon = {}
    for comp, m in mods.items():
        for k, v in m.state_dict().items():
            canon[f"{comp}.{canonical_text_path(k) if comp in TEXT_ENCODERS else k}"] = v
    entries = entries_for(config)
    shapes = {e.key: tuple(e.combine([canon[p] for p in e.parts]).shape) for e in entries}
    g = torch.Generator().manual_seed(seed)
    specs = [(k, DTYPE_NAMES[dt], list(s)) for k, s in shapes.items()]

    def emit(key, f):
        shape = shapes[key]
        if len(shape) == 1:  # norms and biases: the usual initialisation keeps activations sane
            t = torch.ones(shape) if key.endswith("weight") else torch.zeros(shape)
        else:
            t = torch.randn(shape, generator=g).mul_(0.02)
        f.write(tensor_bytes(t.to(dt)))

    t0 = time.perf_counter()
    write_stream(path, specs, emit, metadata={"format": "pt", "note": "random weights, ConceptEdit memory bench"})
    return {"tensors": len(specs), "bytes": path.stat().st_size, "seconds": time.perf_counter() - t0}


# -- child processes -----------------------------------------------------------------------------
def child(mode: str, path: str, config: str, n: int, out: str | None, full_dtype: str) -> dict:
    import torch

    torch.set_num_threads(2)
    t0 = time.perf_counter()
    res: dict = {}
    import diffusers  # noqa: F401  (same import baseline in every mode)
    import transformers  # noqa: F401
    from concept_edit.adapters.diffusers_model import load_pipeline
    from concept_edit.adapters.single_file_model import SingleFileModel
    from concept_edit.core.plan import plan_from_dict
    from concept_edit.engines.uce import uce_delta
    from concept_edit.files.export import export_single_file

    if mode == "te":
        m = SingleFileModel(path, config)
        res["held_gb"] = m.loaded_bytes() / 1e9
    elif mode in ("edit", "export"):
        m = SingleFileModel(path, config)
        plan = plan_from_dict({"edits": [{"erase": c} for c in CONCEPTS[:n]], "preserve": CONCEPTS[n:n + 4]})
        t1 = time.perf_counter()
        delta = uce_delta(m, plan, progress=False)
        res["edit_s"] = time.perf_counter() - t1
        res["layers"] = len(delta.layers)
        res["held_gb"] = m.loaded_bytes() / 1e9
        if mode == "export":
            t1 = time.perf_counter()
            export_single_file(path, None, m, delta, out, overwrite=True)
            res["export_s"] = time.perf_counter() - t1
    elif mode == "full":
        pipe = load_pipeline(path, config=config, dtype=getattr(torch, full_dtype))
        tensors = [t for c in ("unet", "vae", "text_encoder", "text_encoder_2") if getattr(pipe, c, None) is not None
                   for t in getattr(pipe, c).state_dict().values()]
        res["held_gb"] = sum(t.numel() * t.element_size() for t in tensors) / 1e9
        # tensors diffusers did not cast may still be lazily mapped from the file; touch every
        # page, as the first generation would, so RSS shows the pipeline resident
        with torch.no_grad():
            for t in tensors:
                t.sum()
    res["seconds"] = time.perf_counter() - t0
    res["maxrss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    return res


def run_child(args, mode: str, cap_gb: float) -> dict:
    """Run one measurement in a fresh interpreter; kill it if its RSS passes ``cap_gb``."""
    import psutil

    cmd = [sys.executable, __file__, "--child", mode, "--path", str(args.path), "--config", str(args.config_dir),
           "--concepts", str(args.concepts), "--full-dtype", args.full_dtype, "--export-out", str(args.export_out)]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc = psutil.Process(p.pid)
    peak = 0.0
    while p.poll() is None:
        try:
            rss = proc.memory_info().rss / 1e9
        except psutil.Error:
            break
        peak = max(peak, rss)
        if rss > cap_gb:
            p.kill()
            p.wait()
            return {"mode": mode, "killed": True, "maxrss_gb": rss, "note": f"killed at {rss:.1f} GB RSS (cap {cap_gb:.1f} GB)"}
        time.sleep(0.2)
    out, err = p.communicate()
    if p.returncode != 0:
        return {"mode": mode, "failed": True, "note": err.strip().splitlines()[-1] if err.strip() else f"exit {p.returncode}"}
    res = json.loads(out.strip().splitlines()[-1])
    res["mode"] = mode
    return res


DESCR = {
    "imports": "imports only (python, torch, diffusers, transformers, concept_edit)",
    "te": "text encoder(s) alone: `SingleFileModel(file, config)`",
    "edit": "edit {n} concepts through `SingleFileModel` (UCE, reads cross-attn to_k/to_v)",
    "export": "edit {n} concepts + `export_single_file` streaming bake",
    "full": "full pipeline: `load_pipeline(file, config=...)` ({dt}, every tensor touched)",
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", choices=sorted(FAMILIES), default="sdxl")
    ap.add_argument("--work", default="/work/tmp/single_file_bench")
    ap.add_argument("--dtype", default="float16", help="dtype of the written file")
    ap.add_argument("--concepts", type=int, default=10)
    ap.add_argument("--modes", default="imports,te,edit,export,full")
    ap.add_argument("--full-dtype", default="float16", help="dtype load_pipeline loads the full pipeline in")
    ap.add_argument("--cap-gb", type=float, default=None, help="kill a measurement above this RSS "
                    "(default: MemAvailable - 3 GB, so a shared machine is never pushed into OOM)")
    ap.add_argument("--keep", action="store_true", help="keep the multi-GB files in --work")
    ap.add_argument("--md", default=str(HERE / "single_file_memory.md"))
    ap.add_argument("--append", action="store_true", help="append to --md instead of replacing it")
    ap.add_argument("--child")
    ap.add_argument("--path")
    ap.add_argument("--config", dest="config_dir")
    ap.add_argument("--export-out")
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.path, args.config_dir, args.concepts, args.export_out, args.full_dtype)))
        return 0

    import psutil

    work = Path(args.work) / args.family
    if str(work.resolve()).startswith(str(HERE.parent.resolve())):
        raise SystemExit("--work must be outside the repository")
    work.mkdir(parents=True, exist_ok=True)
    args.config_dir = write_config_folder(args.family, work / "config")
    args.path = work / f"{args.family}_random.safetensors"
    args.export_out = work / f"{args.family}_edited.safetensors"
    free = shutil.disk_usage(work).free
    if not args.path.exists():
        print(f"writing {args.path} ({free / 1e9:.0f} GB free)", flush=True)
        info = write_random_single_file(args.config_dir, args.path, args.dtype)
        print(f"  {info['tensors']} tensors, {info['bytes'] / 1e9:.2f} GB in {info['seconds']:.0f} s", flush=True)
    size = args.path.stat().st_size
    rows = []
    for mode in args.modes.split(","):
        if mode == "export" and shutil.disk_usage(work).free < size + (5 << 30):
            rows.append({"mode": mode, "note": "skipped: not enough disk for the baked copy"})
            continue
        cap = args.cap_gb or (psutil.virtual_memory().available / 1e9 - 3.0)
        print(f"measuring {mode} (cap {cap:.1f} GB)...", flush=True)
        r = run_child(args, mode, cap)
        print("  ", json.dumps(r), flush=True)
        rows.append(r)
    if not args.keep:
        for p in (args.path, args.export_out):
            Path(p).unlink(missing_ok=True)

    cmd = "`.venv/bin/python bench/single_file_memory.py " + " ".join(argv if argv is not None else sys.argv[1:]) + "`"
    lines = [
        f"## {args.family}: {size / 1e9:.2f} GB single file ({args.dtype}), {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        "",
        f"Command: {cmd}",
        "",
        "| measurement | peak RSS (GB) | tensors held (GB) | wall time (s) | notes |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        d = DESCR.get(r["mode"], r["mode"]).format(n=args.concepts, dt=args.full_dtype)
        notes = r.get("note", "")
        if "edit_s" in r:
            notes = f"edit {r['edit_s']:.1f} s, {r['layers']} layers" + (f", export {r['export_s']:.1f} s" if "export_s" in r else "")
        rss = f"{r['maxrss_gb']:.2f}" if "maxrss_gb" in r else "-"
        held = f"{r['held_gb']:.2f}" if "held_gb" in r else "-"
        secs = f"{r['seconds']:.0f}" if "seconds" in r else "-"
        lines.append(f"| {d} | {rss} | {held} | {secs} | {notes} |")
    lines.append("")
    md = Path(args.md)
    text = "\n".join(lines) + "\n"
    if args.append and md.exists():
        text = md.read_text() + "\n" + text
    md.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
