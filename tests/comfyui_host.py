"""Helpers for the tests that run inside a real ComfyUI (a subprocess with ComfyUI's Python):
the header every such script starts with, running one, and the cached SD 2.x / SDXL test
checkpoints (built by ``comfyui_checkpoints.py``; the SD 1.5 one is ``test_comfyui_e2e.ensure_checkpoint``).
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
from pathlib import Path

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("ce_comfyui_e2e_helpers", HERE / "test_comfyui_e2e.py")
e2e = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(e2e)

REPO, CACHE, comfy_path, comfy_python = e2e.REPO, e2e.CACHE, e2e.comfy_path, e2e.comfy_python
SKIP_REASON = ("no ComfyUI: set COMFYUI_PATH and COMFYUI_PYTHON (../shared/comfyui/install.sh DEST prints both; "
               ".ci/run does it all)")

# family -> version of its checkpoint: bump it when comfyui_checkpoints.py changes what it writes
CHECKPOINT_VERSIONS = {"sd2": "1", "sdxl": "1", "flux": "1"}

# A script's first lines: ComfyUI on the CPU, and this pack imported under a folder name, as
# ComfyUI imports custom nodes (``pkg`` is its name, for import_module(pkg + ".adapters…")).
PRELUDE = r'''
import importlib.util, os, sys
sys.path.insert(0, os.environ["COMFYUI_PATH"])
from comfy.cli_args import args
args.cpu = True
ce_root = os.environ["CE_REPO"]
spec = importlib.util.spec_from_file_location("ConceptEdit", os.path.join(ce_root, "__init__.py"),
                                              submodule_search_locations=[ce_root])
ce = importlib.util.module_from_spec(spec)
sys.modules["ConceptEdit"] = ce
spec.loader.exec_module(ce)
from importlib import import_module
pkg = ce.__name__
'''


def family_checkpoint(family: str) -> Path:
    """The random-weight ``family`` ("sd2" | "sdxl") checkpoint, built on first use (float16; SD 2.x
    2.4 GiB in ~20 s, SDXL 6.5 GiB in ~40 s on two cores) and cached in ``$COMFYUI_TEST_CACHE``."""
    CACHE.mkdir(parents=True, exist_ok=True)
    ck = CACHE / f"{family}_random_v{CHECKPOINT_VERSIONS[family]}.safetensors"
    if not ck.exists():
        out = subprocess.run([comfy_python(), str(HERE / "comfyui_checkpoints.py"), family, str(ck)],
                             env={**os.environ, "COMFYUI_PATH": str(comfy_path())}, cwd=str(comfy_path()),
                             capture_output=True, text=True, timeout=3600)
        assert out.returncode == 0 and ck.exists(), out.stdout[-2000:] + out.stderr[-4000:]
        print("\n".join(out.stdout.strip().splitlines()[-2:]))
    return ck


def run_script(tmp_path: Path, body: str, *args: str, timeout: float = 1800, ok: str = "OK") -> str:
    """Run ``PRELUDE + body`` in ComfyUI's Python with ``args``; asserts it exits 0 having printed
    ``ok``; returns its stdout."""
    script = tmp_path / "host_check.py"
    script.write_text(PRELUDE + body)
    env = {**os.environ, "COMFYUI_PATH": str(comfy_path()), "CE_REPO": str(REPO), "TQDM_DISABLE": "1"}
    out = subprocess.run([comfy_python(), str(script), *args], capture_output=True, text=True, cwd=str(tmp_path),
                         env=env, timeout=timeout)
    assert out.returncode == 0 and ok in out.stdout, out.stdout[-3000:] + out.stderr[-6000:]
    return out.stdout
