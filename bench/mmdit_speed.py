"""UCE at FLUX.1 and SD3.5-medium sizes: time and peak memory of ConceptEdit's edit, of UCE's
published FLUX function, and of the floor (encoding the distinct prompts once).

Real configs in ``bench/configs/`` (``flux1_dev_transformer.json``, ``sd35_medium_transformer.json``,
``t5_v1_1_xxl_encoder.json``, the CLIP-L/CLIP-G configs of the SD benches), random weights, nothing
downloaded. Text encoders are complete (T5-XXL in bfloat16: 4.8 B parameters, 9.5 GB; CLIPs in
float32). The transformer is built on the meta device with only its two text readers
(``context_embedder``, ``time_text_embed.text_embedder.linear_1``, weights and biases) materialised:
those are the only transformer tensors either method reads (the published function loads the whole
transformer first, 11.9 B parameters for FLUX.1 — 23.8 GB in bfloat16, more than this machine's
memory — so its peak is stated from the tensor sizes, not measured).

For N erased concepts (guide "", N preserved concepts, last-token keys, lambda 0.5):

* ``floor``  one ``encode_prompt`` pass over the distinct prompts (2N + 1), batched, at the
  family's padded length (T5 is bidirectional and run without a mask: a key depends on the padding,
  so the padded encoding is the least an exact edit needs).
* ``ce``     ``concept_edit.engines.uce.uce_delta`` on ``MMDiTModel`` end to end.
* ``ref``    the loop of UCE's published ``UCE()`` (rohitgandikota/unified-concept-editing,
  trainscripts/uce_flux_edit.py): every distinct prompt encoded alone, the original readers'
  outputs (bias included) as targets, one rank-1 update per concept and layer, an explicit
  inverse. Published for FLUX only; on SD3 the same loop is timed with its key taken at the T5 token
  after SD3's 77 CLIP positions and the pooled/states choice made by width (labelled "adapted").
  Its preserved outputs shift by the bias (see docs/mmdit.md); ``ref_preserve_shift`` measures it.

T5-XXL at 512 tokens costs about a minute per prompt on 2 CPU cores, so only small N run at full
depth. ``--t5-blocks K`` builds T5 with K of its 24 blocks (real width; K = 0 keeps the
embedding and final norm); the table then gives the measured seconds and, labelled, a
full-depth estimate that adds (24 - K) x the per-prompt, per-block T5 cost measured in the same
run (``--calibrate``).

    .venv/bin/python bench/mmdit_speed.py --quick                              # tiny pipelines, seconds
    .venv/bin/python bench/mmdit_speed.py --models flux1 --n 1                 # full depth, ~10 min
    .venv/bin/python bench/mmdit_speed.py --models flux1,sd35m --n 10,100,1000 --t5-blocks 0
    .venv/bin/python bench/mmdit_speed.py --report                             # table from saved results
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from uce_speed import (  # noqa: E402
    _init_text_encoder,
    _status,
    _tiny_vae,
    concept_names,
    peak_mb,
    reset_peak,
)

CONFIGS = HERE / "configs"
RESULTS = HERE / "mmdit_speed.json"
MODELS = {"flux1": "flux", "sd35m": "sd3", "tiny-flux": "flux", "tiny-sd3": "sd3"}
VARIANTS = ("floor", "ce", "ref")
LAM = 0.5
T5_FULL_BLOCKS = 24
READERS = ("context_embedder", "time_text_embed.text_embedder.linear_1")


# ----------------------------------------------------------------------------- models
def _t5_xxl(blocks: int, gen: torch.Generator):
    """T5-XXL encoder (real config, ``blocks`` of its 24 blocks), random bfloat16 weights filled
    in place on the meta-built model (transformers' own init of 4.8 B parameters takes minutes)."""
    from accelerate import init_empty_weights
    from transformers import T5Config, T5EncoderModel

    d = {k: v for k, v in json.loads((CONFIGS / "t5_v1_1_xxl_encoder.json").read_text()).items() if not k.startswith("_")}
    d["num_layers"] = blocks
    with init_empty_weights():
        model = T5EncoderModel(T5Config.from_dict(d))
    for name, p in list(model.named_parameters()):
        mod = model.get_submodule(name.rpartition(".")[0])
        leaf = name.rpartition(".")[2]
        v = torch.empty(p.shape, dtype=torch.bfloat16)
        if "layer_norm" in name:
            v.fill_(1.0)
        else:
            v.normal_(0.0, 0.02 if "embed" in name or "relative" in name else p.shape[-1] ** -0.5, generator=gen)
        mod._parameters[leaf] = torch.nn.Parameter(v, requires_grad=False)
    model.shared = model.encoder.embed_tokens  # tied as from_pretrained leaves them
    return model.eval()


def _meta_transformer(name: str, gen: torch.Generator):
    """The transformer on the meta device with only its text readers materialised (random)."""
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    cls, cfg = ((FluxTransformer2DModel, "flux1_dev_transformer.json") if name == "flux1"
                else (SD3Transformer2DModel, "sd35_medium_transformer.json"))
    d = {k: v for k, v in json.loads((CONFIGS / cfg).read_text()).items() if not k.startswith("_")}
    with init_empty_weights():
        tr = cls.from_config(d)
    for r in READERS:
        mod = tr.get_submodule(r)
        out, inn = mod.weight.shape
        mod._parameters["weight"] = torch.nn.Parameter(torch.empty(out, inn).normal_(0.0, inn ** -0.5, generator=gen))
        mod._parameters["bias"] = torch.nn.Parameter(torch.empty(out).normal_(0.0, 0.02, generator=gen))
    return tr, sum(p.numel() for p in tr.parameters())


def build_pipeline(name: str, t5_blocks: int = T5_FULL_BLOCKS, seed: int = 0):
    """A real FluxPipeline / StableDiffusion3Pipeline object at the named size; returns (pipe,
    the full transformer's parameter count)."""
    from concept_edit.testing.tokenizer_files import (
        clip_tokenizer_dir,
        t5_tokenizer_dir,
    )
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        StableDiffusion3Pipeline,
    )
    from transformers import (
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
        T5TokenizerFast,
    )

    if name.startswith("tiny-"):
        from concept_edit.testing.tiny_models import build_tiny_mmdit_pipeline

        pipe = build_tiny_mmdit_pipeline(MODELS[name], seed=seed)
        return pipe, sum(p.numel() for p in pipe.transformer.parameters())
    gen = torch.Generator().manual_seed(seed)
    tr, n_params = _meta_transformer(name, gen)
    t5 = _t5_xxl(t5_blocks, gen)
    tok = CLIPTokenizer.from_pretrained(str(clip_tokenizer_dir()))
    t5_tok = T5TokenizerFast.from_pretrained(str(t5_tokenizer_dir()))
    sched = FlowMatchEulerDiscreteScheduler()
    if name == "flux1":
        clip = _init_text_encoder(CLIPTextModel, CONFIGS / "sd15_text_encoder.json", gen, seed)
        return FluxPipeline(scheduler=sched, vae=_tiny_vae(), text_encoder=clip, tokenizer=tok, text_encoder_2=t5,
                            tokenizer_2=t5_tok, transformer=tr), n_params
    clip_l = _init_text_encoder(CLIPTextModelWithProjection, CONFIGS / "sdxl_text_encoder.json", gen, seed)
    clip_g = _init_text_encoder(CLIPTextModelWithProjection, CONFIGS / "sdxl_text_encoder_2.json", gen, seed)
    tok2 = CLIPTokenizer.from_pretrained(str(clip_tokenizer_dir(pad_token="!")))
    return StableDiffusion3Pipeline(scheduler=sched, vae=_tiny_vae(), text_encoder=clip_l, tokenizer=tok,
                                    text_encoder_2=clip_g, tokenizer_2=tok2, text_encoder_3=t5, tokenizer_3=t5_tok,
                                    transformer=tr), n_params


def make_plan(edits: list[str], preserves: list[str]):
    from concept_edit.core.plan import plan_from_dict

    return plan_from_dict({"edits": [{"erase": e, "guide": ""} for e in edits], "preserve": preserves,
                           "lambda": LAM, "erase_scale": 1.0, "preserve_scale": 1.0, "token": "last",
                           "templates": ["{}"], "preserve_empty": False})


# ----------------------------------------------------------------------------- the three variants
@torch.no_grad()
def floor_encode(model, prompts: list[str]) -> None:
    """The distinct prompts through the pipeline's ``encode_prompt``, batched (MMDiTModel's own path
    without the key bookkeeping)."""
    model.clear_caches()
    model._encode_batches(list(dict.fromkeys(prompts)))


@torch.no_grad()
def reference_uce(pipe, family: str, msl: int, edits, guides, preserves):
    """The loop of UCE's published FLUX ``UCE()`` (float32 as published; saving omitted)."""
    ph = {"copy": 0.0, "encode": 0.0, "outputs": 0.0, "accumulate": 0.0, "inverse": 0.0}
    t = time.perf_counter()
    names = [n for n, _ in pipe.transformer.named_modules() if "context_embedder" in n or "text_embedder.linear_1" in n]
    original = [copy.deepcopy(pipe.transformer.get_submodule(n)) for n in names]
    edited = copy.deepcopy(original)
    ph["copy"] = time.perf_counter() - t
    t = time.perf_counter()
    embeds = {}
    offset = 0 if family == "flux" else pipe.tokenizer.model_max_length  # SD3: T5 tokens follow 77 CLIP rows
    t5_tok = pipe.tokenizer_2 if family == "flux" else pipe.tokenizer_3
    for e in edits + guides + preserves:
        if e in embeds:
            continue
        if family == "flux":
            states, pooled, _ = pipe.encode_prompt(prompt=e, prompt_2=None, num_images_per_prompt=1, max_sequence_length=msl)
        else:
            states, _, pooled, _ = pipe.encode_prompt(prompt=e, prompt_2=None, prompt_3=None, num_images_per_prompt=1,
                                                      do_classifier_free_guidance=False, max_sequence_length=msl)
        last = t5_tok(e, padding="max_length", max_length=msl, truncation=True, return_tensors="pt")["attention_mask"].sum() - 2
        embeds[e] = [states[:, offset + last, :].float(), pooled.float()]
    ph["encode"] = time.perf_counter() - t
    t = time.perf_counter()
    outputs = {}
    for g in guides + preserves:
        if g in outputs:
            continue
        outputs[g] = [m(embeds[g][0 if m.weight.shape[1] == embeds[g][0].shape[1] else 1]) for m in original]
    ph["outputs"] = time.perf_counter() - t
    for i, m in enumerate(original):
        t = time.perf_counter()
        w_old = m.weight
        idx = 0 if w_old.shape[1] == embeds[edits[0]][0].shape[1] else 1  # published: `shape[-1] == 768`
        mat1 = LAM * w_old
        mat2 = LAM * torch.eye(w_old.shape[1], dtype=w_old.dtype)
        for e, g in zip(edits, guides):
            c, v = embeds[e][idx].T, outputs[g][i].T
            mat1 += v @ c.T
            mat2 += c @ c.T
        for p in preserves:
            c, v = embeds[p][idx].T, outputs[p][i].T
            mat1 += v @ c.T
            mat2 += c @ c.T
        t2 = time.perf_counter()
        edited[i].weight = torch.nn.Parameter(mat1 @ torch.inverse(mat2.float()))
        ph["inverse"] += time.perf_counter() - t2
        ph["accumulate"] += t2 - t
    return names, original, edited, embeds, ph


def _timed(res: dict, fn):
    gc.collect()
    res["peak_reset"] = reset_peak()
    res["rss_before_mb"] = round(_status("VmRSS"), 1)
    t, c = time.perf_counter(), time.process_time()
    out = fn()
    res["seconds"], res["cpu_seconds"] = time.perf_counter() - t, time.process_time() - c
    res["peak_mb"] = round(peak_mb(), 1)
    res["load_avg"] = os.getloadavg()[0]
    return out


def run_model(name: str, ns: list[int], variants: list[str], t5_blocks: int, calibrate: bool, seed: int = 0) -> list[dict]:
    """Every (N, variant) for one model in this process: the encoders are built once (T5-XXL's
    random fill takes a minute); VmHWM is reset before each measured call."""
    from concept_edit.adapters.mmdit_model import MMDiTModel
    from concept_edit.engines.uce import uce_delta

    torch.manual_seed(seed)
    t = time.perf_counter()
    pipe, n_params = build_pipeline(name, t5_blocks, seed)
    family = MODELS[name]
    base = {"model": name, "t5_blocks": t5_blocks if not name.startswith("tiny") else None,
            "build_s": round(time.perf_counter() - t, 1), "threads": torch.get_num_threads(),
            "transformer_params": n_params}
    model = MMDiTModel(pipe)
    msl = model.max_sequence_length
    floor_encode(model, ["a"])  # warm-up, untimed, for every variant alike
    out = []
    if calibrate:  # per-prompt cost of one T5 block at this width and length (for the full-depth estimate)
        t5 = pipe.text_encoder_2 if family == "flux" else pipe.text_encoder_3
        x = torch.randn(1, msl, t5.config.d_model, dtype=torch.bfloat16)
        blk = _t5_xxl(1, torch.Generator().manual_seed(1)).encoder.block[0] if not name.startswith("tiny") else t5.encoder.block[0]
        blk(x.to(next(blk.parameters()).dtype))
        t = time.perf_counter()
        for _ in range(3):
            blk(x.to(next(blk.parameters()).dtype))
        out.append({**base, "variant": "calibrate", "t5_block_seconds_per_prompt": (time.perf_counter() - t) / 3})
        print(json.dumps(out[-1]), flush=True)
        del blk
    for n in ns:
        edits, preserves = concept_names(n, seed)
        prompts = edits + preserves + [""]
        for v in variants:
            res = {**base, "n": n, "variant": v, "distinct_prompts": len(set(prompts)), "max_sequence_length": msl}
            try:
                if v == "floor":
                    _timed(res, lambda: floor_encode(model, prompts))
                elif v == "ce":
                    model.clear_caches()
                    delta = _timed(res, lambda: uce_delta(model, make_plan(edits, preserves), progress=False))
                    res["keys_seconds"] = delta.metadata["seconds"]
                    ce_delta = delta
                    model.clear_caches()  # the published loop's peak is its own, not ours plus its
                else:
                    names, original, edited, embeds, ph = _timed(
                        res, lambda: reference_uce(pipe, family, msl, edits, [""] * n, preserves))
                    res["phases"] = ph
                    res["published_peak_gb_stated"] = round(n_params * 2 / 1e9, 1)  # it loads the whole transformer
                    if "ce" in variants:
                        res.update(compare(names, original, edited, ce_delta, [embeds[p] for p in preserves]))
            except Exception as e:  # noqa: BLE001 - reported, the run goes on
                res["error"] = repr(e)
            out.append(res)
            print(json.dumps(res), flush=True)
            gc.collect()
    return out


def compare(names, original, edited, delta, preserve_embeds) -> dict:
    """How far the published weights are from ConceptEdit's (same keys up to encoding batch), and
    how far each moves the preserved outputs (the published targets include the bias)."""
    out = {}
    for name, m0, m1 in zip(names, original, edited):
        W0 = m0.weight.detach()
        ld = delta.layers[f"transformer.{name}"]
        W_ce = W0 + ld.dense().to(W0.dtype)
        idx = 0 if W0.shape[1] == preserve_embeds[0][0].shape[1] else 1
        P = torch.cat([p[idx] for p in preserve_embeds])
        y0 = P @ W0.T + m0.bias
        shift = lambda W: ((P @ W.T + m0.bias - y0).norm() / y0.norm()).item()  # noqa: E731
        short = name.split(".")[-1] if "linear_1" not in name else "pooled"
        out[f"weight_rel_diff_{short}"] = ((m1.weight - W_ce).norm() / W_ce.norm()).item()
        out[f"ref_preserve_shift_{short}"] = shift(m1.weight.detach())
        out[f"ce_preserve_shift_{short}"] = shift(W_ce)
    return out


# ----------------------------------------------------------------------------- report
def report(results: list[dict], cmd: str) -> str:
    cal = {r["model"]: r["t5_block_seconds_per_prompt"] for r in results if r.get("variant") == "calibrate"}
    lines = ["| model | T5 blocks | N | prompts | floor s | ConceptEdit s | published s | CE / floor | published / CE | "
             "CE peak GB | published peak GB (measured; stated with its transformer) | preserved-output shift CE / published |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    rows: dict = {}
    for r in results:
        if r.get("variant") in VARIANTS and "error" not in r:
            rows.setdefault((r["model"], r["t5_blocks"], r["n"]), {})[r["variant"]] = r
    for (model, blocks, n), v in sorted(rows.items(), key=lambda kv: (kv[0][0], -(kv[0][1] or 99), kv[0][2])):
        f, c, p = (v.get(k, {}) for k in VARIANTS)
        s = lambda r: r.get("seconds")  # noqa: E731
        fmt = lambda x: "–" if x is None else (f"{x:.3g}" if x < 100 else f"{x:.0f}")  # noqa: E731
        est = ""
        if blocks is not None and blocks < T5_FULL_BLOCKS and model in cal and s(c):
            add = (T5_FULL_BLOCKS - blocks) * cal[model] * c["distinct_prompts"]
            est = f" (full depth ≈ {fmt(s(c) + add)})"
        shift = (f"{c.get('ce_preserve_shift_context_embedder', p.get('ce_preserve_shift_context_embedder', 0)):.1e} / "
                 f"{p['ref_preserve_shift_context_embedder']:.1e}") if "ref_preserve_shift_context_embedder" in p else "–"
        ratio = lambda a, b: "–" if not (a and b) else f"{a / b:.2f}"  # noqa: E731
        lines.append(f"| {model} | {blocks if blocks is not None else 'tiny'} | {n} | {c.get('distinct_prompts', '')} | "
                     f"{fmt(s(f))} | {fmt(s(c))}{est} | {fmt(s(p))} | {ratio(s(c), s(f))} | {ratio(s(p), s(c))} | "
                     f"{fmt((c.get('peak_mb') or 0) / 1024)} | {fmt((p.get('peak_mb') or 0) / 1024)}; "
                     f"{p.get('published_peak_gb_stated', '–')} + encoders | {shift} |")
    head = [f"Reproduce: `{cmd}`.", ""]
    if cal:
        head += ["T5-XXL per prompt and block (bfloat16, padded length): " +
                 ", ".join(f"{m} {s:.2f} s" for m, s in cal.items()) + ".", ""]
    return "\n".join(head + lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="flux1,sd35m")
    ap.add_argument("--n", default="1")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--t5-blocks", type=int, default=T5_FULL_BLOCKS)
    ap.add_argument("--calibrate", action="store_true", help="also time one T5-XXL block per prompt")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="tiny pipelines, in seconds (CI smoke)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--report", action="store_true", help="print the table of the saved results")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.worker:
        spec = json.loads(a.worker)
        run_model(spec["model"], spec["ns"], spec["variants"], spec["t5_blocks"], spec["calibrate"])
        return
    if a.report:
        print(report(json.loads(a.out.read_text()), "see bench/README.md"))
        return
    models = ["tiny-flux", "tiny-sd3"] if a.quick else a.models.split(",")
    ns = [int(x) for x in a.n.split(",")]
    variants = a.variants.split(",")
    results = json.loads(a.out.read_text()) if a.out.exists() and not a.quick else []
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=HERE).stdout.strip() or None  # which code measured a row (rows replace by key)
    for m in models:
        spec = {"model": m, "ns": ns, "variants": variants, "t5_blocks": a.t5_blocks, "calibrate": a.calibrate}
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec), "--threads", str(a.threads)]
        # one process per model: each measured call's peak (VmHWM reset before it) is its own
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        p = subprocess.run(cmd, capture_output=True, text=True, env=env)
        got = [{**json.loads(ln), "commit": commit} for ln in p.stdout.splitlines() if ln.startswith("{")]
        if p.returncode:
            got.append({"model": m, "error": (p.stderr or "")[-2000:]})
        key = lambda r: (r.get("model"), r.get("t5_blocks"), r.get("n"), r.get("variant"))  # noqa: E731
        new = {key(r) for r in got}
        results = [r for r in results if key(r) not in new] + got
        for r in got:
            print(json.dumps(r), flush=True)
    if not a.quick:
        tmp = a.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=1))
        tmp.replace(a.out)
    print(report(results, "python bench/mmdit_speed.py " + " ".join(argv if argv is not None else sys.argv[1:])))


if __name__ == "__main__":
    main()
