"""Tests never write into the user's home or the source tree (see conftest.py), and neither does a CLI edit."""
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from conftest import snapshot_changes, source_snapshot


def _inside(p, root) -> bool:
    return Path(p).resolve().is_relative_to(Path(root).resolve())


def test_every_cache_points_into_the_session_home():
    import huggingface_hub.constants as hf
    import matplotlib
    from concept_edit.engines.second_moments import default_cache_dir
    from concept_edit.testing.tokenizer_files import clip_tokenizer_dir

    home = Path.home()
    assert _inside(home, tempfile.gettempdir()) and home.name.startswith("concept_edit_test_home_")
    for p in (default_cache_dir(), clip_tokenizer_dir(), hf.HF_HUB_CACHE, matplotlib.get_cachedir(),
              matplotlib.get_configdir()):
        assert _inside(p, home), p


def test_cli_edit_and_apply_write_only_their_outputs(tiny_sd1_dir, tmp_path):
    """Run from the repository root with an empty HOME and the library defaults for every cache:
    the outputs appear where asked, and nothing else anywhere."""
    home, out = tmp_path / "home", tmp_path / "out"
    home.mkdir()
    out.mkdir()
    env = {k: v for k, v in os.environ.items()
           if k not in ("XDG_CACHE_HOME", "XDG_CONFIG_HOME", "HF_HOME", "TORCH_HOME", "MPLCONFIGDIR", "CONCEPT_EDIT_CACHE")}
    env["HOME"] = str(home)
    code = ("from concept_edit.cli.main import main\n"
            f"m = {str(tiny_sd1_dir)!r}\n"
            "assert main(['edit', '--model', m, '--erase', 'cat', '--preserve', 'dog', '-o', 'e.safetensors']) == 0\n"
            "assert main(['apply', '--model', m, 'e.safetensors', '--prompt', 'a cat', '--steps', '1', '-o', 'g.png']) == 0\n")
    before = source_snapshot()
    # outputs are relative paths: run in `out`, where anything else written relative to the cwd would show
    r = subprocess.run([sys.executable, "-c", code],
                       cwd=out, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["e.safetensors", "g.png"]
    assert [str(p.relative_to(home)) for p in home.rglob("*")] == []
    assert snapshot_changes(before, source_snapshot()) == []
