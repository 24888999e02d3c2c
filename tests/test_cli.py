"""The command line end to end on a tiny model saved to disk, and its refusals."""
import json
import subprocess
import sys

import pytest
import torch
from concept_edit.adapters.diffusers_model import ModelLoadError, load_pipeline
from concept_edit.cli.main import main
from concept_edit.files.formats import load_delta, read_metadata
from concept_edit.testbed import CLASSIFIER_PATH, model_dir
from PIL import Image


def test_edit_info_apply_export(tiny_sd1_dir, tmp_path, capsys):
    delta_path = tmp_path / "e.safetensors"
    rc = main(["edit", "--model", str(tiny_sd1_dir), "--erase-style", "Van Gogh", "--replace", "cat=dog",
               "--preserve", "horse", "-o", str(delta_path)])
    assert rc == 0 and delta_path.exists()
    meta = read_metadata(delta_path)
    assert [e["kind"] for e in meta["edits"]] == ["erase", "replace"]
    assert meta["edits"][0]["target"] == "art"

    grid = tmp_path / "grid.png"
    assert main(["apply", "--model", str(tiny_sd1_dir), str(delta_path), "--prompt", "a cat", "--steps", "2", "-o", str(grid)]) == 0
    img = Image.open(grid)
    assert img.size[0] > 128 and img.size[1] > 2 * 100

    out = tmp_path / "exported"
    assert main(["export", "--model", str(tiny_sd1_dir), str(delta_path), "-o", str(out)]) == 0
    src = load_pipeline(tiny_sd1_dir)
    new = load_pipeline(out)
    d = load_delta(delta_path)
    for name, ld in d.layers.items():
        sub = name.partition(".")[2]
        w0 = src.unet.get_submodule(sub).weight.detach()
        torch.testing.assert_close(new.unet.get_submodule(sub).weight.detach(), w0 + ld.dense(), rtol=1e-5, atol=1e-6)
    # the source folder is untouched: exporting again onto the same output is refused
    assert main(["export", "--model", str(tiny_sd1_dir), str(delta_path), "-o", str(out)]) == 2


def test_info_prints_metadata(tiny_sd1_dir, tmp_path, capsys):
    p = tmp_path / "e.safetensors"
    assert main(["edit", "--model", str(tiny_sd1_dir), "--erase", "cat", "-o", str(p)]) == 0
    capsys.readouterr()
    assert main(["info", str(p)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["metadata"]["method"] == "uce" and out["layers"]


def test_plan_file(tiny_sd1_dir, tmp_path):
    plan = tmp_path / "plan.yaml"
    plan.write_text("edits:\n" + "".join(f"  - erase: concept number {i}\n" for i in range(30)) +
                    "preserve: [horse, tree]\ntemplates: ['{}', 'a photo of {}']\n")
    out = tmp_path / "many.safetensors"
    assert main(["edit", "--model", str(tiny_sd1_dir), "--plan", str(plan), "-o", str(out)]) == 0
    meta = read_metadata(out)
    assert len(meta["edits"]) == 30 and meta["n_edit_keys"] == 60


def test_refusals(tiny_sd1_dir, tmp_path, capsys):
    existing = tmp_path / "exists.safetensors"
    existing.write_text("keep me")
    assert main(["edit", "--model", str(tiny_sd1_dir), "--erase", "cat", "-o", str(existing)]) == 2
    assert existing.read_text() == "keep me"
    assert "already exists" in capsys.readouterr().err

    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": {}}, ckpt)
    with pytest.raises(ModelLoadError, match="pickled"):
        load_pipeline(ckpt)
    single = tmp_path / "model.safetensors"
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(1)}, str(single))
    with pytest.raises(ModelLoadError, match="needs a local config"):
        load_pipeline(single)
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_pipeline(tmp_path / "nope")

    # a delta made for SDXL refused on SD 1.x with a message naming the problem
    from concept_edit.adapters.diffusers_model import DiffusersModel
    from concept_edit.core.plan import plan_from_dict
    from concept_edit.engines.uce import uce_delta
    from concept_edit.files.formats import save_lora
    from concept_edit.testing.tiny_models import build_tiny_pipeline

    xl = DiffusersModel(build_tiny_pipeline("sdxl"))
    p = tmp_path / "xl.safetensors"
    save_lora(uce_delta(xl, plan_from_dict({"edits": [{"erase": "cat"}]}), progress=False), p)
    assert main(["apply", "--model", str(tiny_sd1_dir), str(p), "--prompt", "x", "-o", str(tmp_path / "g.png")]) == 2
    err = capsys.readouterr().err
    assert "does not have" in err or "shape" in err


def test_module_entry_point(tmp_path):
    r = subprocess.run([sys.executable, "-m", "concept_edit", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "demo" in r.stdout


@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_load_folder_of_each_family(tiny, family, tmp_path):
    from concept_edit.adapters.diffusers_model import DiffusersModel

    pipe, _ = tiny(family)
    pipe.save_pretrained(str(tmp_path / family))
    loaded = load_pipeline(tmp_path / family)
    m = DiffusersModel(loaded)
    assert m.family == family
    if family == "sd2":
        assert loaded.scheduler.config.prediction_type == "v_prediction"
    out = tmp_path / "e.safetensors"
    assert main(["edit", "--model", str(tmp_path / family), "--erase", "cat", "-o", str(out), "--bf16"]) == 0
    assert read_metadata(out)["family"] == family


def test_export_stacks_several_deltas(tiny_sd1_dir, tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    assert main(["edit", "--model", str(tiny_sd1_dir), "--erase", "cat", "-o", str(a)]) == 0
    assert main(["edit", "--model", str(tiny_sd1_dir), "--replace", "tree=bush", "-o", str(b)]) == 0
    out = tmp_path / "both"
    assert main(["export", "--model", str(tiny_sd1_dir), str(a), str(b), "-o", str(out)]) == 0
    src, new = load_pipeline(tiny_sd1_dir), load_pipeline(out)
    da, db = load_delta(a), load_delta(b)
    for name in da.layers:
        sub = name.partition(".")[2]
        expect = src.unet.get_submodule(sub).weight.detach() + da.layers[name].dense() + db.layers[name].dense()
        torch.testing.assert_close(new.unet.get_submodule(sub).weight.detach(), expect, rtol=1e-5, atol=1e-5)


def test_text_encoder_delta_through_cli(tiny_sd1_dir, tmp_path):
    """EMCID edits text-encoder fc2 layers: edit, export and reload through the CLI."""
    plan = tmp_path / "plan.yaml"
    plan.write_text("method: emcid\noptions: {targets: dest_hidden}\nedits:\n  - replace: cat\n    with: dog\n")
    d = tmp_path / "te.safetensors"
    assert main(["edit", "--model", str(tiny_sd1_dir), "--plan", str(plan), "-o", str(d)]) == 0
    delta = load_delta(d)
    assert delta.layers and all(n.startswith("text_encoder.text_model.encoder.layers.") for n in delta.layers)
    out = tmp_path / "exported"
    assert main(["export", "--model", str(tiny_sd1_dir), str(d), "-o", str(out)]) == 0
    from concept_edit.adapters.diffusers_model import DiffusersModel

    src, new = DiffusersModel(load_pipeline(tiny_sd1_dir)), DiffusersModel(load_pipeline(out))
    for name, ld in delta.layers.items():
        torch.testing.assert_close(new.weights([name])[name].detach(), src.weights([name])[name].detach() + ld.dense(),
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not (model_dir() / "model_index.json").exists() or not CLASSIFIER_PATH.exists(),
                    reason="testbed weights not present")
def test_demo_edits_the_bundled_model(tmp_path, one_thread):
    """The README's first command: edits the bundled model, writes the delta and a before/after grid."""
    import numpy as np
    from concept_edit.testbed import demo_plan, get_world, load_classifier
    from concept_edit.testbed.evaluate import concept_hit, head_probs

    assert main(["demo", "-o", str(tmp_path), "--steps", "6"]) == 0
    (delta_path,), (grid_path,) = tmp_path.glob("demo-*.safetensors"), tmp_path.glob("demo-*.png")
    plan = demo_plan()
    delta = load_delta(delta_path)
    assert delta.layers and [e["source"] for e in delta.metadata["edits"]] == [e.get("erase") or e.get("replace")
                                                                              for e in plan["edits"]]
    # one column per edited and preserved concept, rows before/after; 32 px images shown as 128 px cells
    concepts = [e.get("erase") or e.get("replace") for e in plan["edits"]] + plan["preserve"]
    grid = np.asarray(Image.open(grid_path).convert("RGB"))
    assert grid.shape == (20 + 2 * 128, 150 + 128 * len(concepts), 3)

    def cell(row, concept):
        j = concepts.index(concept)
        return grid[20 + 128 * row : 148 + 128 * row : 4, 150 + 128 * j : 278 + 128 * j : 4]

    world, clf = get_world(), load_classifier()
    objects = {o.name for o in world.objects}

    def shows(img, concept):
        return bool(concept_hit(head_probs(clf, img[None]), world.object_by_name(concept))[0])

    replace = next(e for e in plan["edits"] if "replace" in e)
    src, dst, kept = replace["replace"], replace["with"], next(c for c in plan["preserve"] if c in objects)
    before, after = cell(0, src), cell(1, src)
    assert shows(before, src) and not shows(after, src) and shows(after, dst)
    assert np.abs(after.astype(float) - before).mean() > 20
    assert shows(cell(0, kept), kept) and shows(cell(1, kept), kept)
    assert np.abs(cell(1, kept).astype(float) - cell(0, kept)).mean() < 5
