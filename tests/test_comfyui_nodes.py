"""Every V3 node class of the pack, run inside a real ComfyUI (in a subprocess with ComfyUI's
Python, no server): the extension ComfyUI loads, each edit node on the SD 1.5-shaped random
checkpoint (inputs never mutated, the clone patched with exactly the delta's layers), Save Concept
Delta's paths, counter and refusals, Load Concept Delta on what was saved; the registry metadata
in pyproject.toml as ComfyUI's own parser reads it. Skipped unless
COMFYUI_PATH is set. The workflows through the HTTP API are in test_comfyui_e2e.py.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("ce_comfyui_host", Path(__file__).resolve().parent / "comfyui_host.py")
host = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(host)

pytestmark = pytest.mark.skipif(host.comfy_path() is None, reason=host.SKIP_REASON)

SCRIPT = r'''
import asyncio, tempfile, time
import comfy.sd, folder_paths, torch
from comfy_api.v0_0_2 import io
load_delta = import_module(pkg + ".files.formats").load_delta

# the extension as ComfyUI's loader sees it
ext = asyncio.run(ce.comfy_entrypoint())
nodes = {n.GET_SCHEMA().node_id: n for n in asyncio.run(ext.get_node_list())}
assert all(issubclass(n, io.ComfyNode) for n in nodes.values())
edit_ids = [k for k in nodes if k.endswith(("Erase", "Replace", "Moderate", "Debias"))]
assert len(nodes) == 23 and len(edit_ids) == 19, sorted(nodes)  # 0.1's 17 + RECE (2) and SPEED (4)
for node_id, cls in nodes.items():  # every widget says what it does
    untold = [i.id for i in cls.GET_SCHEMA().inputs if isinstance(i, io.WidgetInput) and not i.tooltip]
    assert not untold, (node_id, untold)

# the registry metadata, as ComfyUI's own parser reads pyproject.toml
from comfy_config import config_parser
cfg = config_parser.extract_node_configuration(ce_root)
assert cfg.project.name == "concept-edit" and cfg.tool_comfy.display_name == "ConceptEdit", cfg
assert cfg.tool_comfy.publisher_id and cfg.project.supported_comfyui_version == ">=0.3.64", cfg
assert cfg.tool_comfy.web is None  # WEB_DIRECTORY serves web/; a second registration loads the JS twice

loras = tempfile.mkdtemp()
folder_paths.add_model_folder_path("loras", loras, is_default=True)
model, clip = comfy.sd.load_checkpoint_guess_config(sys.argv[1], output_vae=False, output_clip=True)[:2]
model_patches = {k: list(v) for k, v in model.patches.items()}
clip_patches = dict(clip.patcher.patches)

# 1. every edit node, with its defaults (text-encoder nodes on one layer to bound CPU time)
timings = {}
for node_id in edit_ids:
    cls = nodes[node_id]
    schema = cls.GET_SCHEMA()
    kw = {i.id: i.default for i in schema.inputs if i.id not in ("model", "clip")}
    if "TE" in node_id or "EMCID" in node_id:
        kw["layers"] = "10"
    t0 = time.time()
    out = cls.execute(model=model, clip=clip, **kw)
    timings[node_id] = round(time.time() - t0, 1)
    m2, c2, delta = out.args
    assert model.patches == model_patches and clip.patcher.patches == clip_patches, node_id  # inputs untouched
    s = out.ui["concept_edit"][0]
    assert s["layers"] == len(delta.layers) > 0, (node_id, s)
    unet = [n for n in delta.layers if n.startswith("unet.")]
    te = [n for n in delta.layers if not n.startswith("unet.")]
    assert len(m2.patches) == len(unet) and (m2 is model) == (not unet), node_id
    assert len(c2.patcher.patches) == len(te) and (c2 is clip) == (not te), node_id
    if "TE" in node_id or "EMCID" in node_id:
        assert not unet and all(".layers.10." in n for n in te), (node_id, te[:2])
    else:
        assert len(unet) in (16, 32) and not te, (node_id, len(unet))  # to_k+to_v, or to_v (layers "v")
    if s.get("residual_error"):
        assert s["residual_error"]["max"] < 1.0, (node_id, s["residual_error"])
print("edit nodes:", timings)

# a refused setting is a message, not a silent no-op
try:
    nodes["ConceptEditUCEErase"].execute(model=model, clip=clip, concepts="Van Gogh", concept_type="style", guide="",
                                         preserve="", lambda_=0.0, strength=1.0, erase_scale=0.0, preserve_scale=0.0)
    raise SystemExit("lambda 0 with both scales 0 was accepted")
except ValueError as e:
    assert "erase_scale" in str(e) or "lambda" in str(e), e

# 2. Save Concept Delta: ComfyUI's naming and counter (as the core LoraSave), refusals, nothing written outside
save = nodes["ConceptEditSaveDelta"]
_, _, delta = nodes["ConceptEditUCEErase"].execute(model=model, clip=clip, concepts="Van Gogh", concept_type="style",
                                                   guide="", preserve="Monet", lambda_=0.5, strength=1.0).args
names = [save.execute(delta=delta, filename_prefix="concept_edit/ok").ui["concept_edit_saved"][0] for _ in range(2)]
assert names == ["concept_edit/ok_00001_.safetensors", "concept_edit/ok_00002_.safetensors"], names
year = save.execute(delta=delta, filename_prefix="dated/%year%").ui["concept_edit_saved"][0]
assert year == f"dated/{time.localtime().tm_year}_00001_.safetensors", year
outside = tempfile.mkdtemp()
os.symlink(outside, os.path.join(loras, "escape"))
for prefix in (".", "x/..", "..", "../x", os.path.join(outside, "x"), "/etc/x", "escape/x", "a/../../x"):
    try:
        save.execute(delta=delta, filename_prefix=prefix)
        raise SystemExit(f"prefix {prefix!r} was accepted")
    except ValueError as e:
        assert "leaves the loras folder" in str(e), e
for rank, fmt, msg in ((-1, "lora", "rank"), (2, "diff", "rank applies to LoRA files only")):
    try:
        save.execute(delta=delta, filename_prefix="r", rank=rank, format=fmt)
        raise SystemExit(f"rank {rank} {fmt} was accepted")
    except ValueError as e:
        assert msg in str(e), e
assert os.listdir(outside) == []
written = sorted(os.path.relpath(os.path.join(d, f), loras) for d, _, fs in os.walk(loras) for f in fs)
assert written == ["concept_edit/ok_00001_.safetensors", "concept_edit/ok_00002_.safetensors", year], written
diff = save.execute(delta=delta, filename_prefix="d", format="diff").ui["concept_edit_saved"][0]

# 3. Load Concept Delta: the saved file patches like the edit node did; choices list the folder
load = nodes["ConceptEditLoadDelta"]
options = next(i for i in load.GET_SCHEMA().inputs if i.id == "delta_name").options
assert names[0] in options and diff in options, options
for name in (names[0], diff):
    m3, c3, d3 = load.execute(model=model, clip=clip, delta_name=name, strength_model=1.0, strength_clip=1.0).args
    assert set(d3.layers) == set(delta.layers) and len(m3.patches) == len(delta.layers) and c3 is clip, name
    for n, ld in delta.layers.items():
        assert torch.allclose(d3.layers[n].dense(), ld.dense(), atol=1e-5), n
print("NODES OK")
'''


def test_every_node_class_in_real_comfyui(tmp_path):
    host.run_script(tmp_path, SCRIPT, str(host.e2e.ensure_checkpoint()), ok="NODES OK")
