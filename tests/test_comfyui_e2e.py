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
        assert ours == sorted(old), f"registered {ours}"
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


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "make-checkpoint":
    print(ensure_checkpoint())
