"""The web extension in a real browser: headless Chromium driven by Playwright against a real ComfyUI.

Skipped unless COMFYUI_PATH is set and node, /usr/bin/chromium (or $CHROMIUM) and
tests/browser/node_modules/playwright-core (``npm install`` in this folder) are present.
Saves the screenshot in the test's temporary folder; CONCEPT_EDIT_SCREENSHOT=PATH also copies it
there (e.g. tests/browser/edit_node.png, the committed one).
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent

_spec = importlib.util.spec_from_file_location("ce_comfyui_e2e", HERE.parent / "test_comfyui_e2e.py")
e2e = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(e2e)

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
missing = [
    what for what, ok in (
        ("COMFYUI_PATH", e2e.comfy_path() is not None),
        ("node", shutil.which("node") is not None),
        ("chromium", Path(CHROMIUM).exists()),
        ("playwright-core (npm install in tests/browser)", (HERE / "node_modules" / "playwright-core").exists()),
    ) if not ok
]
pytestmark = pytest.mark.skipif(bool(missing), reason=f"missing: {', '.join(missing)} (.ci/run installs them where "
                                                         "../shared/comfyui exists)")


def _cpu_sized_ui(name: str) -> dict:
    """The example workflow with the test checkpoint, 64x64 latents and 1 sampling step."""
    wf = e2e.load_workflow(name)
    for n in wf["nodes"]:
        v = n.get("widgets_values")
        if n["type"] == "CheckpointLoaderSimple":
            v[0] = e2e.CKPT_NAME
        elif n["type"] == "KSampler":
            v[2] = 1
        elif n["type"] == "EmptyLatentImage":
            v[0] = v[1] = 64
            v[2] = 1
    return wf


def test_web_extension_in_chromium(tmp_path_factory):
    base = tmp_path_factory.mktemp("comfyui_browser")
    settings = base / "user" / "default" / "comfy.settings.json"
    settings.parent.mkdir(parents=True, exist_ok=True)
    settings.write_text(json.dumps({"Comfy.TutorialCompleted": True}))  # no first-run template dialog
    srv = e2e.start_server(base)
    try:
        work = tmp_path_factory.mktemp("wf")
        shot = work / "edit_node.png"
        edit = work / "edit.json"
        attn = work / "attn.json"
        edit.write_text(json.dumps(_cpu_sized_ui("erase_artist_style_save_lora.json")))
        attn.write_text(json.dumps(_cpu_sized_ui("attention_maps_before_after_edit.json")))
        out = subprocess.run(
            ["node", str(HERE / "check_ui.mjs"), srv.url, str(edit), str(attn), str(shot)],
            cwd=str(HERE), capture_output=True, text=True, timeout=1800,
        )
        lines = [l for l in out.stdout.splitlines() if l.startswith("{")]
        assert lines, out.stdout + out.stderr + srv.tail()
        res = json.loads(lines[-1])
        print(json.dumps(res, indent=1))
        assert not res["extensionErrors"], res["extensionErrors"]
        assert res["ok"], json.dumps(res, indent=1) + "\n" + srv.tail()
        summary = res["steps"][-1]["summary"]
        assert "Van Gogh" in summary["concepts"] and summary["layers"].startswith("32")
        assert shot.exists() and shot.stat().st_size > 10_000
        print(f"screenshot: {shot}")
        if os.environ.get("CONCEPT_EDIT_SCREENSHOT"):
            shutil.copyfile(shot, os.environ["CONCEPT_EDIT_SCREENSHOT"])
    finally:
        srv.stop()
