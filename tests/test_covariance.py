"""C0 statistics: correctness on a small caption list, on-disk cache with sample count and fingerprints."""
import os
import time

import torch
from safetensors import safe_open

CAPS = ["a cat on a mat", "a dog in the park", "an old red car"]


def test_second_moment_matches_direct_computation_and_caches(tiny, tmp_path):
    from concept_edit.adapters import text_encoder as te
    from concept_edit.engines import second_moments as cv

    _, model = tiny("sd1")
    name = te.fc2_name("text_encoder", 1)
    C, info = cv.second_moments(model, [name, cv.TEXT_STATES], CAPS, cache_dir=tmp_path, positions="tokens", progress=False)
    assert info["computed"] == [name, cv.TEXT_STATES]
    # direct: fc2 inputs at every real token of each caption
    rows = []
    for c in CAPS:
        ids = [49406, *model.token_ids(c), 49407]
        _, st = te.run_encoder(model, "text_encoder", torch.tensor([ids]), None, fc2_layers=[1])
        rows.append(st[("fc2_in", 1)][0].double())
    X = torch.cat(rows)
    assert C[name].dtype == torch.float64  # kept in double precision (EMCID's system is ill-conditioned)
    torch.testing.assert_close(C[name], X.mT @ X / X.shape[0], rtol=1e-5, atol=1e-6)
    assert info["n_samples"][name] == X.shape[0]
    with safe_open(info["cache_file"], "pt") as f:
        meta = f.metadata()
    assert meta["corpus_fingerprint"] == cv.corpus_fingerprint(CAPS) and str(X.shape[0]) in meta["n_samples"]
    again, info2 = cv.second_moments(model, [name], CAPS, cache_dir=tmp_path, positions="tokens", progress=False)
    assert info2["computed"] == [] and torch.equal(again[name], C[name])
    # another corpus -> another file; padded positions -> 77 samples per caption
    _, info3 = cv.second_moments(model, [name], CAPS[:2], cache_dir=tmp_path, progress=False)
    assert info3["cache_file"] != info["cache_file"] and info3["n_samples"][name] == 2 * 77


def test_cache_file_grows_by_layer_and_folder_keeps_the_recent_files(tiny, tmp_path, monkeypatch):
    """A file gains layers without losing the ones it had; a folder keeps $CONCEPT_EDIT_C0_FILES
    full-corpus files, least recently used removed (recomputed when needed again)."""
    from concept_edit.adapters import text_encoder as te
    from concept_edit.engines import second_moments as cv

    _, model = tiny("sd1")
    l0, l1 = te.fc2_name("text_encoder", 0), te.fc2_name("text_encoder", 1)
    C0, info = cv.second_moments(model, [l0], CAPS, cache_dir=tmp_path, progress=False)
    C1, info1 = cv.second_moments(model, [l1], CAPS, cache_dir=tmp_path, progress=False)
    assert info1["cache_file"] == info["cache_file"] and info1["computed"] == [l1]
    with safe_open(info["cache_file"], "pt") as f:
        assert set(f.keys()) == {l0, l1}
        torch.testing.assert_close(f.get_tensor(l0), C0[l0], rtol=0, atol=0)
    monkeypatch.setenv("CONCEPT_EDIT_C0_FILES", "2")
    files = [info["cache_file"]]
    for k in (1, 2):  # other corpora -> other files; the oldest goes once there are more than 2
        os.utime(files[-1], (time.time() - 100 + k, time.time() - 100 + k))  # distinct, ordered mtimes
        _, i = cv.second_moments(model, [l0], CAPS[k:], cache_dir=tmp_path, progress=False)
        files.append(i["cache_file"])
    assert sorted(p.name for p in tmp_path.glob("c0_*_f64.safetensors")) == sorted(os.path.basename(f) for f in files[1:])
    assert i["evicted_files"] == [os.path.basename(files[0])]
    again, info4 = cv.second_moments(model, [l0, l1], CAPS, cache_dir=tmp_path, progress=False)  # recomputed, same
    assert info4["computed"] == [l0, l1]
    torch.testing.assert_close(again[l0], C0[l0])
    torch.testing.assert_close(again[l1], C1[l1])


def test_excluding_edited_concepts_equals_c0_of_the_other_captions(tiny, tmp_path):
    """Subtracting the dropped captions from the cached sums (few dropped) and summing the kept
    ones (most dropped) both give C0 of the remaining captions; the cache keeps the full corpus."""
    from concept_edit.adapters import text_encoder as te
    from concept_edit.engines import second_moments as cv

    _, model = tiny("sd1")
    name = te.fc2_name("text_encoder", 0)
    caps = CAPS + ["a black cat", "a Cat-like lamp", "a catalogue of cars", "the dog and the cat"]
    assert cv.split_mentions(caps, ["cat"])[1] == ["a cat on a mat", "a black cat", "a Cat-like lamp", "the dog and the cat"]
    full, _ = cv.second_moments(model, [name], caps, cache_dir=tmp_path, progress=False)
    for terms in (["car"], ["cat", "dog"]):  # 1 of 7 dropped (subtract), 5 of 7 dropped (direct)
        kept, dropped = cv.split_mentions(caps, terms)
        C, info = cv.second_moments(model, [name], caps, cache_dir=tmp_path, progress=False, exclude=terms)
        ref, ref_info = cv.second_moments(model, [name], kept, use_cache=False, progress=False)
        assert info["n_excluded_captions"] == len(dropped) and info["computed"] == []
        assert info["n_samples"] == ref_info["n_samples"] == {name: 77 * len(kept)}
        torch.testing.assert_close(C[name], ref[name], rtol=1e-4, atol=1e-6)
        assert not torch.allclose(C[name], full[name], rtol=1e-3)
    again, _ = cv.second_moments(model, [name], caps, cache_dir=tmp_path, progress=False)
    assert torch.equal(again[name], full[name])
    try:
        cv.second_moments(model, [name], ["a cat"], cache_dir=tmp_path, progress=False, exclude=["cat"])
    except cv.CovarianceCacheError as e:
        assert "every caption" in str(e)
    else:
        raise AssertionError("a corpus with nothing left to preserve must be refused")
