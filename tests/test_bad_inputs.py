"""Every bad input a clear error (tests/BAD_INPUTS.md lists each case): nothing silently wrong
(non-finite scales, deltas made for another model state, invalid ranks), and malformed files,
unwritable or clashing outputs and wrong suffixes refused with ``concept-edit: error: …``, exit
code 2, before any model is loaded and with nothing written."""
from __future__ import annotations

import json
import os
import struct
import subprocess
from pathlib import Path

import pytest
import torch
from concept_edit.adapters.diffusers_model import (
    DiffusersModel,
    ModelLoadError,
    load_pipeline,
)
from concept_edit.adapters.safetensors_stream import (
    SafetensorsFormatError,
    SafetensorsReader,
)
from concept_edit.cli.main import main
from concept_edit.core.apply import DeltaMismatchError, apply_delta, check_compatible
from concept_edit.core.delta import ConceptDelta, LayerDelta, fingerprint_v1
from concept_edit.core.plan import plan_from_dict
from concept_edit.engines.uce import uce_delta
from concept_edit.files.formats import load_delta, save_diff, save_lora
from concept_edit.testing.tiny_models import build_tiny_pipeline

ERASE_CAT = plan_from_dict({"edits": [{"erase": "cat"}]})
ERASE_DOG = plan_from_dict({"edits": [{"erase": "dog"}]})


def run(argv, capsys) -> tuple[int, str]:
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    return rc, capsys.readouterr().err


def refused(argv, capsys, *needles) -> str:
    rc, err = run(argv, capsys)
    assert rc == 2, err
    last = err.strip().splitlines()[-1]  # progress bars of a loaded model may come first
    assert last.startswith("concept-edit: error: ") and "Traceback" not in err, err
    for n in needles:
        assert n in err, (n, err)
    return err


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny):
    """A UCE delta file made on the tiny SD 1.x model, and one made on another model."""
    _, model = tiny("sd1")
    d = tmp_path_factory.mktemp("bad")
    good = d / "good.safetensors"
    save_lora(uce_delta(model, ERASE_CAT, progress=False), good)
    other = d / "other.safetensors"
    save_lora(uce_delta(DiffusersModel(build_tiny_pipeline("sd1", seed=1)), ERASE_DOG, progress=False), other)
    return good, other


def snapshot(model, names):
    return {n: w.detach().clone() for n, w in model.weights(names).items()}


# ------------------------------------------------------------------ 4. non-finite scales
@pytest.mark.parametrize("scale", ["nan", "inf", "-inf"])
def test_non_finite_scale_refused(tiny_sd1_dir, files, tmp_path, capsys, scale):
    good, _ = files
    refused(["apply", "--model", tiny_sd1_dir, good, f"--scale={scale}", "-o", tmp_path / "g.png"], capsys, "finite")
    refused(["export", "--model", tiny_sd1_dir, good, f"--scale={scale}", "-o", tmp_path / "x"], capsys, "finite")
    assert list(tmp_path.iterdir()) == []


def test_non_finite_scale_refused_by_the_library(tiny, files, tmp_path):
    from concept_edit.files.export import export_diffusers

    pipe, model = tiny("sd1")
    d = load_delta(files[0])
    before = snapshot(model, d.layers)
    for s in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="finite"):
            apply_delta(d, model.weights(d.layers), scale=s)
        with pytest.raises(ValueError, match="finite"):
            export_diffusers(pipe, model, d, tmp_path / "x", scale=s)
    assert not (tmp_path / "x").exists()
    for n, w in model.weights(d.layers).items():
        assert torch.equal(w, before[n])


# ------------------------------------------------------------------ 5. each stacked delta checked
@pytest.mark.parametrize("command", ["apply", "export"])
def test_each_stacked_delta_is_checked_against_the_model(tiny_sd1_dir, files, tmp_path, capsys, command):
    good, other = files
    out = tmp_path / ("g.png" if command == "apply" else "x")
    refused([command, "--model", tiny_sd1_dir, good, other, "-o", out], capsys, "other.safetensors", "differ")
    assert not out.exists()


def test_a_stack_keeps_each_parts_fingerprint(tiny, files):
    _, model = tiny("sd1")
    good, other = load_delta(files[0]), load_delta(files[1])
    stack = good.stacked(other)
    with pytest.raises(DeltaMismatchError, match="differ"):
        apply_delta(stack, model.weights(stack.layers), model=model)
    # two deltas made on this model stack and apply; removing restores the weights bit-exactly
    own = uce_delta(model, ERASE_DOG, progress=False)
    both = good.stacked(own).stacked(own)
    before = snapshot(model, both.layers)
    apply_delta(both, model.weights(both.layers), model=model).remove()
    for n, w in model.weights(both.layers).items():
        assert torch.equal(w, before[n])


# ------------------------------------------------------------------ 6. what a delta depends on
def _te_delta(model, rank=1, scale=0.05):
    name = next(n for n in model.all_weights() if n.startswith("text_encoder") and n.endswith("layers.1.mlp.fc2"))
    out, inn = model.weights([name])[name].shape
    g = torch.Generator().manual_seed(3)
    return ConceptDelta({name: LayerDelta(scale * torch.randn(out, rank, generator=g), scale * torch.randn(rank, inn, generator=g))})


def test_unet_delta_made_through_an_edited_text_encoder_is_refused_on_an_unedited_one():
    model = DiffusersModel(build_tiny_pipeline("sd1"))
    te = _te_delta(model)
    h = apply_delta(te, model.weights(te.layers))  # the text encoder edited (as EMCID would)
    d = uce_delta(model, ERASE_CAT, progress=False)
    check_compatible(d, model.weights(d.layers), model=model)  # the same model state: accepted
    h.remove()
    with pytest.raises(DeltaMismatchError, match="different text encoder"):
        check_compatible(d, model.weights(d.layers), model=model)
    with pytest.raises(DeltaMismatchError, match="different text encoder"):
        apply_delta(d, model.weights(d.layers), model=model)


def test_text_encoder_delta_depends_on_the_rest_of_the_encoder():
    model = DiffusersModel(build_tiny_pipeline("sd1"))
    name = next(n for n in model.all_weights() if n.startswith("text_encoder") and n.endswith("layers.0.mlp.fc2"))
    other = _te_delta(model)  # on layer 1
    h = apply_delta(other, model.weights(other.layers))
    from concept_edit.core.apply import base_fingerprint

    w = model.weights([name])[name]
    d = ConceptDelta({name: LayerDelta(torch.zeros(w.shape[0], 1), torch.zeros(1, w.shape[1]))},
                     base_fingerprint(model, [name]))
    check_compatible(d, model.weights([name]), model=model)
    h.remove()
    with pytest.raises(DeltaMismatchError, match="different text encoder"):
        check_compatible(d, model.weights([name]), model=model)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_copy_of_the_model_is_accepted(dtype):
    d = uce_delta(DiffusersModel(build_tiny_pipeline("sd1")), ERASE_CAT, progress=False)
    copy = DiffusersModel(build_tiny_pipeline("sd1").to(dtype))
    check_compatible(d, copy.weights(d.layers), model=copy)
    other = DiffusersModel(build_tiny_pipeline("sd1", seed=1).to(dtype))
    with pytest.raises(DeltaMismatchError):
        check_compatible(d, other.weights(d.layers), model=other)


def test_delta_made_with_another_delta_applied_checks_on_that_state():
    model = DiffusersModel(build_tiny_pipeline("sd1"))
    a = uce_delta(model, ERASE_CAT, progress=False)
    before = snapshot(model, a.layers)
    ha = apply_delta(a, model.weights(a.layers), model=model)
    b = uce_delta(model, ERASE_DOG, progress=False)  # computed on base + a
    hb = apply_delta(b, model.weights(b.layers), model=model)  # accepted on that same state
    ha.remove()
    hb.remove()
    for n, w in model.weights(a.layers).items():
        assert torch.equal(w, before[n])


def test_files_from_before_the_fingerprint_scope_still_check(tiny):
    _, model = tiny("sd1")
    d = uce_delta(model, ERASE_CAT, progress=False)
    ws = model.weights(d.layers)
    old = ConceptDelta(d.layers, {"base_fingerprint": fingerprint_v1(ws)})
    check_compatible(old, ws, model=model)
    with pytest.raises(DeltaMismatchError):
        check_compatible(ConceptDelta(d.layers, {"base_fingerprint": "0123456789abcdef"}), ws, model=model)
    with pytest.raises(DeltaMismatchError, match="unknown"):
        check_compatible(ConceptDelta(d.layers, dict(d.metadata, fingerprint_scope="future/9")), ws, model=model)


# ------------------------------------------------------------------ 7. ranks
@pytest.mark.parametrize("rank", [0, -1])
def test_rank_below_one_refused(tiny_sd1_dir, files, tmp_path, capsys, rank):
    d = load_delta(files[0])
    with pytest.raises(ValueError, match="positive"):
        save_lora(d, tmp_path / "r.safetensors", rank=rank)
    with pytest.raises(ValueError, match="positive"):
        next(iter(d.layers.values())).truncated(rank)
    refused(["edit", "--model", tiny_sd1_dir, "--erase", "cat", "--rank", rank, "-o", tmp_path / "e.safetensors"],
            capsys, "positive")
    assert list(tmp_path.iterdir()) == []


def test_rank_with_diff_format_refused(tiny_sd1_dir, tmp_path, capsys):
    refused(["edit", "--model", tiny_sd1_dir, "--erase", "cat", "--rank", "2", "--format", "diff",
             "-o", tmp_path / "e.safetensors"], capsys, "--rank")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ 8. malformed delta files
def _header_file(path: Path, header: dict, data: bytes = b"") -> Path:
    hb = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(hb)) + hb + data)
    return path


def bad_files(tmp: Path, good: Path) -> dict[str, tuple[Path, str]]:
    """name -> (path, text the error must contain)."""
    raw = good.read_bytes()
    F = "F32"
    cases = {
        "empty": (tmp / "empty.safetensors", "empty"),
        "truncated": (tmp / "truncated.safetensors", "truncated"),
        "random bytes": (tmp / "random.safetensors", "not a safetensors file"),
        "header length only": (tmp / "short.safetensors", "too short"),
        "huge tensor": (_header_file(tmp / "huge.safetensors", {"x": {"dtype": F, "shape": [100000, 100000],
                                                                     "data_offsets": [0, 40000000000]}}), "past the end"),
        "size mismatch": (_header_file(tmp / "mismatch.safetensors", {"x": {"dtype": F, "shape": [100000, 100000],
                                                                          "data_offsets": [0, 4]}}, b"\0" * 4), "spans 4 bytes"),
        "negative shape": (_header_file(tmp / "neg.safetensors", {"x": {"dtype": F, "shape": [-1, 4], "data_offsets": [0, 0]}}),
                           "invalid shape"),
        "unknown dtype": (_header_file(tmp / "dtype.safetensors", {"x": {"dtype": "F128", "shape": [1], "data_offsets": [0, 16]}},
                                       b"\0" * 16), "unknown dtype"),
        "header not JSON": (tmp / "notjson.safetensors", "not JSON"),
        "metadata not JSON": (_header_file(tmp / "meta.safetensors", {"__metadata__": {"concept_edit": "{oops"}}),
                              "not valid JSON"),
        "a folder": (tmp / "folder.safetensors", "is a folder"),
        "missing": (tmp / "missing.safetensors", "does not exist"),
        "other suffix": (tmp / "delta.txt", "are .safetensors"),
    }
    cases["empty"][0].write_bytes(b"")
    cases["truncated"][0].write_bytes(raw[: len(raw) // 2])
    cases["random bytes"][0].write_bytes(os.urandom(4096))
    cases["header length only"][0].write_bytes(b"\x01\x02\x03")
    cases["header not JSON"][0].write_bytes(struct.pack("<Q", 8) + b"\xff" * 8)
    cases["a folder"][0].mkdir()
    cases["other suffix"][0].write_bytes(raw)
    return cases


def test_malformed_delta_files_are_clear_errors(tiny_sd1_dir, files, tmp_path, capsys):
    cases = bad_files(tmp_path, files[0])
    out = tmp_path / "out"
    out.mkdir()
    for what, (path, needle) in cases.items():
        for argv in (["info", path],
                     ["apply", "--model", tiny_sd1_dir, path, "-o", out / "g.png"],
                     ["export", "--model", tiny_sd1_dir, files[0], path, "-o", out / "x"]):
            err = refused(argv, capsys, needle)
            assert path.name in err, (what, err)
    assert list(out.iterdir()) == []


def test_streamed_reader_validates_before_allocating(tmp_path):
    path = _header_file(tmp_path / "huge.safetensors",
                        {"x": {"dtype": "F32", "shape": [100000, 100000], "data_offsets": [0, 40000000000]}})
    with pytest.raises(SafetensorsFormatError, match="huge.safetensors"):
        SafetensorsReader(path)


# ------------------------------------------------------------------ 8. outputs that cannot be written
@pytest.fixture
def read_only_dir(tmp_path):
    """A folder nobody can write into, even root: a read-only bind mount (as root) or mode 0555."""
    d = tmp_path / "ro"
    d.mkdir()
    if os.geteuid() != 0:
        d.chmod(0o555)
        yield d
        d.chmod(0o755)
        return
    ok = subprocess.run(["mount", "--bind", str(d), str(d)], capture_output=True).returncode == 0 and \
        subprocess.run(["mount", "-o", "remount,ro,bind", str(d)], capture_output=True).returncode == 0
    if not ok:
        subprocess.run(["umount", str(d)], capture_output=True)
        pytest.skip("running as root without permission to mount a read-only folder")
    try:
        yield d
    finally:
        subprocess.run(["umount", str(d)], check=True)


def test_read_only_output_folder(tiny_sd1_dir, files, read_only_dir, capsys):
    ro = read_only_dir
    refused(["edit", "--model", tiny_sd1_dir, "--erase", "cat", "-o", ro / "e.safetensors"], capsys, "not writable")
    refused(["export", "--model", tiny_sd1_dir, files[0], "-o", ro / "x"], capsys, "not writable")
    refused(["apply", "--model", tiny_sd1_dir, files[0], "-o", ro / "sub" / "g.png"], capsys, "not writable")
    assert list(ro.iterdir()) == []


def test_existing_outputs_of_the_other_kind_are_not_replaced(tiny_sd1_dir, files, tmp_path, capsys):
    folder = tmp_path / "folder.safetensors"
    folder.mkdir()
    (folder / "keep.txt").write_text("keep")
    refused(["edit", "--model", tiny_sd1_dir, "--erase", "cat", "-o", folder, "--overwrite"], capsys, "is a folder")
    refused(["export", "--model", tiny_sd1_dir, files[0], "-o", folder, "--overwrite"], capsys, "is a folder")
    user = tmp_path / "documents"  # not a model folder: never deleted by an export --overwrite
    user.mkdir()
    (user / "thesis.txt").write_text("years of work")
    refused(["export", "--model", tiny_sd1_dir, files[0], "-o", user, "--overwrite"], capsys, "not a diffusers")
    afile = tmp_path / "model"
    afile.write_text("a file")
    refused(["export", "--model", tiny_sd1_dir, files[0], "-o", afile, "--overwrite"], capsys, "is a file")
    assert (folder / "keep.txt").read_text() == "keep" and (user / "thesis.txt").read_text() == "years of work"
    assert afile.read_text() == "a file"


def test_outputs_checked_before_the_model_is_loaded(tmp_path, files, capsys):
    """The output is refused first: a missing model is never even looked at (no minutes of work lost)."""
    existing = tmp_path / "e.safetensors"
    existing.write_text("keep")
    refused(["edit", "--model", tmp_path / "no-model", "--erase", "cat", "-o", existing], capsys, "already exists")
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder is needed")
    refused(["edit", "--model", tmp_path / "no-model", "--erase", "cat", "-o", blocker / "sub" / "e.safetensors"],
            capsys, "is not a folder")
    refused(["export", "--model", tmp_path / "no-model", files[0], "-o", existing], capsys, "already exists")
    assert existing.read_text() == "keep"


# ------------------------------------------------------------------ 11. output suffixes
def test_output_suffixes(tiny_sd1_dir, files, tmp_path, capsys):
    refused(["edit", "--model", tiny_sd1_dir, "--erase", "cat", "-o", tmp_path / "out.txt"], capsys, "out.txt", ".safetensors")
    refused(["export", "--model", tiny_sd1_dir, files[0], "-o", tmp_path / "x.ckpt"], capsys, "'.ckpt'")
    refused(["apply", "--model", tiny_sd1_dir, files[0], "-o", tmp_path / "g.jpg"], capsys, ".png")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ 8. pickled weights in a folder
def test_pickled_bin_inside_a_diffusers_folder_refused(tiny, tmp_path, capsys, files):
    pipe, _ = tiny("sd1")
    folder = tmp_path / "pickled"
    pipe.save_pretrained(str(folder), safe_serialization=False)
    assert list(folder.glob("unet/*.bin"))
    with pytest.raises(ModelLoadError, match="pickled"):
        load_pipeline(folder)
    refused(["export", "--model", folder, files[0], "-o", tmp_path / "x"], capsys, "pickled", "--allow-pickle")
    assert load_pipeline(folder, allow_pickle=True).unet is not None


# 12. ComfyUI Save node paths and ranks: tests/test_comfyui_nodes.py (in a real ComfyUI)


def test_diff_files_still_round_trip(tmp_path, files):
    d = load_delta(files[0])
    save_diff(d, tmp_path / "d.safetensors")
    back = load_delta(tmp_path / "d.safetensors")
    for n, ld in d.layers.items():
        torch.testing.assert_close(back.layers[n].dense(), ld.dense(), rtol=1e-5, atol=1e-6)
