"""Regenerate the example workflows' thumbnails (``example_workflows/<name>.jpg``, shown by ComfyUI's
template browser): starts a headless ComfyUI with the pack in a temporary folder and screenshots
each workflow on its canvas with Chromium (thumbnails.mjs).

    COMFYUI_PATH=... COMFYUI_PYTHON=... .venv/bin/python tests/browser/make_thumbnails.py

Needs what the browser test needs (node, chromium, ``npm ci`` in tests/browser).
"""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("ce_comfyui_e2e", HERE.parent / "test_comfyui_e2e.py")
e2e = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(e2e)
THUMBNAIL = (800, 500)  # at most, aspect kept


def main() -> int:
    if e2e.comfy_path() is None:
        print("set COMFYUI_PATH (and COMFYUI_PYTHON)", file=sys.stderr)
        return 2
    base = Path(tempfile.mkdtemp(prefix="ce_thumbnails_"))
    settings = base / "user" / "default" / "comfy.settings.json"
    settings.parent.mkdir(parents=True, exist_ok=True)
    # no first-run dialog, minimap, canvas overlays or workflow tabs over the graph; full detail when zoomed out
    settings.write_text(json.dumps({"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False,
                                    "Comfy.Graph.CanvasMenu": False, "Comfy.Graph.CanvasInfo": False,
                                    "Comfy.Workflow.WorkflowTabsPosition": "Sidebar",
                                    "LiteGraph.Canvas.MinFontSizeForLOD": 0}))
    shots = base / "shots"
    shots.mkdir()
    srv = e2e.start_server(base)
    try:
        workflows = sorted(e2e.WORKFLOWS.glob("*.json"))
        out = subprocess.run(["node", str(HERE / "thumbnails.mjs"), srv.url, str(shots), *map(str, workflows)],
                             cwd=str(HERE), capture_output=True, text=True, timeout=600)
        print(out.stdout[-2000:], out.stderr[-2000:])
        if out.returncode:
            return out.returncode
    finally:
        srv.stop()
    for wf in workflows:
        im = Image.open(shots / (wf.stem + ".png")).convert("RGB")
        im.thumbnail(THUMBNAIL, Image.Resampling.LANCZOS)
        im.save(wf.with_suffix(".jpg"), quality=85)
        print(wf.with_suffix(".jpg"), im.size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
