"""UCE through the ComfyUI adapter inside a real ComfyUI: full-77 ``encode_from_tokens`` vs
prefix-batched encoding on ComfyUI's CLIP modules vs the library's floor.

Runs in ComfyUI's Python and imports this repository under a folder name, as ComfyUI imports a
custom node pack. On an SD 1.5-shaped checkpoint (tests/test_comfyui_e2e.py's random one), for
each N it erases N pseudo-names (guide "") and preserves N others (bench/uce_speed.py's names,
λ 0.5, last-token keys, no "" preserve) and times, in one process, on the same inputs:

* ``old``    ``uce_delta(ComfyEditableModel(model, clip, prefix=False, batch_size=32), plan)``: every
  distinct prompt padded to 77 tokens through ``clip.encode_from_tokens`` (the adapter before this
  change, kept callable with ``prefix=False``);
* ``new``    ``uce_delta(ComfyEditableModel(model, clip), plan)``: real-length prefixes, batched by
  length, on ComfyUI's own CLIP modules;
* ``floor``  the library floor: one forward of a transformers CLIPTextModel holding the CLIP's
  weights (float32) over the distinct prompts at their real length (bench/uce_speed.floor_encode).

    COMFYUI_PATH=/path/to/ComfyUI /path/to/comfyui/python bench/comfyui_encoding.py CHECKPOINT [--n 10,100,1000]
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]


def load_pack(name: str = "ConceptEdit"):
    """This repository imported as ComfyUI imports ``custom_nodes/<name>``."""
    spec = importlib.util.spec_from_file_location(name, REPO / "__init__.py", submodule_search_locations=[str(REPO)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def load_uce_speed():
    spec = importlib.util.spec_from_file_location("uce_speed", REPO / "bench" / "uce_speed.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def hf_text_encoder(clip):
    """A transformers CLIPTextModel with the (SD 1.x) CLIP's weights in float32: the library's encoder."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    pre = "clip_l.transformer.text_model."
    sd = {k[len(pre):]: v.float() for k, v in clip.cond_stage_model.state_dict().items() if k.startswith(pre)}
    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                         num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu")
    te = CLIPTextModel(cfg).eval().requires_grad_(False)
    target = getattr(te, "text_model", te)
    missing, _ = target.load_state_dict(sd, strict=False)
    assert not [m for m in missing if "position_ids" not in m], missing
    return te.to(torch.float32)


def timed(fn):
    t, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - t, time.process_time() - c


def delta_rel_diff(a, b) -> float:
    num = sum((a.layers[n].dense() - b.layers[n].dense()).double().pow(2).sum().item() for n in a.layers)
    den = sum(b.layers[n].dense().double().pow(2).sum().item() for n in b.layers)
    return (num / den) ** 0.5


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--n", default="10,100,1000")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--old-max-n", type=int, default=1000, help="skip the old path above this N (slow)")
    a = ap.parse_args(argv)

    sys.path.insert(0, os.environ["COMFYUI_PATH"])
    from comfy.cli_args import args

    args.cpu = True
    import comfy.sd
    import torch

    torch.set_num_threads(a.threads)
    pack = load_pack()
    from importlib import import_module

    cm = import_module(pack.__name__ + ".adapters.comfy_model")
    uce = import_module(pack.__name__ + ".engines.uce")
    plan_mod = import_module(pack.__name__ + ".core.plan")
    us = load_uce_speed()

    model, clip, _ = comfy.sd.load_checkpoint_guess_config(a.checkpoint, output_vae=False, output_clip=True)[:3]
    lib = SimpleNamespace(tokenizer=cm.ComfyEditableModel(model, clip).tokenizer, text_encoder=hf_text_encoder(clip))
    # warm-up, untimed: first-call set-up of both encoders and the patcher
    cm.ComfyEditableModel(model, clip).encode_ids([[49406, 320], [49406, 320, 1125]])
    cm.ComfyEditableModel(model, clip, prefix=False).encode_ids([[49406, 320]])
    us.floor_encode(lib, [[49406, 320]], None)

    rows = []
    for n in [int(x) for x in a.n.split(",")]:
        edits, preserves = us.concept_names(n)
        plan = plan_mod.plan_from_dict({
            "edits": [{"erase": e, "guide": ""} for e in edits], "preserve": preserves,
            "lambda": us.LAM, "erase_scale": us.ERASE_SCALE, "preserve_scale": us.PRESERVE_SCALE,
            "token": "last", "templates": ["{}"], "preserve_empty": False,
        })
        seqs = us.floor_sequences(lib, edits, preserves)
        row = {"n": n, "prompts": len(seqs), "mean_tokens": sum(map(len, seqs)) / len(seqs), "load": os.getloadavg()[0]}
        _, row["floor_s"], row["floor_cpu"] = timed(lambda: us.floor_encode(lib, seqs, None))
        new, row["new_s"], row["new_cpu"] = timed(lambda: uce.uce_delta(cm.ComfyEditableModel(model, clip), plan, progress=False))
        row["new_keys_s"] = new.metadata["seconds"]["keys"]
        if n <= a.old_max_n:
            old_em = cm.ComfyEditableModel(model, clip, prefix=False, batch_size=32)
            old, row["old_s"], row["old_cpu"] = timed(lambda: uce.uce_delta(old_em, plan, progress=False))
            row["old_keys_s"] = old.metadata["seconds"]["keys"]
            row["delta_diff"] = delta_rel_diff(new, old)
        row["load_end"] = os.getloadavg()[0]
        rows.append(row)
        print(row, flush=True)

    print(f"\nComfyUI at {os.environ['COMFYUI_PATH']}, torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n")
    print("| N | distinct prompts (mean tokens) | old s (keys) | new s (keys) | floor s | old/new | new/floor "
          "| ‖Δnew−Δold‖/‖Δold‖ | load |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        old = f"{r['old_s']:.1f} ({r['old_keys_s']:.1f})" if "old_s" in r else "–"
        ratio = f"{r['old_s'] / r['new_s']:.1f} [{r['old_cpu'] / r['new_cpu']:.1f}]" if "old_s" in r else "–"
        diff = f"{r['delta_diff']:.1e}" if "delta_diff" in r else "–"
        print(f"| {r['n']} | {r['prompts']} ({r['mean_tokens']:.1f}) | {old} | {r['new_s']:.1f} ({r['new_keys_s']:.1f}) "
              f"| {r['floor_s']:.1f} | {ratio} | {r['new_s'] / r['floor_s']:.2f} [{r['new_cpu'] / r['floor_cpu']:.2f}] "
              f"| {diff} | {r['load']:.1f}–{r['load_end']:.1f} |")
    return rows


if __name__ == "__main__":
    main()
