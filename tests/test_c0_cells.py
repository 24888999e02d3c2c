"""C0 with edited captions left out, from the cell store (engines/c0_cells.py): the same C0 as a
direct computation over the kept captions, for several and overlapping exclusion sets; reuse of
the on-disk store across calls and processes; invalidation; the budget and the store limit."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORDS = ["cat", "dog", "car", "tree", "boat", "bird"]
# captions naming none, one or several of WORDS, and near misses that must not match ("catalogue")
CAPS = [
    "a cat on a mat", "a dog in the park", "an old red car", "a cat and a dog", "the dog chased the car",
    "a bird in a tree", "a tree by a boat", "a Cat-like lamp", "a catalogue of cars", "a hotdog stand",
    "a boat, a bird and a cat", "a quiet street", "an empty room", "sunset over the sea", "a DOG",
    "a red car under a tree", "mountains at dawn", "a bowl of fruit", "two birds", "a boat race",
]


def _names(model, layers=(0, 1)):
    from concept_edit.adapters import text_encoder as te

    return [te.fc2_name("text_encoder", i) for i in layers]


def _direct(model, names, caps, terms, positions="padded"):
    from concept_edit.engines import second_moments as cv

    kept, _ = cv.split_mentions(caps, terms)
    m, counts, _ = cv.caption_moments(model, kept, names, batch_size=7, positions=positions, progress=False)
    return m, counts


def _close(a, b):  # float64 rounding on top of identical float32 keys
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("positions", ["padded", "tokens"])
def test_cells_equal_direct_c0_of_the_kept_captions(tiny, tmp_path, positions):
    from concept_edit.engines import second_moments as cv

    _, model = tiny("sd1")
    names = _names(model)
    kw = dict(cache_dir=tmp_path, positions=positions, progress=False)
    full, _ = cv.second_moments(model, names, CAPS, **kw)
    sets = [
        ["cat"],                       # few dropped; "Cat-like" matches, "catalogue" does not
        ["cat", "dog"],                # "a cat and a dog" names both: dropped once
        ["cat", "dog", "car", "tree"],  # most dropped
        ["bird"],                      # "two birds" is not "bird"
        ["dog", "cat"],                # the same set again, other order: answered by the cells
        ["boat", "car", "cat", "dog", "tree", "bird"],
        ["zebra"],                     # names nothing: the full corpus
    ]
    for terms in sets:
        C, info = cv.second_moments(model, names, CAPS, exclude=terms, **kw)
        ref, ref_counts = _direct(model, names, CAPS, terms, positions)
        assert info["n_samples"] == ref_counts, terms
        for n in names:
            _close(C[n], ref[n])
        D, dinfo = cv.second_moments(model, names, CAPS, exclude=terms, exclusion="direct", **kw)
        for n in names:
            _close(C[n], D[n])
        if terms == ["zebra"]:
            assert info["exclusion"] is None and all(torch.equal(C[n], full[n]) for n in names)
        else:
            assert info["exclusion"]["mode"] == "cells" and dinfo["exclusion"]["mode"] == "direct"
            assert info["n_excluded_captions"] == len(cv.split_mentions(CAPS, terms)[1])
    again, info = cv.second_moments(model, names, CAPS, exclude=["dog", "cat"], **kw)
    assert info["exclusion"]["captions_encoded"] == 0 and info["exclusion"]["split_cells"] == 0
    # the full-corpus file is untouched by exclusions
    f, finfo = cv.second_moments(model, names, CAPS, **kw)
    assert finfo["computed"] == [] and all(torch.equal(f[n], full[n]) for n in names)


def test_cells_encode_only_the_difference_and_are_reused(tiny, tmp_path):
    from concept_edit.engines import second_moments as cv

    _, model = tiny("sd1")
    names = _names(model, (1,))
    kw = dict(cache_dir=tmp_path, progress=False)
    cv.second_moments(model, names, CAPS, **kw)
    n_cat = len(cv.split_mentions(CAPS, ["cat"])[1])
    _, i1 = cv.second_moments(model, names, CAPS, exclude=["cat"], **kw)
    assert i1["exclusion"]["captions_encoded"] == n_cat and i1["exclusion"]["rebuilt"] == "new store"
    # nested: only the captions the new concepts add are encoded
    add = len(cv.split_mentions(CAPS, ["cat", "dog"])[1]) - n_cat
    _, i2 = cv.second_moments(model, names, CAPS, exclude=["cat", "dog"], **kw)
    assert i2["exclusion"]["captions_encoded"] == add and i2["exclusion"]["rebuilt"] is None
    # back to a set the cells answer: nothing encoded
    C, i3 = cv.second_moments(model, names, CAPS, exclude=["cat"], **kw)
    assert i3["exclusion"]["captions_encoded"] == 0
    _close(C[names[0]], _direct(model, names, CAPS, ["cat"])[0][names[0]])


def test_cells_survive_the_process(tiny, tmp_path):
    """Another process with the same model and corpus answers from the store on disk."""
    from concept_edit.engines import second_moments as cv

    _, model = tiny("sd1")
    names = _names(model)
    C, info = cv.second_moments(model, names, CAPS, cache_dir=tmp_path, progress=False, exclude=["car", "tree"])
    out = tmp_path / "child.safetensors"
    code = f"""
import json, sys
from safetensors.torch import save_file
from concept_edit.adapters.diffusers_model import DiffusersModel
from concept_edit.testing.tiny_models import build_tiny_pipeline
from concept_edit.engines import second_moments as cv
model = DiffusersModel(build_tiny_pipeline("sd1"))
assert cv.model_fingerprint(model) == {cv.model_fingerprint(model)!r}
C, info = cv.second_moments(model, {names!r}, {CAPS!r}, cache_dir={str(tmp_path)!r}, progress=False, exclude=["tree", "car"])
save_file({{k: v.contiguous() for k, v in C.items()}}, {str(out)!r})
print(json.dumps(info["exclusion"]))
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(cv.__file__).parents[2]), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    child = json.loads(r.stdout.strip().splitlines()[-1])
    assert child["captions_encoded"] == 0 and child["rebuilt"] is None and child["store"] == info["exclusion"]["store"]
    from safetensors.torch import load_file

    got = load_file(str(out))
    for n in names:
        assert torch.equal(got[n], C[n])


def test_cells_are_invalidated_by_model_corpus_positions_and_layers(tiny, tmp_path):
    from concept_edit.engines import second_moments as cv

    _, model = tiny("sd1")
    names = _names(model)
    kw = dict(cache_dir=tmp_path, progress=False, exclude=["cat", "dog"])
    _, base = cv.second_moments(model, names, CAPS, **kw)
    stores = {base["exclusion"]["store"]}
    for variant in (dict(captions=CAPS[:-1]), dict(positions="tokens"), dict(names=names[:1])):
        caps = variant.get("captions", CAPS)
        nm = variant.get("names", names)
        C, info = cv.second_moments(model, nm, caps, positions=variant.get("positions", "padded"), **kw)
        assert info["exclusion"]["store"] not in stores and info["exclusion"]["rebuilt"] == "new store"
        stores.add(info["exclusion"]["store"])
        ref, _ = _direct(model, nm, caps, ["cat", "dog"], variant.get("positions", "padded"))
        for n in nm:
            _close(C[n], ref[n])
    # an edited text encoder is another model: another store, and the C0 of the edited encoder
    w = next(p for k, p in model.pipe.text_encoder.named_parameters() if k.endswith("layers.0.mlp.fc1.weight"))
    old = w.detach().clone()
    try:
        with torch.no_grad():
            w.mul_(1.5)
        C, info = cv.second_moments(model, names, CAPS, **kw)
        assert info["exclusion"]["store"] not in stores and info["exclusion"]["rebuilt"] == "new store"
        ref, _ = _direct(model, names, CAPS, ["cat", "dog"])
        for n in names:
            _close(C[n], ref[n])
    finally:
        with torch.no_grad():
            w.copy_(old)
    assert cv.model_fingerprint(model) == base["model_fingerprint"]


def test_broken_store_is_rebuilt_and_still_exact(tiny, tmp_path):
    from concept_edit.engines import second_moments as cv

    _, model = tiny("sd1")
    names = _names(model, (0,))
    kw = dict(cache_dir=tmp_path, progress=False)
    _, info = cv.second_moments(model, names, CAPS, exclude=["car"], **kw)
    store = Path(info["exclusion"]["store"])
    ref, _ = _direct(model, names, CAPS, ["car", "boat"])
    # cell files gone (e.g. replaced by another process): rebuilt from the full-corpus sums (a file
    # is checked when it is read: a cell used as a whole on the dropped side is not read)
    for p in store.glob("cell_*.safetensors"):
        p.unlink()
    C, info = cv.second_moments(model, names, CAPS, exclude=["car", "boat"], **kw)
    assert info["exclusion"]["rebuilt"] and "cell_" in info["exclusion"]["rebuilt"]
    _close(C[names[0]], ref[names[0]])
    # the files of the two cells swapped (another cell's sum under this name): refused by their
    # metadata, rebuilt
    a, b = sorted(store.glob("cell_*.safetensors"))
    da, db = a.read_bytes(), b.read_bytes()
    a.write_bytes(db)
    b.write_bytes(da)
    C, info = cv.second_moments(model, names, CAPS, exclude=["car", "boat"], **kw)
    assert info["exclusion"]["rebuilt"]
    _close(C[names[0]], ref[names[0]])
    # a garbage partition file
    (store / "partition.safetensors").write_bytes(b"not safetensors")
    C, info = cv.second_moments(model, names, CAPS, exclude=["car", "boat"], **kw)
    assert info["exclusion"]["rebuilt"]
    _close(C[names[0]], ref[names[0]])
    assert not [p for p in store.iterdir() if "concept-edit-tmp" in p.name]


def test_budget_bounds_cells_and_stores(tiny, tmp_path, monkeypatch):
    from concept_edit.engines import second_moments as cv

    _, model = tiny("sd1")
    names = _names(model)
    kw = dict(cache_dir=tmp_path, progress=False)
    # a budget of 3 cells
    d = cv.second_moments(model, names, CAPS, **kw)[0][names[0]].shape[0]
    budget = 3 * len(names) * d * (d + 1) // 2 * 8
    for terms in (["cat"], ["cat", "dog"], ["cat", "dog", "car"], ["tree"], ["cat", "dog"], ["bird", "boat"]):
        C, info = cv.second_moments(model, names, CAPS, exclude=terms, cell_budget=budget, **kw)
        x = info["exclusion"]
        assert x["max_cells"] == 3 and x["cells"] <= 3
        assert len(list(Path(x["store"]).glob("cell_*.safetensors"))) == x["cells"] * len(names)
        ref, _ = _direct(model, names, CAPS, terms)
        for n in names:
            _close(C[n], ref[n])
    # below two cells the store still keeps two (any one exclusion needs them)
    _, info = cv.second_moments(model, names, CAPS, exclude=["car"], cell_budget=1, **kw)
    assert info["exclusion"]["max_cells"] == 2 and info["exclusion"]["cells"] == 2
    # at most CONCEPT_EDIT_C0_CELL_STORES stores per folder, least recently used removed
    monkeypatch.setenv("CONCEPT_EDIT_C0_CELL_STORES", "2")
    seen = []
    for i in range(3):
        _, info = cv.second_moments(model, names, CAPS[i:], exclude=["cat"], **kw)
        seen.append(Path(info["exclusion"]["store"]).name)
    assert sorted(p.name for p in tmp_path.glob("c0x_*")) == sorted(seen[-2:])
    assert info["exclusion"]["evicted_stores"]


def test_direct_mode_and_uncached_calls_keep_the_old_path(tiny, tmp_path, monkeypatch):
    from concept_edit.engines import second_moments as cv

    _, model = tiny("sd1")
    names = _names(model, (0,))
    _, info = cv.second_moments(model, names, CAPS, use_cache=False, progress=False, exclude=["cat"])
    assert info["exclusion"] == {"mode": "direct", "captions_encoded": 4}  # the 4 captions naming cat
    monkeypatch.setenv("CONCEPT_EDIT_C0_EXCLUSION", "direct")
    _, info = cv.second_moments(model, names, CAPS, cache_dir=tmp_path, progress=False, exclude=["cat"])
    assert info["exclusion"]["mode"] == "direct" and not list(tmp_path.glob("c0x_*"))
    with pytest.raises(ValueError):
        cv.second_moments(model, names, CAPS, cache_dir=tmp_path, progress=False, exclude=["cat"], exclusion="sometimes")


def test_a_store_that_cannot_be_written_falls_back_to_the_direct_path(tiny, tmp_path, monkeypatch):
    from concept_edit.engines import c0_cells
    from concept_edit.engines import second_moments as cv

    _, model = tiny("sd1")
    names = _names(model, (0,))

    def fail(self):
        raise c0_cells._StoreBroken("disk full")

    monkeypatch.setattr(c0_cells._Store, "save", fail)
    C, info = cv.second_moments(model, names, CAPS, cache_dir=tmp_path, progress=False, exclude=["cat", "car"])
    assert info["exclusion"]["mode"] == "direct" and info["exclusion"]["store_failed"]
    _close(C[names[0]], _direct(model, names, CAPS, ["cat", "car"])[0][names[0]])
