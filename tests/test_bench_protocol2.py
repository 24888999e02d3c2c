"""Protocol 2 of the quality bench (bench/quality/protocol2.py): the split keeps evaluation
concepts away from what methods see, the corpus drops the out-of-corpus objects, small counts
still evaluate every source, the validation choice follows its rule, the rule-based judge reads
clean renders, and the quick run produces every metric."""
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

QUALITY = Path(__file__).resolve().parents[1] / "bench" / "quality"


def _load(name):
    sys.path.insert(0, str(QUALITY))
    spec = importlib.util.spec_from_file_location(name, QUALITY / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def p2():
    return _load("protocol2")


@pytest.fixture(scope="module")
def world():
    from concept_edit.testbed.world import build_world

    return build_world(1000)


def test_split_roles_disjoint_and_sized(p2, world):
    sp = p2.make_split(world, 0)
    roles = ["dest", "preserve", "val_in", "test_in", "val_src", "test_src", "filler", "val_out", "test_out"]
    seen = [i for r in roles for i in sp[r]]
    assert len(seen) == len(set(seen)) == 1000
    assert len(sp["ooc"]) == 300 and set(sp["ooc"]) == set(sp["val_out"]) | set(sp["test_out"])
    assert min(len(sp[r]) for r in ("val_in", "test_in", "val_src", "test_src")) == 100
    assert p2.make_split(world, 0) == sp and p2.make_split(world, 1)["test_src"] != sp["test_src"]
    for part, other in (("test", "val"), ("val", "test")):
        order = p2.edit_order(sp, part)
        hold = set(sp[f"{part}_in"]) | set(sp[f"{part}_out"])
        # a run never edits its own holdouts, the other part's holdouts outside C0, destinations or the preserve set
        assert not set(order) & (hold | set(sp[f"{other}_out"]) | set(sp["dest"]) | set(sp["preserve"]))
        assert len(order) == len(set(order)) == 450
        assert all(sp["dest_of"][str(i)] in sp["dest"] for i in order)


def test_corpus_drops_out_of_corpus_objects(p2, world):
    sp = p2.make_split(world, 0)
    corpus = p2.protocol_corpus(world, sp, 3000)
    words = {w for c in corpus for w in c.replace(",", " ").split()}
    ooc = {world.objects[i].name for i in sp["ooc"]} | {world.objects[i].alias for i in sp["ooc"] if world.objects[i].alias}
    assert not words & ooc
    inside = {world.objects[i].name for i in sp["test_in"]}
    assert words & inside  # holdouts inside C0 are named by it
    assert 0.6 * 3000 < len(corpus) < 0.8 * 3000


def test_small_counts_evaluate_every_source_and_holdout_once(p2, world):
    sp = p2.make_split(world, 0)
    gs = p2.groups_for(sp, "test", 10, 100, 100)
    assert len(gs) == 10 and all(len(g["edited"]) == 10 for g in gs)
    assert sorted(i for g in gs for i in g["eval"]) == sorted(sp["test_src"])
    assert sorted(i for g in gs for i in g["hin"]) == sorted(sp["test_in"])
    assert sorted(i for g in gs for i in g["hout"]) == sorted(sp["test_out"][:100])
    big = p2.groups_for(sp, "test", 450, 100, 100)
    assert len(big) == 1 and big[0]["eval"] == sp["test_src"] and len(big[0]["edited"]) == 450
    with pytest.raises(ValueError):
        p2.groups_for(sp, "test", 451, 100, 100)


def test_neighbours_share_exactly_two_factors(p2, world):
    a = world.objects[0]
    nb = [o for o in world.objects if p2.shares_two(a, o)]
    assert nb and all(sum(x == y for x, y in zip(a.visual, o.visual)) == 2 for o in nb)
    assert not p2.shares_two(a, a)


def _cell(spec, n, s2d, hin, hout):
    m = lambda v: {"mean": v, "ci": 0.01, "n": 100}
    return {"spec": spec, "n": n, "metrics": {"S2D_para": m(s2d), "HD_in": m(hin), "HD_out": m(hout)}}


def test_choice_prefers_settings_meeting_the_aim(p2):
    cells = [_cell("emcid:cov_weight=100", 10, 0.9, -0.2, -0.3), _cell("emcid:cov_weight=1000", 10, 0.8, -0.01, -0.1),
             _cell("emcid:cov_weight=10000", 10, 0.1, 0.0, 0.0),
             _cell("emcid:cov_weight=100", 450, 0.7, -0.9, -0.9), _cell("emcid:cov_weight=1000", 450, 0.5, -0.3, -0.6)]
    ch = p2.choose(cells)
    assert ch["10"]["spec"] == "emcid:cov_weight=1000" and ch["10"]["meets_aim"]
    # a setting that edits nothing keeps the holdouts but does not meet the aim
    ch2 = p2.choose([_cell("emcid:cov_weight=10000", 100, 0.07, -0.03, -0.01), _cell("emcid:cov_weight=1000", 100, 0.87, -0.13, -0.17)])
    assert ch2["100"]["spec"] == "emcid:cov_weight=1000" and not ch2["100"]["meets_aim"]
    assert ch["450"]["spec"] == "emcid:cov_weight=1000" and not ch["450"]["meets_aim"]  # best S2D + HD in + HD out


def test_each_seed_chooses_on_its_own_validation_split(p2, tmp_path):
    import json

    for seed, good in ((0, "100"), (1, "1000")):  # seed 1's split favours another setting
        d = tmp_path / "cells" / "val" / f"seed{seed}"
        d.mkdir(parents=True)
        for w in ("100", "1000"):
            c = _cell(f"emcid:cov_weight={w}", 10, 0.9 if w == good else 0.5, -0.01, -0.01) | {"seed": seed}
            (d / f"{w}.json").write_text(json.dumps(c))
    ch = p2.tune(tmp_path, {"emcid:cov_weight": ["emcid:cov_weight=100", "emcid:cov_weight=1000"]})
    assert ch["emcid:cov_weight"]["seed0"]["10"]["value"] == 100
    assert ch["emcid:cov_weight"]["seed1"]["10"]["value"] == 1000


def test_one_setting_for_every_count(p2, tmp_path):
    """A method default is chosen once over every validation count and seed: most cells meeting the
    aim first (a value that wins at one count only loses), then S2D + HD; missing cells are an error."""
    cells = []
    for seed in (0, 1):
        cells += [_cell("emcid-auto:cov_ratio=10", 10, 0.9, -0.01, -0.01), _cell("emcid-auto:cov_ratio=10", 100, 0.85, -0.04, -0.1),
                  _cell("emcid-auto:cov_ratio=3", 10, 0.95, -0.0, -0.0), _cell("emcid-auto:cov_ratio=3", 100, 0.9, -0.3, -0.4)]
        for c in cells[-4:]:
            c["seed"] = seed
    ch = p2.choose_across_counts(cells)
    assert ch["spec"] == "emcid-auto:cov_ratio=10" and ch["cells_meeting_aim"] == 4 and ch["cells"] == 4
    assert ch["others"]["emcid-auto:cov_ratio=3"]["cells_meeting_aim"] == 2
    with pytest.raises(ValueError, match="missing"):
        p2.choose_across_counts(cells[:-1])
    d = tmp_path / "cells" / "val" / "seed0"
    d.mkdir(parents=True)
    for i, c in enumerate(cells):
        (d / f"{i}.json").write_text(json.dumps(c))
    fam = {"emcid-auto:cov_ratio": {"across_counts": ["emcid-auto:cov_ratio=10", "emcid-auto:cov_ratio=3"]}}
    assert p2.tune(tmp_path, fam)["emcid-auto:cov_ratio"]["all"]["value"] == 10


def test_spec_resolution_labels_and_rules(p2):
    name, opts, label = p2.resolve_spec("emcid-auto", 450, {})
    assert name == "emcid-auto" and opts == {} and "set by the method" in label and "the package's default" in label
    assert "cov_ratio 30" in p2.resolve_spec("emcid-auto:cov_ratio=30", 10, {})[2]
    assert "10,000 (the paper's)" in p2.resolve_spec("emcid", 10, {})[2]
    choices = {"emcid:cov_weight": {"seed0": {"100": {"value": 1000.0}}, "seed1": {"100": {"value": 10.0}}}}
    assert p2.resolve_spec("emcid:cov_weight=tuned", 100, choices)[1] == {"cov_weight": 1000.0}
    assert p2.resolve_spec("emcid:cov_weight=tuned", 100, choices, seed=1)[1] == {"cov_weight": 10.0}
    with pytest.raises(KeyError):
        p2.resolve_spec("emcid:cov_weight=tuned", 10, choices)
    with pytest.raises(KeyError):  # a seed whose validation split chose nothing
        p2.resolve_spec("emcid:cov_weight=tuned", 100, choices, seed=2)


def test_rule_based_judge_reads_renders(world):
    judge = _load("protocol2_judge")
    from concept_edit.testbed.render import render

    rng = np.random.default_rng(0)
    objs = [world.objects[i] for i in rng.choice(1000, 24, replace=False)]
    ims = np.stack([render(*o.visual, rng=rng) for o in objs]).astype(np.float32)
    ims = np.clip(ims + rng.normal(0, 12, ims.shape), 0, 255).astype(np.uint8)  # sampler-like noise
    vis, dist = judge.template_labels(ims)
    assert [tuple(v) for v in vis] == [o.visual for o in objs]
    assert (dist < 20).all()


def test_quick_run_end_to_end(p2, tmp_path):
    cells = p2.main(["run", "--quick", "--out", str(tmp_path / "out"), "--cache", str(tmp_path / "cache")])
    assert [c["n"] for c in cells] == [1, 2] and all("error" not in c for c in cells)
    one = cells[0]
    assert one["groups"] == 2  # two single-object edits cover both sources
    m = one["metrics"]
    assert m["S2D_para"]["n"] == 2 and m["HD_in"]["n"] == 2 and m["HD_out"]["n"] == 2
    assert m["HD_nbr"]["n"] + m["HD_far"]["n"] == 4
    # UCE replaces one object cleanly on the bundled model
    assert m["S2D_para"]["mean"] > 0.5 and m["SF"]["mean"] > 0.5
    assert (tmp_path / "out" / "cells" / "test" / "seed0" / "uce__n1.json").exists()
    again = p2.main(["run", "--quick", "--out", str(tmp_path / "out"), "--cache", str(tmp_path / "cache")])
    assert json.dumps(again[0]["metrics"]) == json.dumps(one["metrics"])  # resumed from the saved cell
    assert list((tmp_path / "out" / "samples").glob("*.npz"))
