"""The package layout holds: imports flow one way (docs/ARCHITECTURE.md), the README's old import
paths still work with a deprecation warning, and the test command runs from a clone whose folder
name is not a Python identifier."""
from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# bottom to top; a package may import only from packages at its level or below
LAYERS = [{"solvers"}, {"core"}, {"adapters"}, {"engines"}, {"files"}, {"cli", "nodes", "hooks"}]
LEVEL = {pkg: i for i, layer in enumerate(LAYERS) for pkg in layer}


def _imports(path: Path, pkg: str) -> set[str]:
    """Top-level package names this module imports relatively (or as concept_edit.X)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:  # from .x: the same package
                out.add(pkg)
            elif node.level == 2 and node.module:  # from ..x.y: package x
                out.add(node.module.split(".")[0])
            elif node.module and node.module.startswith("concept_edit."):
                out.add(node.module.split(".")[1])
    return out


def test_imports_flow_one_way():
    bad = []
    for pkg, level in LEVEL.items():
        for f in (REPO / pkg).rglob("*.py"):
            for dep in _imports(f, pkg):
                if dep in LEVEL and LEVEL[dep] > level:
                    bad.append(f"{f.relative_to(REPO)} imports {dep}")
    assert not bad, bad


def test_readme_imports_still_work_with_a_warning():
    for old, name in [("edits", "plan_from_dict"), ("methods", "compute_delta"), ("apply", "apply_delta"),
                      ("formats", "save_lora")]:
        sys.modules.pop(f"concept_edit.{old}", None)
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            mod = __import__(f"concept_edit.{old}", fromlist=[name])
        assert callable(getattr(mod, name))
        assert any(issubclass(x.category, DeprecationWarning) and old in str(x.message) for x in w), old


def test_tests_run_from_a_folder_that_is_not_an_identifier(tmp_path):
    """pytest imports the repository's __init__.py as the package of its folder; a clone into
    "concept-edit/" must still collect and pass."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs a git checkout")
    clone = tmp_path / "concept-edit"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    shutil.copy(REPO / "__init__.py", clone / "__init__.py")  # the working tree's version
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_delta.py"],
                       cwd=clone, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
