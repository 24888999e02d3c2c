"""The host-neutral progress and cache-root mechanisms (core/progress.py, core/cache.py), without a host.

A reporter installed with ``reporting`` sees every phase of a real edit as a bar that starts at 0,
never goes back and ends at its total, whether or not the terminal bars are on; nested bars fold
into the outer one; caches go to $CONCEPT_EDIT_CACHE, else the host's root, else ~/.cache.
"""
from pathlib import Path

import pytest
from concept_edit.core.cache import cache_root, host_cache_root
from concept_edit.core.plan import plan_from_dict
from concept_edit.core.progress import reporting, tqdm


def phases(events):
    """Split (done, total, desc) reports into phases: a new phase starts at done == 0."""
    out = []
    for done, total, desc in events:
        if done == 0 or not out:
            out.append([])
        out[-1].append((done, total, desc))
    return out


def check_phases(events):
    assert events, "nothing was reported"
    for ph in phases(events):
        dones = [d for d, _, _ in ph]
        assert dones[0] == 0 and dones == sorted(dones) and len(set(dones)) == len(dones), ph
        assert len({(t, s) for _, t, s in ph}) == 1, ph  # one bar per phase
        assert dones[-1] == ph[0][1], ph  # reaches its total


def test_no_reporter_is_plain_tqdm():
    from tqdm.auto import tqdm as plain

    assert isinstance(tqdm([1, 2], desc="x", disable=True), plain)


def test_nested_bars_fold_into_the_outer_one_and_reports_ignore_disable():
    events = []
    with reporting(lambda d, t, s: events.append((d, t, s))):
        for _ in tqdm(range(2), desc="chunks", disable=True):
            for _ in tqdm(range(4), desc="steps", disable=True):
                pass
            for _ in tqdm(range(2), desc="again", disable=True):  # a second inner phase: never goes back
                pass
        for _ in tqdm([], desc="empty"):  # total 0: nothing to show
            pass
        for _ in tqdm(iter([1, 2]), desc="unsized"):  # unsized: terminal only
            pass
        it = tqdm(range(1), desc="with postfix", disable=True)
        for _ in it:
            it.set_postfix(loss="1")  # the terminal bar's methods still work (stage I uses this)
    assert [d for d, _, _ in events] == [0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 0, 1]
    assert {(t, s) for _, t, s in events} == {(2, "chunks"), (1, "with postfix")}
    check_phases(events)


def test_an_abandoned_loop_closes_its_bar_and_a_raising_reporter_stops_the_loop():
    events = []
    with reporting(lambda d, t, s: events.append((d, t, s))):
        for i in tqdm(range(5), desc="outer"):
            if i == 1:
                break
        for _ in tqdm(range(3), desc="next"):  # a new top-level bar, not nested in the abandoned one
            pass
    assert events[-1] == (3, 3, "next")

    class Cancel(Exception):
        pass

    def cancel_at_2(d, t, s):
        if d >= 2:
            raise Cancel

    seen = []
    with reporting(cancel_at_2), pytest.raises(Cancel):
        for i in tqdm(range(10), desc="x"):
            seen.append(i)
    assert seen == [0, 1]


def test_a_real_uce_edit_reports_monotone_phases_reaching_their_totals(tiny):
    from concept_edit.engines import compute_delta

    _, model = tiny("sd1")
    model.batch_size = 2  # several encoding chunks on a tiny edit
    plan = plan_from_dict({"edits": [{"erase": c, "guide": ""} for c in ("Van Gogh", "Monet", "a cat", "Picasso")],
                           "preserve": ["a dog", "a red car", "horse"], "lambda": 0.5})
    events = []
    try:
        with reporting(lambda d, t, s: events.append((d, t, s))):
            delta = compute_delta(model, plan, progress=False)
    finally:
        model.batch_size = 64
    check_phases(events)
    descs = [ph[0][2] for ph in phases(events)]
    assert descs == ["encoding prompts", "layers"], descs
    assert phases(events)[1][-1][1] == len(delta.layers)


def test_cache_root_precedence(monkeypatch, tmp_path, tiny):
    from concept_edit.engines import second_moments as cv

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("CONCEPT_EDIT_CACHE", raising=False)
    assert cache_root() == tmp_path / "home" / ".cache" / "concept_edit"
    with host_cache_root(tmp_path / "host"):
        assert cv.default_cache_dir() == tmp_path / "host" / "covariance"
        _, model = tiny("sd1")
        _, info = cv.second_moments(model, [cv.TEXT_STATES], ["a cat", "a dog"], progress=False)
        assert Path(info["cache_file"]).parent == tmp_path / "host" / "covariance"
        monkeypatch.setenv("CONCEPT_EDIT_CACHE", str(tmp_path / "env"))  # the user's choice beats the host's
        assert cache_root() == tmp_path / "env"
    monkeypatch.delenv("CONCEPT_EDIT_CACHE")
    assert cache_root() == tmp_path / "home" / ".cache" / "concept_edit"
    assert not (tmp_path / "home").exists()


def test_c0_passes_show_as_one_bar(tiny, tmp_path):
    """C0 over several layer groups is one phase whose batches fold into it."""
    from concept_edit.adapters import text_encoder as te
    from concept_edit.engines import second_moments as cv

    _, model = tiny("sd1")
    names = [te.fc2_name("text_encoder", i) for i in (0, 1, 2)]
    events = []
    with reporting(lambda d, t, s: events.append((d, t, s))):
        cv.second_moments(model, names, ["a cat", "a dog", "a car"], cache_dir=tmp_path, batch_size=2,
                          layers_per_pass=1, progress=False)
    check_phases(events)
    assert [ph[0][1:] for ph in phases(events)] == [(3, "C0 passes")]
    assert [d for d, _, _ in events] == [0, 0.5, 1, 1.5, 2, 2.5, 3]
