"""Nothing lost: outputs never overlap the source model, a replaced export is swapped in atomically
(checked by killing real exports at random moments), temporaries of killed runs are cleaned, and
outputs get the umask's permissions."""
from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from concept_edit.cli.main import main
from concept_edit.core.atomic import TAG, OutputPathError, atomic_path, clean_leftovers
from concept_edit.core.plan import plan_from_dict
from concept_edit.engines.uce import uce_delta
from concept_edit.files.formats import save_lora

PKG_PARENT = str(Path(__import__("concept_edit").__file__).resolve().parent.parent)


def _content(p: Path) -> bytes:
    if p.name == "tokenizer_config.json":  # records how the tokenizer was loaded (local_files_only)
        cfg = json.loads(p.read_text())
        cfg.pop("local_files_only", None)
        return json.dumps(cfg, sort_keys=True).encode()
    return p.read_bytes()


def tree_hashes(folder: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under ``folder`` (hidden temporaries included)."""
    return {str(p.relative_to(folder)): hashlib.sha256(_content(p)).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if f".{TAG}-" in p.name)


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@pytest.fixture(scope="module")
def model_and_delta(tmp_path_factory, tiny):
    """A copy of the tiny SD 1.x folder (tests here may try to destroy it) and a UCE delta file."""
    pipe, model = tiny("sd1")
    root = tmp_path_factory.mktemp("safety")
    src = root / "model"
    pipe.save_pretrained(str(src))
    delta = root / "erase.safetensors"
    save_lora(uce_delta(model, plan_from_dict({"edits": [{"erase": "cat"}]}), progress=False), delta)
    return src, delta


# ------------------------------------------------------------------ 1. output overlapping the source
@pytest.mark.parametrize("where", ["same", "inside", "contains", "symlink", "relative"])
def test_export_never_writes_into_the_source_folder(model_and_delta, tmp_path, monkeypatch, capsys, where):
    src, delta = model_and_delta
    before = tree_hashes(src)
    if where == "same":
        out = src
    elif where == "inside":
        out = src / "unet" / "edited"
    elif where == "contains":
        out = src.parent
    elif where == "symlink":
        out = tmp_path / "link"
        out.symlink_to(src, target_is_directory=True)
    else:
        monkeypatch.chdir(src / "unet")
        out = Path("..")
    rc = main(["export", "--model", str(src), str(delta), "-o", str(out), "--overwrite"])
    assert rc == 2 and "overlaps the source" in capsys.readouterr().err
    assert tree_hashes(src) == before


def test_export_library_refuses_its_own_source(model_and_delta):
    """The library call, not only the CLI: the pipeline's own folder is found from the pipeline."""
    from concept_edit.adapters.diffusers_model import DiffusersModel, load_pipeline
    from concept_edit.files.export import export_diffusers
    from concept_edit.files.formats import load_delta

    src, delta = model_and_delta
    before = tree_hashes(src)
    pipe = load_pipeline(src)
    with pytest.raises(OutputPathError, match="overlaps the source"):
        export_diffusers(pipe, DiffusersModel(pipe), load_delta(delta), src, overwrite=True)
    assert tree_hashes(src) == before


def test_single_file_export_never_writes_onto_its_source(model_and_delta, tmp_path, capsys):
    from concept_edit.adapters.diffusers_model import load_pipeline
    from concept_edit.adapters.ldm_convert import save_single_file

    src, delta = model_and_delta
    single = tmp_path / "model.safetensors"
    save_single_file(load_pipeline(src), single)
    link = tmp_path / "link.safetensors"
    link.symlink_to(single)
    hard = tmp_path / "hard.safetensors"
    os.link(single, hard)
    digest = hashlib.sha256(single.read_bytes()).hexdigest()
    for out in (single, link, hard, src / "baked.safetensors"):  # the file, a symlink, a hard link, the config
        rc = main(["export", "--model", str(single), "--config", str(src), str(delta), "-o", str(out), "--overwrite"])
        assert rc == 2, out
        err = capsys.readouterr().err
        assert "source model" in err, err
    assert hashlib.sha256(single.read_bytes()).hexdigest() == digest
    assert not (src / "baked.safetensors").exists()


# ------------------------------------------------------------------ 2. folder overwrite swapped atomically
def _export_cmd(src, delta, out, scale):
    return [sys.executable, "-m", "concept_edit", "export", "--model", str(src), str(delta), "-o", str(out),
            "--overwrite", "--scale", str(scale)]


def _listing(folder: Path):
    """What a poll sees of a folder: its inode and every file in it (cheap enough to spin on)."""
    try:
        return os.stat(folder).st_ino, sorted(os.path.join(r, f) for r, _, fs in os.walk(folder) for f in fs)
    except FileNotFoundError:
        return None


def _run_until_write(cmd, out: Path, env) -> tuple[subprocess.Popen, float]:
    """Start ``cmd`` and return once a temporary sibling of ``out`` appears (the write has started)."""
    before = set(os.listdir(out.parent))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not any(n.startswith(f".{out.name}.") for n in set(os.listdir(out.parent)) - before):
        if proc.poll() is not None:
            raise AssertionError(f"export ended before writing: {proc.stderr.read().decode()}")
        assert time.monotonic() < deadline
        time.sleep(0.001)
    return proc, time.monotonic()


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory, tiny):
    """An SD 1.x folder whose UNet is wide enough (~60 MB) that an export takes a moment to write."""
    from concept_edit.testing.tiny_models import build_tiny_pipeline
    from diffusers import UNet2DConditionModel

    pipe = build_tiny_pipeline("sd1")
    pipe.unet = UNet2DConditionModel(
        block_out_channels=(128, 256), layers_per_block=2, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        norm_num_groups=8, cross_attention_dim=32, attention_head_dim=8,
    )
    root = tmp_path_factory.mktemp("wide")
    pipe.save_pretrained(str(root / "model"))
    from concept_edit.adapters.diffusers_model import DiffusersModel

    delta = root / "erase.safetensors"
    save_lora(uce_delta(DiffusersModel(pipe), plan_from_dict({"edits": [{"erase": "cat"}]}), progress=False), delta)
    return root / "model", delta


def test_overwritten_export_is_always_complete_old_or_new_under_kill9(wide_model, tmp_path):
    """Exports with --overwrite killed (SIGKILL) at random moments of their write and swap: the
    target is always exactly the complete old or the complete new export, and the temporaries
    the killed runs left are cleaned by the next write."""
    from concept_edit.adapters.diffusers_model import DiffusersModel, load_pipeline
    from concept_edit.files.export import export_diffusers
    from concept_edit.files.formats import load_delta

    src, delta = wide_model
    pipe = load_pipeline(src)
    model, d = DiffusersModel(pipe), load_delta(delta)
    # Reference exports (in process: the same code the CLI runs) at the two scales the trials
    # alternate between; the longer one's duration bounds the moment of each kill.
    refs, window = {}, 0.0
    for scale in (1.0, 0.5):
        t0 = time.monotonic()
        ref = export_diffusers(pipe, model, d, tmp_path / f"ref{int(scale * 10)}", scale=scale)
        window = max(window, time.monotonic() - t0)
        refs[scale] = tree_hashes(ref)
    assert refs[1.0] != refs[0.5]
    target = export_diffusers(pipe, model, d, tmp_path / "target")
    env = {**os.environ, "PYTHONPATH": PKG_PARENT, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    rng = random.Random(11)
    states, current = [], 1.0
    for trial in range(5):
        scale = 1.5 - current  # always the other export, so "old" and "new" differ
        proc, _ = _run_until_write(_export_cmd(src, delta, target, scale), target, env)
        if trial < 3:
            time.sleep(rng.uniform(0, 2 * window))  # a subprocess writes slower than this warm process
        else:  # the swap itself: kill at the first change of the target a poll can see
            seen = _listing(target)
            while _listing(target) == seen and proc.poll() is None:
                pass
        proc.kill()
        proc.wait()
        mid_write = bool(leftovers(tmp_path))
        got = tree_hashes(target)
        assert got in (refs[1.0], refs[0.5]), f"trial {trial}: target is neither complete export"
        current = scale if got == refs[scale] else current
        states.append(("new" if current == scale else "old") + (" (killed mid-write)" if mid_write else ""))
    assert any("mid-write" in s for s in states), states
    # the next write removes what the killed runs left and completes
    export_diffusers(pipe, model, d, target, overwrite=True)
    assert tree_hashes(target) == refs[1.0]
    assert leftovers(tmp_path) == []
    print("kill -9 trial outcomes:", states, "window", round(window, 2))


def test_killed_swap_backup_is_restored(tmp_path):
    """Where RENAME_EXCHANGE is unavailable the old folder is renamed to a backup first; a run
    killed between the two renames leaves only the backup, which the next write puts back."""
    old = tmp_path / f".out.{TAG}-old-{dead_pid()}-0a1b2c3d"
    old.mkdir()
    (old / "model_index.json").write_text("{}")
    with atomic_path(tmp_path / "other.safetensors") as tmp:
        tmp.write_bytes(b"x")
    assert (tmp_path / "out" / "model_index.json").read_text() == "{}"
    assert leftovers(tmp_path) == []


# ------------------------------------------------------------------ 3. temporaries of killed runs
def test_stale_temporaries_of_dead_processes_are_removed(tmp_path, model_and_delta):
    from concept_edit.files.formats import load_delta

    dead = dead_pid()
    (tmp_path / f".a.safetensors.{TAG}-tmp-{dead}-12345678").write_bytes(b"partial")
    (tmp_path / f".folder.{TAG}-tmp-{dead}-9abcdef0").mkdir()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        alive = tmp_path / f".b.safetensors.{TAG}-tmp-{live.pid}-12345678"
        alive.write_bytes(b"in progress")
        unrelated = tmp_path / ".hidden-user-file"
        unrelated.write_text("mine")
        save_lora(load_delta(model_and_delta[1]), tmp_path / "new.safetensors")
        assert leftovers(tmp_path) == [alive.name]  # a live writer's temporary is left alone
        assert unrelated.read_text() == "mine"
    finally:
        live.kill()
        live.wait()
    assert clean_leftovers(tmp_path) == [alive]


def test_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "x.safetensors") as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("disk full")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ 9. permissions follow the umask
@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_outputs_honour_the_umask(model_and_delta, tmp_path, umask):
    src, delta = model_and_delta
    old = os.umask(umask)
    try:
        assert main(["export", "--model", str(src), str(delta), "-o", str(tmp_path / "exp")]) == 0
        save_lora_path = tmp_path / "d.safetensors"
        from concept_edit.files.formats import load_delta

        save_lora(load_delta(delta), save_lora_path)
    finally:
        os.umask(old)
    assert (tmp_path / "exp").stat().st_mode & 0o777 == 0o777 & ~umask
    assert save_lora_path.stat().st_mode & 0o777 == 0o666 & ~umask
    assert (tmp_path / "exp" / "model_index.json").stat().st_mode & 0o777 == 0o666 & ~umask


def test_export_equals_base_plus_delta_after_overwrite(model_and_delta, tmp_path):
    """The swap keeps exports exact: an overwritten export holds base + delta."""
    from concept_edit.adapters.diffusers_model import load_pipeline
    from concept_edit.files.formats import load_delta

    src, delta = model_and_delta
    out = tmp_path / "exp"
    assert main(["export", "--model", str(src), str(delta), "-o", str(out), "--scale", "0.5"]) == 0
    assert main(["export", "--model", str(src), str(delta), "-o", str(out), "--overwrite"]) == 0
    base, new, d = load_pipeline(src), load_pipeline(out), load_delta(delta)
    for name, ld in d.layers.items():
        sub = name.partition(".")[2]
        torch.testing.assert_close(new.unet.get_submodule(sub).weight.detach(),
                                   base.unet.get_submodule(sub).weight.detach() + ld.dense(), rtol=1e-5, atol=1e-6)
    assert leftovers(tmp_path) == []


def test_swap_without_rename_exchange(tmp_path, monkeypatch):
    """The fallback for filesystems without RENAME_EXCHANGE (old folder renamed to a backup, new
    one renamed in, backup deleted) gives the same result."""
    from concept_edit.core import atomic

    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    out = tmp_path / "exp"
    for text in ("old", "new"):
        with atomic_path(out, overwrite=True, directory=True) as tmp:
            (tmp / "model_index.json").write_text(text)
    assert (out / "model_index.json").read_text() == "new"
    assert leftovers(tmp_path) == []
