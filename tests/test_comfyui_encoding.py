"""Prefix-batched encoding on ComfyUI's own CLIP modules, progress in ComfyUI's bar, caches in its
folders — inside a real ComfyUI (subprocesses with ComfyUI's Python, the pack imported under a
folder name as ComfyUI does). Skipped unless COMFYUI_PATH is set.

1. ``ComfyEditableModel.encode_ids`` (real-length prefixes batched by length) equals
   ``clip.encode_from_tokens`` at 77 tokens, on prompts of many lengths, for SD 1.x (the e2e test's
   cached checkpoint) and SD 2.x / SDXL CLIPs built by ComfyUI's loader from random state dicts at
   real shapes; also with a LoRA on the CLIP, with CLIPSetLastLayer, and after switching between
   clones (the patches ComfyUI loads are the ones used). A CLIP class it does not know falls back
   to ``encode_from_tokens``.
2. ``comfy_host()``: an edit drives ``comfy.utils.ProgressBar`` (a recorder installed with
   ``set_progress_bar_global_hook``), Cancel (ComfyUI's interrupt, raised from that hook) stops it,
   and an EMCID edit's C0 cache is written under the ComfyUI base directory, not in HOME.

ComfyUI keeps the CLIP's weights in float16 on the CPU but computes in float32 (its casting ops
upcast each weight to the float32 activations), so both paths use the same rounded weights and
differ only by float32 summation order: the tolerance is 1e-4 of the largest state.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("ce_comfyui_e2e_helpers", HERE / "test_comfyui_e2e.py")
e2e = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(e2e)

pytestmark = pytest.mark.skipif(e2e.comfy_path() is None, reason="no ComfyUI: set COMFYUI_PATH and COMFYUI_PYTHON (../shared/comfyui/install.sh DEST prints both; .ci/run does it all)")

PRELUDE = r'''
import copy, importlib.util, os, random, sys, torch
from pathlib import Path
from types import SimpleNamespace
sys.path.insert(0, os.environ["COMFYUI_PATH"])
from comfy.cli_args import args
args.cpu = True
if os.environ.get("CE_BASE"):
    args.base_directory = os.environ["CE_BASE"]  # folder_paths reads it when first imported
import comfy.sd, comfy.utils, comfy.model_management
ce_root = os.environ["CE_REPO"]
spec = importlib.util.spec_from_file_location("ConceptEdit", os.path.join(ce_root, "__init__.py"),
                                              submodule_search_locations=[ce_root])
ce = importlib.util.module_from_spec(spec)      # imported under a folder name, as ComfyUI does
sys.modules["ConceptEdit"] = ce
spec.loader.exec_module(ce)
from importlib import import_module
pkg = ce.__name__
torch.set_num_threads(1)  # the cores are shared; one thread avoids OpenMP stalls
'''

ENCODING = PRELUDE + r'''
cm = import_module(pkg + ".adapters.comfy_model")
cc = import_module(pkg + ".adapters.comfy_clip")
EOS = 49407
rng = random.Random(0)


def stub_model(ctx):  # the MODEL only tells the adapter the UNet's context width
    return SimpleNamespace(model=SimpleNamespace(model_config=SimpleNamespace(unet_config={"context_dim": ctx})))


def random_clip_sd(width, layers, seed, act_layers=None):
    """A CLIP text-encoder state dict (HF names, as in checkpoints) with random weights at real shapes."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: (torch.randn(*s, generator=g) * 0.02).half()
    sd = {"text_model.embeddings.token_embedding.weight": r(49408, width),
          "text_model.embeddings.position_embedding.weight": r(77, width),
          "text_model.final_layer_norm.weight": torch.ones(width).half(),
          "text_model.final_layer_norm.bias": r(width), "text_projection.weight": r(width, width)}
    for i in range(layers):
        p = f"text_model.encoder.layers.{i}."
        for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
            sd[p + f"self_attn.{n}.weight"], sd[p + f"self_attn.{n}.bias"] = r(width, width), r(width)
        for n in ("layer_norm1", "layer_norm2"):
            sd[p + n + ".weight"], sd[p + n + ".bias"] = torch.ones(width).half(), r(width)
        sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"] = r(4 * width, width), r(4 * width)
        sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"] = r(width, 4 * width), r(width)
    return sd


def sequences(em, n):
    """BOS + random token ids of many lengths (mostly short, as prompts are), two padded prompts
    (BOS .. EOS, padding) and a prefix that ends inside the padding."""
    out = set()
    while len(out) < n:
        k = rng.choice([0, 1, 2, 3, 4, 5, 6, 8, 10, 14, 20, 31, 50, 75])
        out.add((49406, *[rng.randrange(300, 49000) for _ in range(k)]))
    out = [list(s) for s in sorted(out, key=len)]
    out += [em.padded_ids("a painting by van gogh of a harbour at night"), em.padded_ids(""),
            em.padded_ids("a cat")[:20]]
    return out


def reference(clip, seqs):
    """clip.encode_from_tokens on each sequence completed to 77 as ComfyUI's tokenizer would
    (EOS, then each stream's own padding), cut back to the sequence's length."""
    streams = list(clip.tokenize("").keys())
    tokens = {}
    for s in streams:
        pad = getattr(clip.tokenizer, f"clip_{s}").pad_token
        rows = []
        for ids in seqs:
            cut = ids.index(EOS) + 1 if EOS in ids else len(ids)
            full = ids[:cut] + ([] if EOS in ids else [EOS])
            rows.append([(t, 1.0) for t in full + [pad] * (77 - len(full))])
        tokens[s] = rows
    cond = clip.encode_from_tokens(tokens).reshape(len(seqs), 77, -1).float()
    return [cond[i, : len(ids)] for i, ids in enumerate(seqs)]


def check(model, clip, seqs, label, expect="prefix"):
    em = cm.ComfyEditableModel(model, clip)
    assert em.encoding == expect, (label, em.encoding)
    got = em.encode_ids(seqs)
    ref = reference(clip, seqs)
    scale = max(r.abs().max().item() for r in ref)
    err = max((a - b).abs().max().item() for a, b in zip(got, ref))
    assert all(a.shape == b.shape for a, b in zip(got, ref)), label
    print(f"{label}: {len(seqs)} sequences, {len({len(s) for s in seqs})} lengths, max |prefix - encode_from_tokens| "
          f"{err:.2e} of max |state| {scale:.2f}")
    assert err <= 1e-4 * scale, (label, err, scale)
    assert em.encode_ids(seqs[:3])[0] is got[0]  # cached per sequence
    return ref


def lora_for(clip, layers, seed):
    """A LoRA on some fc1 layers of every encoder of the CLIP (ComfyUI's generic key format)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    keys = clip.patcher.model.state_dict()
    for k, w in keys.items():
        if k.endswith("mlp.fc1.weight") and any(f".layers.{i}." in k for i in layers):
            base = "text_encoders." + k[: -len(".weight")]
            sd[base + ".lora_up.weight"] = torch.randn(w.shape[0], 4, generator=g) * 0.5
            sd[base + ".lora_down.weight"] = torch.randn(4, w.shape[1], generator=g) * 0.5
    _, lclip = comfy.sd.load_lora_for_models(None, clip, sd, 0.0, 1.0)
    assert len(lclip.patcher.patches) == len(sd) // 2
    return lclip


def family(label, model, clip, n, layers, skip):
    seqs = sequences(cm.ComfyEditableModel(model, clip), n)
    base = check(model, clip, seqs, label)
    lclip = lora_for(clip, layers, seed=1)
    lora = check(model, lclip, seqs, label + " + LoRA")
    assert max((a - b).abs().max().item() for a, b in zip(lora, base)) > 1e-2, "the LoRA did not change the states"
    again = cm.ComfyEditableModel(model, clip).encode_ids(seqs)  # back to the clone without the LoRA
    assert max((a - b).abs().max().item() for a, b in zip(again, base)) <= 1e-4 * max(b.abs().max().item() for b in base)
    for k in skip:
        sclip = lclip.clone()
        sclip.clip_layer(k)  # CLIPSetLastLayer
        check(model, sclip, seqs, f"{label} + LoRA + CLIPSetLastLayer {k}")


ck = sys.argv[1]
model, clip, _ = comfy.sd.load_checkpoint_guess_config(ck, output_vae=False, output_clip=True)[:3]
wdt = {p.dtype for n, p in clip.cond_stage_model.named_parameters() if n.endswith("fc1.weight")}
print("SD1 CLIP weight dtype", wdt, "on", clip.patcher.load_device)
family("sd1", model, clip, 40, (0, 5, 11), skip=(-2, -1))

# a CLIP class this does not reproduce falls back to encode_from_tokens (exact)
class Custom(type(clip.cond_stage_model)):
    def encode_token_weights(self, token_weight_pairs):
        return super().encode_token_weights(token_weight_pairs)
odd = clip.clone()
odd.cond_stage_model = copy.copy(clip.cond_stage_model)
odd.cond_stage_model.__class__ = Custom
check(model, odd, sequences(cm.ComfyEditableModel(model, clip), 6), "sd1, unknown CLIP class", expect="full")
assert cm.ComfyEditableModel(model, clip, prefix=False).encoding == "full"
masked = copy.copy(clip.cond_stage_model.clip_l)
masked.enable_attention_masks = True  # attention masks change positions after EOS: not claimed
assert cc._reproducible(clip.cond_stage_model.clip_l) and not cc._reproducible(masked)
del model, clip, odd

ST = comfy.sd.CLIPType.STABLE_DIFFUSION
sd2 = comfy.sd.load_text_encoder_state_dicts([random_clip_sd(1024, 24, 2)], clip_type=ST)
assert type(sd2.cond_stage_model).__name__ == "SD2ClipModel", type(sd2.cond_stage_model)
family("sd2", stub_model(1024), sd2, 12, (0, 22), skip=(-2, -3))
del sd2

sdxl = comfy.sd.load_text_encoder_state_dicts([random_clip_sd(768, 12, 3), random_clip_sd(1280, 32, 4)], clip_type=ST)
assert type(sdxl.cond_stage_model).__name__ == "SDXLClipModel", type(sdxl.cond_stage_model)
family("sdxl", stub_model(2048), sdxl, 8, (0, 10, 30), skip=(-3,))
print("ENCODING OK")
'''

HOST = PRELUDE + r'''
import folder_paths
host = import_module(pkg + ".adapters.comfy_host")
edit_nodes = import_module(pkg + ".nodes.edit_nodes")
common = import_module(pkg + ".nodes.common")
sm = import_module(pkg + ".engines.second_moments")
base, home = Path(os.environ["CE_BASE"]), Path(os.environ["HOME"])
assert Path(folder_paths.models_dir) == base / "models"
model, clip, _ = comfy.sd.load_checkpoint_guess_config(sys.argv[1], output_vae=False, output_clip=True)[:3]

calls = []
def recorder(value, total, preview, node_id=None, prompt_id=None):
    calls.append((value, total))
comfy.utils.set_progress_bar_global_hook(recorder)

def check_bar(calls, label):
    """Each phase starts at 0, only moves forward and ends at its total."""
    assert calls, label + ": ComfyUI's progress bar was never updated"
    phases = []
    for v, t in calls:
        if v == 0 or not phases:
            phases.append([])
        phases[-1].append((v, t))
    for ph in phases:
        vs = [v for v, _ in ph]
        assert vs == sorted(vs) and vs[-1] == ph[0][1] and len({t for _, t in ph}) == 1, (label, ph)
    print(f"{label}: {len(calls)} progress updates in {len(phases)} phases, totals {[ph[0][1] for ph in phases]}")
    return phases

# 1. a UCE edit through the node logic, wrapped as the nodes wrap compute_delta
concepts = ", ".join(["Van Gogh", "Monet", "Picasso", "a cat", "Rembrandt", "Dali", "Vermeer", "Klimt", "Turner"])
plan = common.make_plan(common.erase_edits(concepts, "style", ""), "uce", ["a dog", "a red car"], ["{}", "a painting by {}"], {})
with host.comfy_host():
    out = edit_nodes.run_edit(model, clip, plan)
assert len(out["result"][2].layers) == 32
check_bar(calls, "UCE")

# 2. Cancel: ComfyUI's interrupt raised from the progress hook stops the edit, inputs untouched
calls.clear()
def cancel_on_third(value, total, preview, node_id=None, prompt_id=None):
    calls.append((value, total))
    if len(calls) == 3:
        comfy.model_management.interrupt_current_processing(True)
    comfy.model_management.throw_exception_if_processing_interrupted()  # what the server's hook does
comfy.utils.set_progress_bar_global_hook(cancel_on_third)
patches_before = dict(model.patches)
try:
    with host.comfy_host():
        edit_nodes.run_edit(model, clip, plan)
    raise SystemExit("the edit ran on after Cancel")
except comfy.model_management.InterruptProcessingException:
    pass
assert len(calls) == 3 and model.patches == patches_before
comfy.utils.set_progress_bar_global_hook(recorder)

# 3. caches: C0 goes under ComfyUI's base directory (models/concept_edit), never HOME
assert sm.default_cache_dir() == home / ".cache" / "concept_edit" / "covariance"  # outside ComfyUI's context
calls.clear()
eplan = common.make_plan(common.erase_edits("Van Gogh", "style", ""), "emcid", ["Monet"], ["{}"],
                         {"targets": "dest_hidden", "layers": [10]})
with host.comfy_host():
    assert sm.default_cache_dir() == base / "models" / "concept_edit" / "covariance"
    out = edit_nodes.run_edit(model, clip, eplan, site="text_encoder")
assert out["result"][2].layers
c0 = sorted((base / "models" / "concept_edit" / "covariance").glob("c0_*.safetensors"))
assert len(c0) == 1, list(base.rglob("*"))
assert folder_paths.get_folder_paths("concept_edit") == [str(base / "models" / "concept_edit")]
written = [p for p in home.rglob("*")]
assert not written, f"files in HOME: {written[:10]}"
check_bar(calls, "EMCID")
print(f"C0 cache: {c0[0].relative_to(base)} ({c0[0].stat().st_size / 1e6:.1f} MB)")
os.environ["CONCEPT_EDIT_CACHE"] = str(base / "mine")  # the user's choice wins over ComfyUI's folder
with host.comfy_host():
    assert sm.default_cache_dir() == base / "mine" / "covariance"
print("HOST OK")
'''


def _run(tmp_path, name, script, *extra_env, timeout=1800):
    ck = e2e.ensure_checkpoint()
    path = tmp_path / f"{name}.py"
    path.write_text(script)
    env = {k: v for k, v in os.environ.items() if k != "CONCEPT_EDIT_CACHE"}
    env.update({"COMFYUI_PATH": str(e2e.comfy_path()), "CE_REPO": str(e2e.REPO), "TQDM_DISABLE": "1"}, **dict(extra_env))
    out = subprocess.run([e2e.comfy_python(), str(path), str(ck)], capture_output=True, text=True,
                         cwd=str(tmp_path), env=env, timeout=timeout)
    print(out.stdout[-3000:])
    return out


def test_prefix_encoding_equals_encode_from_tokens(tmp_path):
    out = _run(tmp_path, "encoding_check", ENCODING)
    assert out.returncode == 0 and "ENCODING OK" in out.stdout, out.stdout[-3000:] + out.stderr[-6000:]


def test_progress_bar_cancel_and_cache_folder_in_comfyui(tmp_path):
    (tmp_path / "home").mkdir()
    out = _run(tmp_path, "host_check", HOST, ("CE_BASE", str(tmp_path / "comfy_base")), ("HOME", str(tmp_path / "home")))
    assert out.returncode == 0 and "HOST OK" in out.stdout, out.stdout[-3000:] + out.stderr[-6000:]
