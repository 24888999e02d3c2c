"""End-to-end: a real ComfyUI, headless on the CPU, runs every example workflow through its HTTP API.

Skipped unless ``COMFYUI_PATH`` points at a ComfyUI checkout. ``COMFYUI_PYTHON`` is the Python
with ComfyUI's requirements (and diffusers) installed; default: this interpreter.

The server runs with ``--base-directory`` in a temporary folder whose ``custom_nodes/ConceptEdit``
links to this repository, so the user's ComfyUI folder is never written to. The checkpoint has
SD 1.5's shapes with random weights; it is made once (diffusers initialisation, saved through
ComfyUI's own ``save_checkpoint``) and cached in ``$COMFYUI_TEST_CACHE`` (set it to keep the file
between runs, as .ci/run does; otherwise it lives in the session's temporary home).

The example workflows are the UI-format files users drag in; this test converts them to API
prompts with the server's ``/object_info`` (so the committed files are what is tested), makes
them CPU-sized (64x64, 2 steps), queues them with POST /prompt and polls /history.

Graphs with core nodes: an edit node into CheckpointSave changes exactly the edited tensors, by the
delta; Save Concept Delta into LoraLoader gives the edit node's weights; a LoRA, two chained edit
nodes and an unedited branch from the same loader; bad node inputs reach the UI as messages.
"""
from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = REPO / "example_workflows"
# the random-weight test checkpoint (1.7 GB); COMFYUI_TEST_CACHE keeps it between runs (.ci/run sets it)
CACHE = Path(os.environ.get("COMFYUI_TEST_CACHE") or Path(os.environ.get("CONCEPT_EDIT_CACHE", Path.home() / ".cache" / "concept_edit")) / "comfyui_test")
CKPT_NAME = "concept_edit_sd15_random.safetensors"
CKPT_VERSION = "1"

MAKE_CHECKPOINT = r'''
import os, sys, tempfile, torch
sys.path.insert(0, os.environ["COMFYUI_PATH"])
out = sys.argv[1]
torch.manual_seed(0)
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel
tmp = tempfile.mkdtemp()
def save(sd, sub, name):
    os.makedirs(os.path.join(tmp, sub), exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, os.path.join(tmp, sub, name))
unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
save({k: v.half() for k, v in unet.state_dict().items()}, "unet", "diffusion_pytorch_model.safetensors"); del unet
vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                    up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4, sample_size=512)
save(vae.state_dict(), "vae", "diffusion_pytorch_model.safetensors"); del vae
te = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                  num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu"))
sd = {(k if k.startswith("text_model.") else "text_model." + k): v for k, v in te.state_dict().items()}
save(sd, "text_encoder", "model.safetensors"); del te
from comfy.cli_args import args
args.cpu = True
import comfy.diffusers_load, comfy.sd
model, clip, vae = comfy.diffusers_load.load_diffusers(tmp)
assert type(model.model.model_config).__name__ == "SD15", type(model.model.model_config).__name__
tmp_out = out[: -len(".safetensors")] + ".partial.safetensors"
comfy.sd.save_checkpoint(tmp_out, model, clip, vae)
os.replace(tmp_out, out)
'''


# ----------------------------------------------------------------------------------- helpers
def comfy_python() -> str:
    return os.environ.get("COMFYUI_PYTHON", sys.executable)


def comfy_path() -> Path | None:
    p = os.environ.get("COMFYUI_PATH")
    return Path(p) if p and (Path(p) / "main.py").exists() else None


def ensure_checkpoint() -> Path:
    CACHE.mkdir(parents=True, exist_ok=True)
    ck = CACHE / f"sd15_random_v{CKPT_VERSION}.safetensors"
    if not ck.exists():
        env = {**os.environ, "COMFYUI_PATH": str(comfy_path())}
        subprocess.run([comfy_python(), "-c", MAKE_CHECKPOINT, str(ck)], check=True, env=env, cwd=str(comfy_path()),
                       timeout=1800, stdout=subprocess.DEVNULL)
    return ck


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    def __init__(self, base: Path, port: int, proc: subprocess.Popen, log: Path):
        self.base, self.port, self.proc, self.log = base, port, proc, log
        self.url = f"http://127.0.0.1:{port}"

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=60) as r:
            return json.loads(r.read())

    def post(self, path: str, data: dict):
        req = urllib.request.Request(self.url + path, json.dumps(data).encode(), {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            raise AssertionError(f"POST {path} failed: {e.code} {e.read().decode()[:2000]}") from e

    def run(self, prompt: dict, timeout: float = 1500) -> dict:
        pid = self.post("/prompt", {"prompt": prompt, "client_id": "concept-edit-test"})["prompt_id"]
        t0 = time.time()
        while time.time() - t0 < timeout:
            h = self.get(f"/history/{pid}")
            if pid in h:
                entry = h[pid]
                status = entry.get("status", {})
                if status.get("completed") or status.get("status_str") in ("success", "error"):
                    assert status.get("status_str") == "success", json.dumps(status)[:4000] + "\n" + self.tail()
                    return entry
            if self.proc.poll() is not None:
                raise AssertionError("ComfyUI exited:\n" + self.tail())
            time.sleep(1.0)
        raise AssertionError(f"prompt {pid} did not finish in {timeout}s\n" + self.tail())

    def run_error(self, prompt: dict, timeout: float = 600) -> dict:
        """Queue ``prompt``, expecting it to fail while executing: the ``execution_error`` message the
        UI receives (node type, exception type and message)."""
        pid = self.post("/prompt", {"prompt": prompt, "client_id": "concept-edit-test"})["prompt_id"]
        t0 = time.time()
        while time.time() - t0 < timeout:
            entry = self.get(f"/history/{pid}").get(pid)
            if entry and entry.get("status", {}).get("completed") is not None and entry["status"].get("status_str"):
                status = entry["status"]
                assert status["status_str"] == "error", "expected an error, the prompt succeeded"
                return next(m[1] for m in status["messages"] if m[0] == "execution_error")
            time.sleep(1.0)
        raise AssertionError(f"prompt {pid} did not finish in {timeout}s\n" + self.tail())

    def tail(self, n: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def start_server(base: Path) -> ComfyServer:
    """ComfyUI on a free loopback port with its folders under ``base`` and this pack installed."""
    for d in ("custom_nodes", "models/checkpoints", "models/loras", "output", "input", "temp", "user"):
        (base / d).mkdir(parents=True, exist_ok=True)
    link = base / "custom_nodes" / "ConceptEdit"
    if not link.exists():
        link.symlink_to(REPO, target_is_directory=True)
    ck = base / "models" / "checkpoints" / CKPT_NAME
    if not ck.exists():
        ck.symlink_to(ensure_checkpoint())
    port = free_port()
    log = base / "comfyui.log"
    proc = subprocess.Popen(
        [comfy_python(), "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--base-directory", str(base),
         "--disable-auto-launch", "--dont-print-server"],
        cwd=str(comfy_path()), stdout=log.open("w"), stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1"},
    )
    srv = ComfyServer(base, port, proc, log)
    t0 = time.time()
    while time.time() - t0 < 300:
        if proc.poll() is not None:
            raise RuntimeError("ComfyUI failed to start:\n" + srv.tail())
        try:
            srv.get("/system_stats")
            return srv
        except Exception:
            time.sleep(1.0)
    srv.stop()
    raise RuntimeError("ComfyUI did not start in 300 s:\n" + srv.tail())


WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
# nodes registered after release 0.1 (its interface snapshot: tests/data/node_interface_0.1.json)
ADDED_SINCE_0_1 = {"ConceptEditRECEErase", "ConceptEditRECEReplace", "ConceptEditSPEEDErase", "ConceptEditSPEEDReplace",
                   "ConceptEditSPEEDModerate", "ConceptEditSPEEDDebias"}


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    """Convert a UI-format workflow (nodes + links) into an API prompt using /object_info."""
    links = {l[0]: l for l in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        if node.get("mode", 0) in (2, 4) or node["type"] in ("Note", "MarkdownNote", "Reroute", "PrimitiveNode"):
            continue
        info = object_info[node["type"]]
        linked = {i["name"]: i["link"] for i in node.get("inputs", []) if i.get("link") is not None}
        values = list(node.get("widgets_values") or [])
        order = info.get("input_order") or {s: list(info["input"].get(s, {})) for s in ("required", "optional")}
        inputs = {}
        for section in ("required", "optional"):
            for name in order.get(section, []):
                spec = info["input"][section][name]
                typ, opts = spec[0], (spec[1] if len(spec) > 1 else {})
                is_widget = isinstance(typ, list) or typ in WIDGET_TYPES
                if name in linked:
                    l = links[linked[name]]
                    inputs[name] = [str(l[1]), l[2]]
                    if is_widget and values:
                        values.pop(0)
                    continue
                if not is_widget:
                    continue
                if not values:
                    break
                inputs[name] = values.pop(0)
                if opts.get("control_after_generate") and values and values[0] in ("fixed", "increment", "decrement", "randomize"):
                    values.pop(0)
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


def cpu_sized(prompt: dict, ckpt: str = CKPT_NAME, *, steps: int = 2, size: int = 64, max_batch: int = 2) -> dict:
    p = copy.deepcopy(prompt)
    for n in p.values():
        c, i = n["class_type"], n["inputs"]
        if c == "CheckpointLoaderSimple":
            i["ckpt_name"] = ckpt
        elif c == "KSampler":
            i["steps"] = steps
        elif c == "EmptyLatentImage":
            i["width"] = i["height"] = size
            i["batch_size"] = min(i["batch_size"], max_batch)
    return p


def load_workflow(name: str) -> dict:
    return json.loads((WORKFLOWS / name).read_text())


def node_outputs(entry: dict, class_type: str, prompt: dict) -> list[dict]:
    return [entry["outputs"][nid] for nid, n in prompt.items() if n["class_type"] == class_type and nid in entry["outputs"]]


# ----------------------------------------------------------------------------------- tests
if "pytest" in sys.modules:  # the module is also run as a script (python test_comfyui_e2e.py make-checkpoint)
    import numpy as np
    import pytest
    import torch

    pytestmark = pytest.mark.skipif(comfy_path() is None, reason="no ComfyUI: set COMFYUI_PATH and COMFYUI_PYTHON (../shared/comfyui/install.sh DEST prints both; .ci/run does it all)")

    @pytest.fixture(scope="module")
    def server(tmp_path_factory):
        srv = start_server(tmp_path_factory.mktemp("comfyui"))
        try:
            yield srv
        finally:
            srv.stop()

    @pytest.fixture(scope="module")
    def object_info(server):
        return server.get("/object_info")

    def _images(server, entry, prompt, prefix):
        """Images a SaveImage node wrote with ``filename_prefix`` ending in ``prefix``."""
        from PIL import Image

        out = []
        for o in node_outputs(entry, "SaveImage", prompt):
            for im in sorted(o.get("images", []), key=lambda i: i["filename"]):
                if im["filename"].startswith(prefix + "_0"):
                    p = server.base / "output" / im.get("subfolder", "") / im["filename"]
                    out.append(np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) / 255)
        return out

    def interface(info: dict) -> dict:
        """A node's /object_info reduced to what saved workflows depend on (as in tests/data)."""
        rows = []
        for sec in ("required", "optional"):
            for name in info["input_order"].get(sec, []):
                typ, opts = info["input"][sec][name][0], (info["input"][sec][name] + [{}])[1]
                if typ == "COMBO" or isinstance(typ, list):
                    rows.append([sec, name, "COMBO", opts.get("options") if typ == "COMBO" else typ])
                else:
                    rows.append([sec, name, typ])
        return {"inputs": rows, "output": info["output"], "output_name": info["output_name"],
                "output_node": info["output_node"]}

    def test_pack_registered_with_the_interface_saved_workflows_use(server, object_info):
        """The V3 nodes ComfyUI registered have the ids, inputs (names, kinds, order) and outputs of the
        V1 nodes of release 0.1, so workflows saved with it load; later inputs may only be appended."""
        old = json.loads((REPO / "tests" / "data" / "node_interface_0.1.json").read_text())
        ours = sorted(k for k, v in object_info.items() if v.get("python_module", "").endswith("ConceptEdit"))
        assert set(old) <= set(ours), f"registered {ours}"
        assert set(ours) - set(old) == ADDED_SINCE_0_1, f"registered {ours}"
        for node_id, want in old.items():
            got = interface(object_info[node_id])
            if node_id == "ConceptEditLoadDelta":
                for row in got["inputs"]:
                    if row[1] == "delta_name":
                        row[3] = "<files in models/loras>"
            assert got["inputs"][: len(want["inputs"])] == want["inputs"], node_id
            assert all(r[0] == "optional" for r in got["inputs"][len(want["inputs"]):]), node_id
            assert {k: got[k] for k in ("output", "output_name", "output_node")} == \
                   {k: want[k] for k in ("output", "output_name", "output_node")}, node_id

    def test_template_browser_lists_the_workflows_with_thumbnails(server):
        names = sorted(p.stem for p in WORKFLOWS.glob("*.json"))
        assert sorted(server.get("/workflow_templates")["ConceptEdit"]) == names
        for name in names:
            with urllib.request.urlopen(f"{server.url}/api/workflow_templates/ConceptEdit/{name}.jpg", timeout=60) as r:
                assert r.headers["Content-Type"] == "image/jpeg" and r.read(3) == b"\xff\xd8\xff", name

    def test_flux_workflow_fits_the_servers_nodes(object_info):
        """The FLUX example does not run here (FLUX.1's files are 30 GB; the UCE node on ComfyUI's FLUX
        objects is run on the smallest FLUX ComfyUI detects in test_comfyui_flux.py), but it converts
        with this server's /object_info: every node exists, every required input is given, and every
        widget value is one the server accepts (its model file names aside)."""
        prompt = ui_to_api(load_workflow("flux_erase_artist_style.json"), object_info)
        files = {("UNETLoader", "unet_name"), ("DualCLIPLoader", "clip_name1"), ("DualCLIPLoader", "clip_name2"),
                 ("VAELoader", "vae_name")}
        assert {n["class_type"] for n in prompt.values()} >= {"UNETLoader", "DualCLIPLoader", "ConceptEditUCEErase"}
        for n in prompt.values():
            c, info = n["class_type"], object_info[n["class_type"]]
            specs = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
            assert set(info["input"].get("required", {})) <= set(n["inputs"]), (c, set(info["input"]["required"]) - set(n["inputs"]))
            for name, v in n["inputs"].items():
                typ, opts = specs[name][0], (specs[name] + [{}])[1]
                if isinstance(v, list) or (c, name) in files:  # a link, or a file on the user's disk
                    continue
                if isinstance(typ, list) or typ == "COMBO":
                    assert v in (typ if isinstance(typ, list) else opts["options"]), (c, name, v)
                elif typ in ("INT", "FLOAT"):
                    assert opts.get("min", v) <= v <= opts.get("max", v), (c, name, v)
                else:
                    assert isinstance(v, {"STRING": str, "BOOLEAN": bool}[typ]), (c, name, v)
        (edit,) = [n for n in prompt.values() if n["class_type"] == "ConceptEditUCEErase"]
        assert edit["inputs"]["concepts"] == "Van Gogh" and edit["inputs"]["layers"] == "kv"

    @pytest.fixture(scope="module")
    def erased(server, object_info):
        prompt = cpu_sized(ui_to_api(load_workflow("erase_artist_style_save_lora.json"), object_info))
        return prompt, server.run(prompt)

    def test_erase_and_save_lora(server, erased):
        from safetensors import safe_open

        prompt, entry = erased
        (edit_ui,) = node_outputs(entry, "ConceptEditUCEErase", prompt)
        s = edit_ui["concept_edit"][0]
        assert s["method"] == "uce" and s["family"] == "sd1"
        assert s["layers"] == 32 and s["max_rank"] >= 1  # SD 1.5: 16 attn2 blocks x (to_k, to_v)
        assert s["residual_error"]["max"] < 0.1
        (save_ui,) = node_outputs(entry, "ConceptEditSaveDelta", prompt)
        rel = save_ui["concept_edit_saved"][0]
        path = server.base / "models" / "loras" / rel
        assert path.exists()
        with safe_open(str(path), "pt") as f:
            keys = list(f.keys())
        assert len(keys) == 3 * 32 and all(k.startswith("lora_unet_") for k in keys)
        assert len(_images(server, entry, prompt, "erased")) == 1

    def test_comfy_lora_loader_loads_every_key(server, erased):
        """ComfyUI's own LoraLoader takes the saved file with no 'lora key not loaded' warnings."""
        prompt, entry = erased
        rel = node_outputs(entry, "ConceptEditSaveDelta", prompt)[0]["concept_edit_saved"][0]
        before = server.log.read_text(errors="replace").count("lora key not loaded")
        api = {
            "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT_NAME}},
            "2": {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1], "lora_name": rel,
                                                         "strength_model": 1.0, "strength_clip": 1.0}},
            "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 1], "text": "a cat"}},
            "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
            "5": {"class_type": "KSampler", "inputs": {"model": ["2", 0], "positive": ["3", 0], "negative": ["3", 0],
                                                       "latent_image": ["4", 0], "seed": 1, "steps": 1, "cfg": 1.0,
                                                       "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
            "6": {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": "concept_edit/lora_loader"}},
        }
        server.run(api)
        log = server.log.read_text(errors="replace")
        assert log.count("lora key not loaded") == before, server.tail()

    def test_load_delta_and_sample(server, object_info, erased):
        prompt0, entry0 = erased
        rel = node_outputs(entry0, "ConceptEditSaveDelta", prompt0)[0]["concept_edit_saved"][0]
        prompt = cpu_sized(ui_to_api(load_workflow("load_delta_and_sample.json"), object_info))
        for n in prompt.values():
            if n["class_type"] == "ConceptEditLoadDelta":
                n["inputs"]["delta_name"] = rel
        entry = server.run(prompt)
        (ui,) = node_outputs(entry, "ConceptEditLoadDelta", prompt)
        s = ui["concept_edit"][0]
        assert s["layers"] == 32 and s["metadata"]["method"] == "uce"
        assert s["metadata"]["edits"][0]["source"] == "Van Gogh"
        imgs = _images(server, entry, prompt, "loaded_delta")
        assert len(imgs) == 1 and np.isfinite(imgs[0]).all()

    def test_attention_maps_before_after(server, object_info):
        prompt = cpu_sized(ui_to_api(load_workflow("attention_maps_before_after_edit.json"), object_info))
        entry = server.run(prompt)
        heat = node_outputs(entry, "ConceptEditAttentionHeatmaps", prompt)
        assert len(heat) == 2
        for h in heat:
            info = h["concept_edit_attention"][0]
            assert info["words"] == ["Van Gogh", "cat"] and not info["missing"]
            assert info["layers"] == 16 and info["steps"] >= 2  # every attn2 block, every step
            assert [t["text"] for t in info["tokens"]][:3] == ["a", "painting", "by"]
        before = _images(server, entry, prompt, "attn_before")
        after = _images(server, entry, prompt, "attn_after")
        assert len(before) == 2 and len(after) == 2  # one heatmap per word
        assert all(img.shape[:2] == (64, 64) for img in before + after)
        assert all(img.std() > 0.01 for img in before + after)  # not blank
        # the edit changes what the artist's tokens do: the before/after heatmaps differ
        assert max(float(np.abs(b - a).max()) for b, a in zip(before, after)) > 0.01

    def test_debias(server, object_info):
        prompt = cpu_sized(ui_to_api(load_workflow("debias_profession.json"), object_info))
        entry = server.run(prompt)
        (ui,) = node_outputs(entry, "ConceptEditUCEDebias", prompt)
        s = ui["concept_edit"][0]
        assert s["concepts"] == ["debias doctor: male, female"] and s["layers"] == 32
        assert len(_images(server, entry, prompt, "debias_doctor")) == 2

    # ------------------------------------------------------------- graphs with core nodes
    def _api(*nodes) -> dict:
        """An API prompt from (class_type, inputs) pairs, numbered from 1."""
        return {str(i + 1): {"class_type": c, "inputs": inp} for i, (c, inp) in enumerate(nodes)}

    def _sample(model, clip, text: str, prefix: str, vae=("1", 2)) -> list:
        """CLIPTextEncode + EmptyLatentImage + KSampler (seeded) + VAEDecode + SaveImage, as (class_type,
        inputs) pairs whose links to each other are "@i" (the block's i-th node); see _with_samplers."""
        return [("CLIPTextEncode", {"clip": clip, "text": text}),
                ("EmptyLatentImage", {"width": 64, "height": 64, "batch_size": 1}),
                ("KSampler", {"model": model, "positive": ["@0", 0], "negative": ["@0", 0], "latent_image": ["@1", 0],
                              "seed": 7, "steps": 2, "cfg": 1.0, "sampler_name": "euler", "scheduler": "normal",
                              "denoise": 1.0}),
                ("VAEDecode", {"samples": ["@2", 0], "vae": list(vae)}),
                ("SaveImage", {"images": ["@3", 0], "filename_prefix": prefix})]

    def _with_samplers(base: list, *samplers: list) -> dict:
        nodes = list(base)
        for block in samplers:
            start = len(nodes) + 1
            for c, inp in block:
                inp = {k: ([str(start + int(v[0][1:])), v[1]] if isinstance(v, list) and str(v[0]).startswith("@") else v)
                       for k, v in inp.items()}
                nodes.append((c, inp))
        return _api(*nodes)

    def _single_file_keys() -> dict:
        """canonical layer name -> key in a checkpoint ComfyUI saved for the test model (SD 1.5 layout)."""
        from concept_edit.adapters.ldm_keymap import canonical_to_single_file_keys

        cfg = json.loads((REPO / "bench" / "configs" / "sd15_unet.json").read_text())
        return canonical_to_single_file_keys({"unet": cfg}, family="sd1")

    def _changes(a: Path, b: Path) -> dict:
        """key -> float64 difference b - a for every tensor that differs (the files must have the same keys)."""
        import torch
        from safetensors import safe_open

        out = {}
        with safe_open(str(a), "pt") as fa, safe_open(str(b), "pt") as fb:
            assert set(fa.keys()) == set(fb.keys())
            for k in fa.keys():
                x, y = fa.get_tensor(k), fb.get_tensor(k)
                if not torch.equal(x, y):
                    out[k] = y.double() - x.double()
        return out

    def _output_file(server, prefix: str) -> Path:
        (f,) = sorted((server.base / "output").glob(prefix + "_*.safetensors"))
        return f

    @pytest.fixture(scope="module")
    def checkpoint_save(server):
        """An edit node into core CheckpointSave, and the delta it computed saved beside it."""
        prompt = _api(
            ("CheckpointLoaderSimple", {"ckpt_name": CKPT_NAME}),
            ("ConceptEditUCEErase", {"model": ["1", 0], "clip": ["1", 1], "concepts": "Van Gogh", "concept_type": "style",
                                     "guide": "", "preserve": "Monet", "lambda_": 0.5, "strength": 1.0}),
            ("ConceptEditSaveDelta", {"delta": ["2", 2], "filename_prefix": "concept_edit/for_checkpoint"}),
            ("CheckpointSave", {"model": ["2", 0], "clip": ["2", 1], "vae": ["1", 2], "filename_prefix": "checkpoints/edited"}),
        )
        entry = server.run(prompt)
        rel = node_outputs(entry, "ConceptEditSaveDelta", prompt)[0]["concept_edit_saved"][0]
        return rel, _output_file(server, "checkpoints/edited")

    def test_checkpoint_save_changes_exactly_the_edited_tensors_by_the_delta(server, checkpoint_save):
        from concept_edit.files.formats import load_delta

        rel, edited = checkpoint_save
        delta = load_delta(server.base / "models" / "loras" / rel)
        keys = _single_file_keys()
        changed = _changes(server.base / "models" / "checkpoints" / CKPT_NAME, edited)
        assert set(changed) == {keys[n] for n in delta.layers} and len(changed) == 32
        for n, ld in delta.layers.items():
            d = ld.dense(torch.float64)
            err = (changed[keys[n]] - d).abs().max().item()
            assert err <= 1e-5 * d.abs().max().item() + 1e-7, (n, err)

    def test_core_lora_loader_gives_the_edit_nodes_weights(server, checkpoint_save):
        """Save Concept Delta -> core LoraLoader: no key left unloaded, and the model it patches, saved by
        CheckpointSave, equals the edit node's."""
        rel, edited = checkpoint_save
        before = server.log.read_text(errors="replace").count("lora key not loaded")
        server.run(_api(
            ("CheckpointLoaderSimple", {"ckpt_name": CKPT_NAME}),
            ("LoraLoader", {"model": ["1", 0], "clip": ["1", 1], "lora_name": rel, "strength_model": 1.0, "strength_clip": 1.0}),
            ("CheckpointSave", {"model": ["2", 0], "clip": ["2", 1], "vae": ["1", 2], "filename_prefix": "checkpoints/lora_loaded"}),
        ))
        assert server.log.read_text(errors="replace").count("lora key not loaded") == before, server.tail()
        loaded = _output_file(server, "checkpoints/lora_loaded")
        try:
            diff = _changes(edited, loaded)
            assert all(v.abs().max().item() <= 1e-6 for v in diff.values()), {k: v.abs().max().item() for k, v in diff.items()}
        finally:
            loaded.unlink()

    def test_lora_then_chained_edits_and_an_unedited_branch(server, checkpoint_save):
        """A LoRA loaded before two chained edit nodes: the saved checkpoint is W0 + LoRA + both deltas
        (the second computed on the first's output); the same loaded model also feeds an unedited
        sampler, whose image equals that of a graph without the edit nodes."""
        from concept_edit.files.formats import load_delta

        rel, edited = checkpoint_save
        base = [
            ("CheckpointLoaderSimple", {"ckpt_name": CKPT_NAME}),
            ("LoraLoader", {"model": ["1", 0], "clip": ["1", 1], "lora_name": rel, "strength_model": 0.5, "strength_clip": 0.5}),
            ("ConceptEditUCEReplace", {"model": ["2", 0], "clip": ["2", 1], "replacements": "cat -> dog", "preserve": "",
                                       "lambda_": 0.5, "strength": 1.0}),
            ("ConceptEditUCEErase", {"model": ["3", 0], "clip": ["3", 1], "concepts": "Monet", "concept_type": "style",
                                     "guide": "", "preserve": "", "lambda_": 0.5, "strength": 1.0}),
            ("ConceptEditSaveDelta", {"delta": ["3", 2], "filename_prefix": "chain/first"}),
            ("ConceptEditSaveDelta", {"delta": ["4", 2], "filename_prefix": "chain/second"}),
            ("CheckpointSave", {"model": ["4", 0], "clip": ["4", 1], "vae": ["1", 2], "filename_prefix": "checkpoints/chain"}),
        ]
        prompt = _with_samplers(base, _sample(["4", 0], ["4", 1], "a cat", "chain_edited"),
                                _sample(["1", 0], ["1", 1], "a cat", "chain_unedited"))
        entry = server.run(prompt)
        plain = _with_samplers([base[0]], _sample(["1", 0], ["1", 1], "a cat", "plain"))
        entry_plain = server.run(plain)
        (e,), (u,), (p0,) = (_images(server, entry, prompt, "chain_edited"), _images(server, entry, prompt, "chain_unedited"),
                             _images(server, entry_plain, plain, "plain"))
        assert np.array_equal(u, p0), "the unedited branch changed"
        assert not np.array_equal(e, p0)

        loras = server.base / "models" / "loras"
        lora, d1, d2 = load_delta(loras / rel), load_delta(loras / "chain" / "first_00001_.safetensors"), \
            load_delta(loras / "chain" / "second_00001_.safetensors")
        assert d2.metadata["base_fingerprint"] != d1.metadata["base_fingerprint"]  # computed on the first edit's output
        keys = _single_file_keys()
        chain = _output_file(server, "checkpoints/chain")
        try:
            changed = _changes(server.base / "models" / "checkpoints" / CKPT_NAME, chain)
        finally:
            chain.unlink()
        assert set(changed) == {keys[n] for n in lora.layers}
        for n in lora.layers:
            want = 0.5 * lora.layers[n].dense(torch.float64) + d1.layers[n].dense(torch.float64) + d2.layers[n].dense(torch.float64)
            err = (changed[keys[n]] - want).abs().max().item()
            assert err <= 1e-5 * want.abs().max().item() + 1e-7, (n, err)

    def test_rece_then_speed_in_a_graph(server):
        """RECE Erase then SPEED Erase (computed on RECE's output) in one graph, each delta saved, the
        result sampled and baked by CheckpointSave: the checkpoint is W0 + both deltas on exactly the
        edited tensors (RECE: to_k and to_v, SPEED: to_v by default)."""
        from concept_edit.files.formats import load_delta

        base = [
            ("CheckpointLoaderSimple", {"ckpt_name": CKPT_NAME}),
            ("ConceptEditRECEErase", {"model": ["1", 0], "clip": ["1", 1], "concepts": "Van Gogh", "concept_type": "style",
                                      "guide": "", "preserve": "Monet", "lambda_": 0.5, "strength": 1.0, "epochs": 2}),
            ("ConceptEditSPEEDErase", {"model": ["2", 0], "clip": ["2", 1], "concepts": "Picasso", "concept_type": "style",
                                       "guide": "", "preserve": "Monet", "strength": 1.0}),
            ("ConceptEditSaveDelta", {"delta": ["2", 2], "filename_prefix": "methods/rece"}),
            ("ConceptEditSaveDelta", {"delta": ["3", 2], "filename_prefix": "methods/speed"}),
            ("CheckpointSave", {"model": ["3", 0], "clip": ["3", 1], "vae": ["1", 2], "filename_prefix": "checkpoints/methods"}),
        ]
        prompt = _with_samplers(base, _sample(["3", 0], ["3", 1], "a painting by Picasso", "methods"))
        entry = server.run(prompt)
        (rece_ui,), (speed_ui,) = node_outputs(entry, "ConceptEditRECEErase", prompt), node_outputs(entry, "ConceptEditSPEEDErase", prompt)
        r, sp = rece_ui["concept_edit"][0], speed_ui["concept_edit"][0]
        assert r["method"] == "rece" and r["layers"] == 32 and r["concepts"] == ["erase Van Gogh -> art"], r
        assert sp["method"] == "speed" and sp["layers"] == 16 and sp["concepts"] == ["erase Picasso -> art"], sp
        assert len(_images(server, entry, prompt, "methods")) == 1

        loras = server.base / "models" / "loras" / "methods"
        d_rece, d_speed = load_delta(loras / "rece_00001_.safetensors"), load_delta(loras / "speed_00001_.safetensors")
        assert [e["epoch"] for e in d_rece.metadata["rece_epochs"]] == [1, 2]  # the epochs widget reached the engine
        assert d_speed.metadata["base_fingerprint"] != d_rece.metadata["base_fingerprint"]  # computed on RECE's output
        assert all(n.endswith("attn2.to_v") for n in d_speed.layers)
        keys = _single_file_keys()
        out = _output_file(server, "checkpoints/methods")
        try:
            changed = _changes(server.base / "models" / "checkpoints" / CKPT_NAME, out)
        finally:
            out.unlink()
        assert set(changed) == {keys[n] for n in d_rece.layers}
        for n in d_rece.layers:
            want = d_rece.layers[n].dense(torch.float64)
            if n in d_speed.layers:
                want = want + d_speed.layers[n].dense(torch.float64)
            err = (changed[keys[n]] - want).abs().max().item()
            assert err <= 1e-5 * want.abs().max().item() + 1e-7, (n, err)

    def test_a_setting_without_effect_is_a_message_in_the_ui(server):
        """RECE's per-round ridge changed while each round re-solves from the original weights (update:
        resolve), which does not use it: the node refuses it, naming the setting."""
        prompt = _api(("CheckpointLoaderSimple", {"ckpt_name": CKPT_NAME}),
                      ("ConceptEditRECEErase", {"model": ["1", 0], "clip": ["1", 1], "concepts": "Van Gogh",
                                                "concept_type": "style", "guide": "", "preserve": "", "lambda_": 0.5,
                                                "strength": 1.0, "update": "resolve", "adv_ridge": 0.3}),
                      ("ConceptEditSaveDelta", {"delta": ["2", 2], "filename_prefix": "concept_edit/bad"}))
        err = server.run_error(prompt)
        assert err["node_type"] == "ConceptEditRECEErase", err
        assert "adv_ridge has no effect with update: resolve" in err["exception_message"], err

    # ------------------------------------------------------------- bad inputs reach the UI as messages
    def _uce(**over):
        inputs = {"model": ["1", 0], "clip": ["1", 1], "concepts": "Van Gogh", "concept_type": "style", "guide": "",
                  "preserve": "", "lambda_": 0.5, "strength": 1.0, **over}
        return _api(("CheckpointLoaderSimple", {"ckpt_name": CKPT_NAME}), ("ConceptEditUCEErase", inputs),
                    ("ConceptEditSaveDelta", {"delta": ["2", 2], "filename_prefix": "concept_edit/bad"}))

    @pytest.mark.parametrize("over,message", [
        ({"strength": float("nan")}, "strength must be a finite number"),
        ({"lambda_": 0.0, "erase_scale": 0.0, "preserve_scale": 0.0}, "erase_scale"),
        ({"concepts": " , "}, "name at least one concept"),
    ])
    def test_bad_node_inputs_are_messages_in_the_ui(server, over, message):
        err = server.run_error(_uce(**over))
        assert err["node_type"] == "ConceptEditUCEErase" and message in err["exception_message"], err
        assert not list((server.base / "models" / "loras" / "concept_edit").glob("bad_*"))

    def test_heatmap_word_not_in_the_prompt_is_a_message(server):
        prompt = _with_samplers(
            [("CheckpointLoaderSimple", {"ckpt_name": CKPT_NAME}), ("ConceptEditAttentionCapture", {"model": ["1", 0]})],
            _sample(["2", 0], ["1", 1], "a cat", "heat"),
        )
        prompt[str(len(prompt) + 1)] = {"class_type": "ConceptEditAttentionHeatmaps", "inputs": {
            "attention": ["2", 1], "images": ["6", 0], "clip": ["1", 1], "prompt": "a cat", "words": "dog"}}
        prompt[str(len(prompt) + 1)] = {"class_type": "SaveImage", "inputs": {"images": [str(len(prompt)), 0],
                                                                             "filename_prefix": "heat_missing"}}
        err = server.run_error(prompt)
        assert err["node_type"] == "ConceptEditAttentionHeatmaps" and "not in the prompt: 'dog'" in err["exception_message"], err


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "make-checkpoint":
    print(ensure_checkpoint())
