"""UCE speed / peak-memory benchmark: ConceptEdit's factored UCE vs UCE's published per-layer loop.

At SD 1.5 and SDXL sizes (real configs in ``bench/configs/``, random weights, nothing downloaded)
this times, for N = 1, 10, 100, 1000 erased concepts (+ N preserved concepts, guide ""):

* ``floor32`` / ``floor16``  the floor: one forward of the text encoder(s) over the distinct
  prompts at their real length (float32 / bfloat16 autocast). Tokenisation is not timed.
* ``ce32`` / ``ce16``        ``concept_edit.engines.uce.uce_delta`` end to end (float32 keys /
  ``DiffusersModel(autocast_dtype=torch.bfloat16)``), last-token keys.
* ``ref``                    a re-implementation of the loop of UCE's published ``UCE()``
  function (rohitgandikota/unified-concept-editing, trainscripts/uce_sd_erase.py): every
  distinct prompt encoded once with ``pipe.encode_prompt`` (batch 1, padded to 77 tokens), the
  guide/preserve outputs of every original to_k/to_v module, then per layer
  mat1 = lam W0 + sum v* c^T, mat2 = lam I + sum c c^T (one rank-1 update per concept) and
  W = mat1 @ torch.inverse(mat2).

Every (model, N, variant) runs in a fresh subprocess; peak memory is the process's VmHWM over
the measured call (reset through /proc/self/clear_refs after the model is built), reported
in MB together with the resident size before the call.

The UNet is built on the meta device and only its cross-attention to_k/to_v weights are
materialised (the only UNet weights either method reads); text encoders are complete.

    .venv/bin/python bench/uce_speed.py                 # full run (~30-45 min on 2 cores)
    .venv/bin/python bench/uce_speed.py --quick         # tiny pipelines, seconds, in-process
    .venv/bin/python bench/uce_speed.py --models sd15 --n 1,10 --variants floor32,ce32,ref
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
CONFIGS = HERE / "configs"
MODELS = ("sd15", "sdxl", "tiny-sd1", "tiny-sdxl")
VARIANTS = ("floor32", "floor16", "ce32", "ce16", "ref")
LAM, ERASE_SCALE, PRESERVE_SCALE = 0.5, 1.0, 1.0
# The published loop is O(N x layers) rank-1 updates plus 77-token batch-1 encodes: beyond
# these N it is not run but extrapolated linearly in N from its largest measured N (labelled).
REF_MAX_N = {"sd15": 100, "sdxl": 10}


# ----------------------------------------------------------------------------- memory
def _status(field: str) -> float:
    """A VmXXX field of /proc/self/status in MB (NaN where unavailable)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False if not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_mb() -> float:
    hwm = _status("VmHWM")
    if math.isnan(hwm):
        import resource

        hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return hwm


# ----------------------------------------------------------------------------- models
def weight_cache_dir() -> Path:
    return Path(os.environ.get("UCE_BENCH_CACHE", Path(tempfile.gettempdir()) / "uce_bench_weights"))


def _init_text_encoder(cls, cfg_path: Path, gen: torch.Generator, seed: int = 0):
    """Real config, random weights: N(0, 0.02) matrices/embeddings, identity LayerNorms.

    Built on the meta device and filled directly (transformers' own random init of the
    695M-parameter SDXL encoder takes 30-40 s per process here); the filled weights are cached
    as safetensors (``$UCE_BENCH_CACHE``, default a temp dir) so every worker process loads
    identical weights in seconds.
    """
    from accelerate import init_empty_weights
    from safetensors.torch import load_file, save_file
    from transformers import CLIPTextConfig

    d = {k: v for k, v in json.loads(cfg_path.read_text()).items() if not k.startswith("_") and k != "torch_dtype"}
    cfg = CLIPTextConfig.from_dict(d)
    with init_empty_weights():
        model = cls(cfg)
    cache = weight_cache_dir() / f"{cfg_path.stem}_seed{seed}.safetensors"
    if cache.exists():
        sd = load_file(str(cache))
        for name, p in list(model.named_parameters()):
            mod = model.get_submodule(name.rpartition(".")[0])
            mod._parameters[name.rpartition(".")[2]] = torch.nn.Parameter(sd.pop(name))
        return model.eval()
    for name, p in list(model.named_parameters()):
        mod = model.get_submodule(name.rpartition(".")[0])
        leaf = name.rpartition(".")[2]
        if "norm" in name:
            v = torch.ones(p.shape) if leaf == "weight" else torch.zeros(p.shape)
        elif leaf == "bias":
            v = torch.zeros(p.shape)
        else:
            v = torch.empty(p.shape).normal_(0.0, 0.02, generator=gen)
        # requires_grad=True as from_pretrained leaves it: autocast caches its bf16 weight casts
        # only for leaves that require grad, so this matters for the bf16 timings.
        mod._parameters[leaf] = torch.nn.Parameter(v)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(f".{os.getpid()}.tmp")
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items() if k in dict(model.named_parameters())}, str(tmp))
    tmp.replace(cache)
    return model.eval()


def _meta_unet(cfg_path: Path, gen: torch.Generator):
    """The UNet on the meta device with only attn2.to_k / attn2.to_v materialised (random)."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    cfg = {k: v for k, v in json.loads(cfg_path.read_text()).items() if k != "_source"}
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(cfg)
    for name, mod in unet.named_modules():
        if name.endswith(("attn2.to_k", "attn2.to_v")):
            out, inn = mod.weight.shape
            w = torch.empty(out, inn).normal_(0.0, inn**-0.5, generator=gen)
            mod._parameters["weight"] = torch.nn.Parameter(w)
    return unet


def _tiny_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(8,), in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=8, sample_size=8,
    )


def build_pipeline(name: str, seed: int = 0, unet_only: bool = False):
    """A real StableDiffusion(XL)Pipeline object at the named size (vae tiny and unused)."""
    from concept_edit.testing.tokenizer_files import clip_tokenizer_dir
    from diffusers import (
        EulerDiscreteScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    if name.startswith("tiny-"):
        from concept_edit.testing.tiny_models import build_tiny_pipeline

        pipe = build_tiny_pipeline(name.split("-", 1)[1], seed=seed)
        return pipe
    gen = torch.Generator().manual_seed(seed)
    unet = _meta_unet(CONFIGS / f"{name}_unet.json", gen)
    if unet_only:
        return unet
    tok = CLIPTokenizer.from_pretrained(str(clip_tokenizer_dir()))
    sched = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1)
    if name == "sd15":
        te = _init_text_encoder(CLIPTextModel, CONFIGS / "sd15_text_encoder.json", gen, seed)
        return StableDiffusionPipeline(
            vae=_tiny_vae(), text_encoder=te, tokenizer=tok, unet=unet, scheduler=sched,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
    te1 = _init_text_encoder(CLIPTextModel, CONFIGS / "sdxl_text_encoder.json", gen, seed)
    te2 = _init_text_encoder(CLIPTextModelWithProjection, CONFIGS / "sdxl_text_encoder_2.json", gen, seed)
    tok2 = CLIPTokenizer.from_pretrained(str(clip_tokenizer_dir(pad_token="!")))
    return StableDiffusionXLPipeline(
        vae=_tiny_vae(), text_encoder=te1, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok2, unet=unet,
        scheduler=sched, force_zeros_for_empty_prompt=True, add_watermarker=False,
    )


def edit_layer_weights(unet) -> dict[str, torch.Tensor]:
    return {f"unet.{n}": m.weight.detach() for n, m in unet.named_modules() if n.endswith(("attn2.to_k", "attn2.to_v"))}


# ----------------------------------------------------------------------------- prompts
_ON = ["", "b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "st", "tr", "sh", "ch"]
_NU = ["a", "e", "i", "o", "u", "ai", "ou", "ia", "ei"]
_CO = ["", "", "", "n", "r", "s", "l", "x", "m"]


def concept_names(n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """2n distinct artist-like pseudo-names ("Borel Tavini"), realistic lengths (2-7 CLIP tokens).

    The first n are erased, the other n preserved.
    """
    rng = random.Random(seed)
    seen: set[str] = set()
    out: list[str] = []
    while len(out) < 2 * n:
        words = []
        for _ in range(rng.choice([1, 2, 2, 2, 3])):
            w = "".join(rng.choice(_ON) + rng.choice(_NU) + rng.choice(_CO) for _ in range(rng.choice([2, 2, 3])))
            words.append(w.capitalize())
        name = " ".join(words)
        if name.lower() not in seen:
            seen.add(name.lower())
            out.append(name)
    return out[:n], out[n:]


def make_plan(edits: list[str], preserves: list[str]):
    from concept_edit.core.plan import plan_from_dict

    return plan_from_dict({
        "edits": [{"erase": e, "guide": ""} for e in edits],
        "preserve": preserves,
        "lambda": LAM, "erase_scale": ERASE_SCALE, "preserve_scale": PRESERVE_SCALE,
        "token": "last", "templates": ["{}"],
        # the published function does not add the unconditional "" as a preserve concept
        "preserve_empty": False,
    })


# ----------------------------------------------------------------------------- floor
def _encoder_states(pipe, ids: torch.Tensor) -> torch.Tensor:
    """What the pipeline's encode_prompt computes, on exactly these ids."""
    te2 = getattr(pipe, "text_encoder_2", None)
    if te2 is None:
        return pipe.text_encoder(ids)[0]
    a = pipe.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
    b = te2(ids, output_hidden_states=True).hidden_states[-2]
    return torch.cat([a, b], dim=-1)


def floor_sequences(pipe, edits, preserves) -> list[list[int]]:
    """The distinct id sequences a last-token edit needs: BOS + concept tokens (BOS for "")."""
    tok = pipe.tokenizer
    seqs = {(tok.bos_token_id,)}
    for t in edits + preserves:
        seqs.add((tok.bos_token_id, *tok(t, add_special_tokens=False).input_ids))
    return [list(s) for s in seqs]


@torch.no_grad()
def floor_encode(pipe, seqs: list[list[int]], autocast: torch.dtype | None, batch: int = 64) -> int:
    """One forward per distinct sequence at its real length: exact-length buckets, <= batch rows."""
    by_len: dict[int, list[list[int]]] = {}
    for s in seqs:
        by_len.setdefault(len(s), []).append(s)
    ctx = torch.autocast("cpu", dtype=autocast) if autocast else contextlib.nullcontext()
    n = 0
    with ctx:
        for L in sorted(by_len):
            group = by_len[L]
            for i in range(0, len(group), batch):
                hs = _encoder_states(pipe, torch.tensor(group[i : i + batch])).float()
                n += hs.shape[0]
    return n


# ----------------------------------------------------------------------------- reference
@torch.no_grad()
def reference_uce(pipe, edit_concepts, guide_concepts, preserve_concepts, *, lamb=LAM,
                  erase_scale=ERASE_SCALE, preserve_scale=PRESERVE_SCALE, device="cpu"):
    """The loop structure of UCE's published ``UCE()`` (see module docstring), float32 as published.

    Returns (names, edited modules, keys per prompt, seconds per phase). Saving to a file is omitted.
    """
    ph = {"copy": 0.0, "encode": 0.0, "guide_outputs": 0.0, "accumulate": 0.0, "inverse": 0.0}
    t = time.perf_counter()
    modules, names = [], []
    for name, module in pipe.unet.named_modules():
        if "attn2" in name and (name.endswith("to_v") or name.endswith("to_k")):
            modules.append(module)
            names.append(name)
    original = copy.deepcopy(modules)
    edited = copy.deepcopy(modules)
    ph["copy"] = time.perf_counter() - t

    t = time.perf_counter()
    embeds = {}
    for e in edit_concepts + guide_concepts + preserve_concepts:
        if e in embeds:
            continue
        emb = pipe.encode_prompt(prompt=e, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False)
        last = pipe.tokenizer(e, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                              truncation=True, return_tensors="pt")["attention_mask"].sum() - 2
        embeds[e] = emb[0][:, last, :]
    ph["encode"] = time.perf_counter() - t

    t = time.perf_counter()
    outputs = {}
    for g in guide_concepts + preserve_concepts:
        if g in outputs:
            continue
        for module in original:
            outputs[g] = outputs.get(g, []) + [module(embeds[g])]
    ph["guide_outputs"] = time.perf_counter() - t

    for i, module in enumerate(original):
        t = time.perf_counter()
        w_old = module.weight
        mat1 = lamb * w_old
        mat2 = lamb * torch.eye(w_old.shape[1], device=device, dtype=w_old.dtype)
        for e, g in zip(edit_concepts, guide_concepts):
            c = embeds[e].T
            v = outputs[g][i].T
            mat1 += erase_scale * (v @ c.T)
            mat2 += erase_scale * (c @ c.T)
        for p in preserve_concepts:
            c = embeds[p].T
            v = outputs[p][i].T
            mat1 += preserve_scale * (v @ c.T)
            mat2 += preserve_scale * (c @ c.T)
        t2 = time.perf_counter()
        edited[i].weight = torch.nn.Parameter(mat1 @ torch.inverse(mat2.float()).to(w_old.dtype))
        ph["inverse"] += time.perf_counter() - t2
        ph["accumulate"] += t2 - t
    return names, edited, embeds, ph


# ----------------------------------------------------------------------------- checks
def _solution_from_keys(path: Path):
    from concept_edit.solvers.uce import uce_solve

    k = torch.load(path)
    return uce_solve(k["K"], k["T"], k["P"], **k["kw"])


def compare_to_solution(sol, weights: dict[str, torch.Tensor], other) -> dict:
    """Relative Frobenius error between W0 + W0 @ left @ right and ``other(name)`` (a full weight)
    summed over layers: |err| / |delta| and |err| / |W|."""
    e2 = d2 = w2 = 0.0
    for name, W0 in weights.items():
        up, down = sol.layer_factors(W0)
        delta = (up @ down).float()
        err = other(name) - (W0 + delta)
        e2 += err.double().pow(2).sum().item()
        d2 += delta.double().pow(2).sum().item()
        w2 += (W0 + delta).double().pow(2).sum().item()
    return {"rel_err_vs_delta": (e2 / d2) ** 0.5, "rel_err_vs_weight": (e2 / w2) ** 0.5}


# ----------------------------------------------------------------------------- one variant
_PIPES: dict = {}


def default_repeats(n: int, variant: str) -> int:
    """Best-of-k against the noise of shared cores: cheap calls are repeated, k=1 from N=1000."""
    if variant == "ref":
        return 1
    return 3 if n <= 10 else 1


def run_solve_only(model: str, n: int, seed: int = 0) -> dict:
    """ConceptEdit's work after the keys (shared Cholesky solve + per-layer factors, as in
    ``uce_delta``) on random keys of the model's width: no text encoder is built."""
    from concept_edit.core.delta import LayerDelta
    from concept_edit.solvers.uce import uce_solve

    gen = torch.Generator().manual_seed(seed)
    weights = edit_layer_weights(build_pipeline(model, seed, unet_only=True))
    d = next(iter(weights.values())).shape[1]
    K, T, P = (torch.randn(n, d, generator=gen) for _ in range(3))
    gc.collect()
    res = {"model": model, "n": n, "variant": "solve", "peak_reset": reset_peak(), "rss_before_mb": round(_status("VmRSS"), 1)}
    t, c = time.perf_counter(), time.process_time()
    sol = uce_solve(K, T, P, lam=LAM, erase_scale=ERASE_SCALE, preserve_scale=PRESERVE_SCALE)
    t_solve = time.perf_counter() - t
    out = {name: LayerDelta(*(x.float() for x in sol.layer_factors(W))).compact() for name, W in weights.items()}
    res.update(seconds=time.perf_counter() - t, cpu_seconds=time.process_time() - c, solve_s=t_solve,
               peak_mb=round(peak_mb(), 1), layers=len(out), load_avg=os.getloadavg()[0])
    return res


def run_variant(model: str, n: int, variant: str, workdir: Path, seed: int = 0, repeats: int | None = None,
                cache: bool = False, threads: int | None = None) -> dict:
    if threads:
        torch.set_num_threads(threads)
    if variant == "solve":
        return run_solve_only(model, n, seed)
    torch.manual_seed(seed)
    t = time.perf_counter()
    pipe = _PIPES.get(model) if cache else None
    if pipe is None:
        pipe = build_pipeline(model, seed)
        if cache:
            _PIPES[model] = pipe
    res = {"model": model, "n": n, "variant": variant, "threads": torch.get_num_threads(),
           "build_s": round(time.perf_counter() - t, 2)}
    edits, preserves = concept_names(n, seed)
    keyfile = workdir / f"keys_{model}_{n}_{{}}.pt"
    # warm-up (untimed, every variant alike): first-call kernel/dispatch set-up of the encoders
    floor_encode(pipe, [[pipe.tokenizer.bos_token_id, 320]], None)
    if variant == "ref":
        pipe.encode_prompt(prompt="a", device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)
    repeats = repeats or default_repeats(n, variant)
    res["repeats"] = repeats
    gc.collect()
    res["peak_reset"] = reset_peak()
    res["rss_before_mb"] = round(_status("VmRSS"), 1)

    if variant in ("floor32", "floor16"):
        t = time.perf_counter()
        seqs = floor_sequences(pipe, edits, preserves)
        res["tokenize_s"] = time.perf_counter() - t
        res["distinct_prompts"] = len(seqs)
        res["mean_len"] = sum(map(len, seqs)) / len(seqs)
        times, cpu = [], []
        for _ in range(repeats):
            t, c = time.perf_counter(), time.process_time()
            floor_encode(pipe, seqs, torch.bfloat16 if variant == "floor16" else None)
            times.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
        res["seconds"], res["all_seconds"], res["cpu_seconds"] = min(times), times, cpu[times.index(min(times))]
        res["load_avg"] = os.getloadavg()[0]
        res["peak_mb"] = round(peak_mb(), 1)
        return res

    if variant in ("ce32", "ce16"):
        import concept_edit.engines.uce as ue
        from concept_edit.adapters.diffusers_model import DiffusersModel

        captured = {}
        solve = ue.uce_solve

        def spy(K, T, P=None, **kw):  # records the keys uce_delta solves with (no copy, no cost)
            captured.update(K=K, T=T, P=P, kw=kw)
            return solve(K, T, P, **kw)

        ue.uce_solve = spy
        try:
            times, cpu = [], []
            for _ in range(repeats):
                delta = None
                t, c = time.perf_counter(), time.process_time()
                dm = DiffusersModel(pipe, autocast_dtype=torch.bfloat16 if variant == "ce16" else None)
                delta = ue.uce_delta(dm, make_plan(edits, preserves), progress=False)
                times.append(time.perf_counter() - t)
                cpu.append(time.process_time() - c)
            res["seconds"], res["all_seconds"], res["cpu_seconds"] = min(times), times, cpu[times.index(min(times))]
            res["load_avg"] = os.getloadavg()[0]
            res["peak_mb"] = round(peak_mb(), 1)
        finally:
            ue.uce_solve = solve
        res["ce_seconds"] = delta.metadata["seconds"]
        res["n_edit_keys"], res["n_preserve_keys"] = delta.metadata["n_edit_keys"], delta.metadata["n_preserve_keys"]
        res["condition"] = delta.metadata["condition"]
        res["layers"] = len(delta.layers)
        torch.save(captured, str(keyfile).format(variant))
        other = Path(str(keyfile).format("ce32"))
        if variant == "ce16" and other.exists():  # bf16 effect on the delta (after the measurement)
            k32 = torch.load(other)
            res["key_rel_err_bf16"] = ((captured["K"] - k32["K"]).norm() / k32["K"].norm()).item()
            sol32 = _solution_from_keys(other)
            weights = edit_layer_weights(pipe.unet)
            e2 = d2 = 0.0
            for name, W0 in weights.items():
                up, down = sol32.layer_factors(W0)
                d32 = (up @ down).float()
                e2 += (delta.layers[name].dense() - d32).double().pow(2).sum().item()
                d2 += d32.double().pow(2).sum().item()
            res["delta_rel_err_bf16"] = (e2 / d2) ** 0.5
        return res

    if variant == "ref":
        guides = [""] * len(edits)
        t, c = time.perf_counter(), time.process_time()
        names, edited, embeds, ph = reference_uce(pipe, edits, guides, preserves)
        res["seconds"], res["cpu_seconds"] = time.perf_counter() - t, time.process_time() - c
        res["load_avg"] = os.getloadavg()[0]
        res["peak_mb"] = round(peak_mb(), 1)
        res["phases"] = ph
        res["distinct_prompts"] = len(embeds)
        res["layers"] = len(names)
        other = Path(str(keyfile).format("ce32"))
        if other.exists():  # same edit through ConceptEdit's keys and factored solve
            k32 = torch.load(other)
            ref_K = torch.cat([embeds[e] for e in edits]).float()
            res["key_rel_err_ref_vs_ce"] = ((ref_K - k32["K"]).norm() / k32["K"].norm()).item()
            sol = _solution_from_keys(other)
            weights = edit_layer_weights(pipe.unet)
            by_name = {f"unet.{nm}": m.weight.detach() for nm, m in zip(names, edited)}
            res["check_ref_vs_ce"] = compare_to_solution(sol, weights, lambda nm: by_name[nm])
            # the published float32 explicit inverse vs the same formula in float64 (its own keys)
            from concept_edit.solvers.uce import uce_solve

            P = torch.cat([embeds[p] for p in preserves]) if preserves else None
            G = embeds[""].expand(len(edits), -1)
            sol64 = uce_solve(ref_K, G, P, lam=LAM, erase_scale=ERASE_SCALE, preserve_scale=PRESERVE_SCALE)
            res["check_ref_vs_float64"] = compare_to_solution(sol64, weights, lambda nm: by_name[nm])
        return res
    raise ValueError(f"unknown variant {variant!r}")


# ----------------------------------------------------------------------------- driver
def run_spec(spec: dict, cache: bool) -> list[dict]:
    """Run spec["variants"] in order in this process (the pipeline is built once per process)."""
    out = []
    for v in spec["variants"]:
        try:
            out.append(run_variant(spec["model"], spec["n"], v, Path(spec["workdir"]), repeats=spec.get("repeats"),
                                   cache=cache or len(spec["variants"]) > 1, threads=spec.get("threads")))
        except Exception as e:  # noqa: BLE001 - reported in the results, the run goes on
            out.append({"model": spec["model"], "n": spec["n"], "variant": v, "error": repr(e)})
        print(json.dumps(out[-1]), flush=True)
        gc.collect()
    return out


def run_worker(spec: dict, inprocess: bool, timeout: float) -> list[dict]:
    if inprocess:
        return run_spec(spec, cache=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    # a fixed mmap threshold makes glibc return every freed tensor to the OS at once, so the
    # peak (VmHWM, reset before each variant) of one variant is not hidden by another's heap
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        stdout, err = p.stdout, (p.stderr or p.stdout)[-2000:] if p.returncode else ""
    except subprocess.TimeoutExpired as e:
        stdout, err = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or ""), "timeout"
    done = [json.loads(ln) for ln in stdout.splitlines() if ln.startswith("{")]
    got = {r["variant"] for r in done}
    return done + [{"model": spec["model"], "n": spec["n"], "variant": v, "error": err or "no result"}
                   for v in spec["variants"] if v not in got]


def extrapolate_ref(measured: dict, n: int) -> dict:
    """Reference at N from a measured run at m < N: encode/outputs/accumulate ~ N, copy/inverse constant."""
    m = measured["n"]
    ph = measured["phases"]
    s = (2 * n + 1) / (2 * m + 1)  # distinct prompts
    est = {
        "copy": ph["copy"], "inverse": ph["inverse"],
        "encode": ph["encode"] * s,
        "guide_outputs": ph["guide_outputs"] * (n + 1) / (m + 1),
        "accumulate": ph["accumulate"] * n / m,
    }
    sec = sum(est.values())
    cpu = measured.get("cpu_seconds")
    return {"model": measured["model"], "n": n, "variant": "ref", "extrapolated_from": m, "phases": est,
            "seconds": sec, "cpu_seconds": cpu * sec / measured["seconds"] if cpu else None, "peak_mb": None}


def summarise(results: list[dict]) -> dict:
    table = {}
    for r in results:
        if "error" in r:
            continue
        table.setdefault((r["model"], r["n"]), {})[r["variant"]] = r
    rows = []
    for (model, n), v in sorted(table.items(), key=lambda kv: (MODELS.index(kv[0][0]), kv[0][1])):
        g = lambda k, f="seconds": v.get(k, {}).get(f)  # noqa: E731
        row = {"model": model, "n": n}
        for k in VARIANTS:
            row[k] = g(k)
            row[k + "_peak_mb"] = g(k, "peak_mb")
            row[k + "_rss_before_mb"] = g(k, "rss_before_mb")
        row["ref_extrapolated_from"] = g("ref", "extrapolated_from")
        ratio = lambda a, b: (a / b) if (a is not None and b) else None  # noqa: E731
        row["ce32_over_floor32"] = ratio(row["ce32"], row["floor32"])
        row["ce16_over_floor16"] = ratio(row["ce16"], row["floor16"])
        row["ref_over_ce32"] = ratio(row["ref"], row["ce32"])
        row["ref_over_ce16"] = ratio(row["ref"], row["ce16"])
        for k in VARIANTS:
            row[k + "_cpu"] = g(k, "cpu_seconds")
        row["ce32_over_floor32_cpu"] = ratio(row["ce32_cpu"], row["floor32_cpu"])
        row["ce16_over_floor16_cpu"] = ratio(row["ce16_cpu"], row["floor16_cpu"])
        row["ref_over_ce32_cpu"] = ratio(row["ref_cpu"], row["ce32_cpu"])
        row["load_avg"] = max([x.get("load_avg") or 0 for x in v.values()])
        row["delta_rel_err_bf16"] = g("ce16", "delta_rel_err_bf16")
        row["key_rel_err_bf16"] = g("ce16", "key_rel_err_bf16")
        row["check_ref_vs_ce"] = g("ref", "check_ref_vs_ce")
        row["check_ref_vs_float64"] = g("ref", "check_ref_vs_float64")
        rows.append(row)
    return {"rows": rows}


def _fmt(x, f="{:.2f}"):
    return "–" if x is None else f.format(x)


def markdown(summary: dict) -> str:
    out = ["Wall-clock seconds (best of k) and ratios; in brackets the same ratio in process CPU seconds, which the "
           "other jobs on the shared cores disturb less. `*` = extrapolated, see below.", "",
           "| model | N | floor fp32 s | floor bf16 s | CE fp32 s | CE bf16 s | ref s | CE32/floor32 | CE16/floor16 | ref/CE32 | ref/CE16 | bf16 Δ rel err | load |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in summary["rows"]:
        ref = _fmt(r["ref"], "{:.1f}") + ("*" if r["ref_extrapolated_from"] else "")
        cpu = lambda k, f="{:.2f}": "" if r[k] is None else f" [{f.format(r[k])}]"  # noqa: E731
        out.append(
            f"| {r['model']} | {r['n']} | {_fmt(r['floor32'])} | {_fmt(r['floor16'])} | {_fmt(r['ce32'])} | {_fmt(r['ce16'])} "
            f"| {ref} | {_fmt(r['ce32_over_floor32'])}{cpu('ce32_over_floor32_cpu')} "
            f"| {_fmt(r['ce16_over_floor16'])}{cpu('ce16_over_floor16_cpu')} "
            f"| {_fmt(r['ref_over_ce32'], '{:.1f}')}{cpu('ref_over_ce32_cpu', '{:.1f}')} "
            f"| {_fmt(r['ref_over_ce16'], '{:.1f}')} | {_fmt(r['delta_rel_err_bf16'], '{:.1e}')} | {r['load_avg']:.1f} |"
        )
    out += ["", "Peak resident memory during the measured call, MB (resident before the call in parentheses):", "",
            "| model | N | floor fp32 | floor bf16 | CE fp32 | CE bf16 | ref |", "|---|---|---|---|---|---|---|"]
    for r in summary["rows"]:
        cells = []
        for k in VARIANTS:
            pk, rb = r[k + "_peak_mb"], r[k + "_rss_before_mb"]
            cells.append("–" if pk is None else f"{pk:.0f} ({rb:.0f})")
        out.append(f"| {r['model']} | {r['n']} | " + " | ".join(cells) + " |")
    checks = [r for r in summary["rows"] if r["check_ref_vs_ce"]]
    if checks:
        out += ["", "Reference final weights vs ConceptEdit's W0 + delta (relative Frobenius error over all edited layers):", "",
                "| model | N | ‖W_ref − (W0+Δ)‖/‖Δ‖ | ‖W_ref − (W0+Δ)‖/‖W‖ | ref fp32-inverse vs fp64 same keys, /‖Δ‖ |", "|---|---|---|---|---|"]
        for r in checks:
            c, c64 = r["check_ref_vs_ce"], r["check_ref_vs_float64"] or {}
            out.append(f"| {r['model']} | {r['n']} | {c['rel_err_vs_delta']:.1e} | {c['rel_err_vs_weight']:.1e} | "
                       f"{_fmt(c64.get('rel_err_vs_delta'), '{:.1e}')} |")
    return "\n".join(out)


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in summary["rows"]))
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    styles = {"floor32": ("floor fp32 (encode once, real length)", "k--"), "floor16": ("floor bf16", "k:"),
              "ce32": ("ConceptEdit fp32", "C0-o"), "ce16": ("ConceptEdit bf16", "C2-o"),
              "ref": ("UCE published loop", "C3-s")}
    for ax, model in zip(axes[0], models):
        rows = [r for r in summary["rows"] if r["model"] == model]
        for k, (label, st) in styles.items():
            pts = [(r["n"], r[k]) for r in rows if r[k] is not None]
            if pts:
                ax.plot(*zip(*pts), st, label=label)
            if k == "ref":
                ext = [(r["n"], r[k]) for r in rows if r[k] is not None and r["ref_extrapolated_from"]]
                if ext:
                    ax.plot(*zip(*ext), "s", mfc="white", mec="C3", label="(extrapolated)")
        ax.set_xscale("log"); ax.set_yscale("log")
        ax.set_xlabel("concepts edited N (+ N preserved)"); ax.set_ylabel("seconds")
        ax.set_title(model); ax.grid(True, which="both", alpha=0.3); ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny pipelines, N=1,4, in-process: a smoke run of seconds")
    ap.add_argument("--models", default=None, help="comma list of sd15,sdxl,tiny-sd1,tiny-sdxl (default sd15,sdxl)")
    ap.add_argument("--n", default=None, help="comma list of concept counts (default 1,10,100,1000)")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--ref-max-n", default=None, help="model=N,... beyond which the reference is extrapolated "
                    f"(default {REF_MAX_N})")
    ap.add_argument("--inprocess", action="store_true", help="no subprocesses at all (memory less isolated)")
    ap.add_argument("--isolate", choices=["variant", "n"], default="variant",
                    help="fresh subprocess per (model, N, variant) [default], or per (model, N) with the "
                         "variants run in turn (peak reset between them; saves a model load per variant)")
    ap.add_argument("--out", default=None, help="results JSON (default: a temp file)")
    ap.add_argument("--plot", default=None, help="PNG path for the time-vs-N plot")
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--threads", type=int, default=None, help="torch threads per worker (default: torch's)")
    ap.add_argument("--from-json", default=None, help="only rebuild table/plot from a results JSON")
    ap.add_argument("--repeats", type=int, default=None, help="best-of-k per measured call (default: 3/2/1 by N)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        run_spec(json.loads(a.worker), cache=False)
        return {}
    if a.quick:
        a.models, a.n = a.models or "tiny-sd1,tiny-sdxl", a.n or "1,4"
        a.inprocess, a.repeats = True, a.repeats or 1
    a.models, a.n = a.models or "sd15,sdxl", a.n or "1,10,100,1000"
    models = a.models.split(",")
    ns = [int(x) for x in a.n.split(",")]
    variants = a.variants.split(",")
    ref_max = dict(REF_MAX_N)
    if a.ref_max_n:
        ref_max.update({k: int(v) for k, v in (kv.split("=") for kv in a.ref_max_n.split(","))})
    out = Path(a.out) if a.out else (None if a.quick else Path(tempfile.gettempdir()) / "uce_speed_results.json")
    if a.from_json:  # rebuild the table/plot from one or more earlier runs' results
        results = [r for f in a.from_json.split(",") for r in json.loads(Path(f).read_text())["results"]]
        return finish(results, None, a.plot)
    results = []
    with tempfile.TemporaryDirectory(prefix="uce_bench_") as wd:
        for model in models:
            for n in ns:
                # ref beyond ref_max is extrapolated in finish() from the largest measured N
                todo = [v for v in variants if not (v == "ref" and n > ref_max.get(model, 10**9))]
                groups = [todo] if a.isolate == "n" else [[v] for v in todo]
                for group in groups:
                    spec = {"model": model, "n": n, "variants": group, "workdir": wd, "repeats": a.repeats,
                            "threads": a.threads}
                    t = time.perf_counter()
                    rs = run_worker(spec, a.inprocess, a.timeout)
                    results += rs
                    for r in rs:
                        msg = r.get("error", "").strip().splitlines()[-1:] if "error" in r else ""
                        print(f"[{model} N={n} {r['variant']}] {r.get('seconds', float('nan')):.2f}s "
                              f"peak {r.get('peak_mb')} MB {msg}", flush=True)
                    print(f"  (worker wall {time.perf_counter() - t:.0f}s)", flush=True)
                    if out:  # partial results survive an interrupted run
                        out.write_text(json.dumps({"results": results}, indent=1, default=str))
    return finish(results, out, a.plot)


def finish(results: list[dict], out: Path | None, plot_path: str | None) -> dict:
    results = [r for r in results if "extrapolated_from" not in r]
    for model, n in sorted({(r["model"], r["n"]) for r in results if "error" not in r}):
        if any(r["model"] == model and r["n"] == n and r["variant"] == "ref" and "error" not in r for r in results):
            continue
        done = [r for r in results if r["model"] == model and r["variant"] == "ref" and "phases" in r and r["n"] < n]
        if done:
            results.append(extrapolate_ref(max(done, key=lambda r: r["n"]), n))
    summary = summarise(results)
    summary["results"] = results
    summary["machine"] = {"cpus": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                          "load_avg_end": os.getloadavg(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    summary["markdown"] = markdown(summary)
    if out:
        out.write_text(json.dumps(summary, indent=1, default=str))
        print(f"results: {out}")
    if plot_path:
        plot(summary, Path(plot_path))
    print(summary["markdown"])
    return summary


if __name__ == "__main__":
    main()
