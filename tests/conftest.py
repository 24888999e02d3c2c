"""Shared fixtures, and a hermetic session.

HOME and every cache root point into one temporary folder for the whole session (set here, before
any test module imports a library that reads them), so no test writes into the user's home; an
explicitly set ``CONCEPT_EDIT_CACHE`` is kept (e.g. to reuse the ComfyUI test checkpoint between
runs). The session fails if any file in the source tree appeared, changed or vanished.
"""
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import pytest
import torch

warnings.filterwarnings("ignore", message=".*torchvision.*")

REPO = Path(__file__).resolve().parents[1]
TEST_HOME = Path(tempfile.mkdtemp(prefix="concept_edit_test_home_"))
# explicit hub cache paths would override HF_HOME; nothing here downloads, so drop them
for _k in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_CACHE", "HF_ASSETS_CACHE", "HF_MODULES_CACHE"):
    os.environ.pop(_k, None)
os.environ.update(HOME=str(TEST_HOME), XDG_CACHE_HOME=str(TEST_HOME / ".cache"),
                  XDG_CONFIG_HOME=str(TEST_HOME / ".config"), HF_HOME=str(TEST_HOME / ".cache" / "huggingface"),
                  TORCH_HOME=str(TEST_HOME / ".cache" / "torch"), MPLCONFIGDIR=str(TEST_HOME / ".config" / "matplotlib"))
os.environ.setdefault("CONCEPT_EDIT_CACHE", str(TEST_HOME / ".cache" / "concept_edit"))

# written by Python, pytest, linters and `npm install`, never by the package's code
_NOT_SOURCE = {".git", ".venv", "__pycache__", ".pytest_cache", ".ruff_cache", ".mypy_cache", "node_modules"}


def source_snapshot(root: Path = REPO) -> dict[str, tuple[int, int]]:
    """relative path -> (size, mtime) of every file in the source tree."""
    out = {}
    for d, dirs, files in os.walk(root):
        dirs[:] = [x for x in dirs if x not in _NOT_SOURCE and not x.endswith(".egg-info")]
        for f in files:
            if f.endswith(".pyc"):
                continue
            p = os.path.join(d, f)
            try:
                st = os.stat(p)
            except FileNotFoundError:
                continue
            out[os.path.relpath(p, root)] = (st.st_size, st.st_mtime_ns)
    return out


def snapshot_changes(before: dict, after: dict) -> list[str]:
    return sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))


_SOURCE_AT_START = source_snapshot()


@pytest.fixture(scope="session", autouse=True)
def _hermetic_session():
    """Fails the session if a test wrote into the source tree."""
    yield
    changed = snapshot_changes(_SOURCE_AT_START, source_snapshot())
    if os.environ.get("CONCEPT_EDIT_SCREENSHOT"):  # asked for: refresh the committed browser screenshot
        asked = Path(os.environ["CONCEPT_EDIT_SCREENSHOT"]).resolve()
        changed = [c for c in changed if (REPO / c).resolve() != asked]
    assert not changed, (f"files in the source tree {REPO} appeared, changed or vanished during the tests "
                         f"(tests write to tmp_path; or were they edited while the suite ran?): {changed[:20]}")


def pytest_unconfigure(config):
    shutil.rmtree(TEST_HOME, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny():
    """Tiny random pipelines per family, built once; tests must leave their weights unchanged."""
    from concept_edit.adapters.diffusers_model import DiffusersModel
    from concept_edit.testing.tiny_models import build_tiny_pipeline

    cache = {}

    def get(family):
        if family not in cache:
            pipe = build_tiny_pipeline(family)
            cache[family] = (pipe, DiffusersModel(pipe))
        return cache[family]

    return get


@pytest.fixture(scope="session")
def tiny_sd1_dir(tmp_path_factory, tiny):
    pipe, _ = tiny("sd1")
    d = tmp_path_factory.mktemp("models") / "tiny_sd1"
    pipe.save_pretrained(str(d))
    return d


@pytest.fixture
def full_and_single_file_deltas(tiny, tmp_path):
    """plan -> (delta on the tiny SD1 pipeline, delta on the same weights as a lazy single file),
    after checking they have the same layers and the same dense changes."""
    from concept_edit.adapters.ldm_convert import save_single_file
    from concept_edit.adapters.single_file_model import SingleFileModel
    from concept_edit.engines.registry import compute_delta

    def run(plan):
        pipe, model = tiny("sd1")
        pipe.save_pretrained(str(tmp_path / "config"))
        path = save_single_file(pipe, tmp_path / "sd1.safetensors")
        full = compute_delta(model, plan, progress=False)
        lazy = compute_delta(SingleFileModel(path, tmp_path / "config"), plan, progress=False)
        assert list(lazy.layers) == list(full.layers)
        for n, ld in full.layers.items():
            torch.testing.assert_close(lazy.layers[n].dense(), ld.dense(), rtol=1e-5, atol=1e-6)
        return full, lazy

    return run


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """Generation on the bundled model runs much faster on one thread when the 2 cores are shared
    (OpenMP spin-waits)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
