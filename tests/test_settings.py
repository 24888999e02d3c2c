"""Every setting of every method is honoured (change it, the delta changes as the method says) or
refused with a message; plan files are schema-checked; CLI flags and node widgets build the same
settings; the metadata records only the settings in effect."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from concept_edit.core.plan import PlanError, load_plan, plan_from_dict
from concept_edit.core.settings import SETTINGS, SettingsError, build_settings
from concept_edit.engines import compute_delta

pytestmark = pytest.mark.filterwarnings("ignore::concept_edit.solvers.linalg.IllConditionedWarning",
                                        "ignore:C0 of:UserWarning")

CORPUS = ["a photo of a cat", "a dog on the grass", "a red car", "a tree in a field", "a house by the sea", ""]
TEMPLATES = ["a photo of a {}", "{}"]
EDITS = [{"replace": "cat", "with": "dog"}, {"erase": "tree"}]
PRESERVE = ["house", "bird"]


def _plan(method: str, **settings):
    d = {"method": method, "edits": [dict(e) for e in EDITS], "templates": TEMPLATES, "preserve": PRESERVE}
    d.update({k: settings.pop(k) for k in ("edits", "preserve", "preserve_empty", "templates") if k in settings})
    d["options"] = settings
    return plan_from_dict(d)


def _te_base(tmp_path) -> dict:
    return {"targets": "dest_hidden", "corpus": CORPUS, "cov_cache_dir": str(tmp_path / "c0"), "layers": "0-1"}


def _delta(model, method, **settings):
    return compute_delta(model, _plan(method, **settings), progress=False)


def _diff(a, b) -> float:
    """Largest relative change between two deltas' dense layers (1.0 if their layer sets differ)."""
    if set(a.layers) != set(b.layers):
        return 1.0
    out = 0.0
    for n, la in a.layers.items():
        da, db = la.dense(torch.float64), b.layers[n].dense(torch.float64)
        out = max(out, ((da - db).norm() / da.norm().clamp_min(1e-12)).item())
    return out


# (method, base settings, changed settings). Each row must change the delta.
UCE_CASES = [
    ({}, {"lambda": 5.0}),
    ({}, {"erase_scale": 3.0}),
    ({}, {"preserve_scale": 20.0}),
    ({}, {"token": "aligned"}),
    ({}, {"layers": "v"}),
    ({}, {"preserve": []}),
    ({}, {"preserve_empty": False}),
    ({}, {"templates": ["a painting of a {}"]}),
    ({}, {"edits": [{"replace": "cat", "with": "dog", "weight": 5.0}, {"erase": "tree"}]}),
]


@pytest.mark.parametrize("base,changed", UCE_CASES, ids=[next(iter(c)) for _, c in UCE_CASES])
def test_every_uce_setting_changes_the_delta(tiny, base, changed):
    _, model = tiny("sd1")
    assert _diff(_delta(model, "uce", **base), _delta(model, "uce", **changed)) > 1e-3


RECE_CASES = [
    ({}, {"lambda": 5.0}),
    ({}, {"erase_scale": 3.0}),
    ({}, {"preserve_scale": 20.0}),
    ({}, {"token": "aligned"}),
    ({}, {"layers": "v"}),
    ({}, {"epochs": 2}),
    ({}, {"reg_lambda": 1.0}),
    ({}, {"adv_ridge": 5.0}),
    ({}, {"adv_preserve_scale": 20.0}),
    ({}, {"update": "resolve"}),
    ({}, {"preserve": []}),
    ({}, {"preserve_empty": False}),
    ({}, {"templates": ["a painting of a {}"]}),
    ({}, {"edits": [{"replace": "cat", "with": "dog", "weight": 5.0}, {"erase": "tree"}]}),
]


@pytest.mark.parametrize("base,changed", RECE_CASES, ids=[next(iter(c)) for _, c in RECE_CASES])
def test_every_rece_setting_changes_the_delta(tiny, base, changed):
    _, model = tiny("sd1")
    assert _diff(_delta(model, "rece", **base), _delta(model, "rece", **changed)) > 1e-3


def test_rece_update_resolve_uses_lambda_and_preserve_scale_in_every_round(tiny):
    _, model = tiny("sd1")
    base = {"update": "resolve", "epochs": 2}
    ref = _delta(model, "rece", **base)
    for k, v in {"lambda": 5.0, "preserve_scale": 20.0, "reg_lambda": 1.0}.items():
        assert _diff(ref, _delta(model, "rece", **(base | {k: v}))) > 1e-3, k


# a retain set of more keys than the tiny model's 32 dimensions: its second moment has eigenvalues on
# both sides of the threshold, so the threshold and the augmentation noise move the projector (on a
# low-rank retain set the null space is exact, and DPA only adds its direction, whatever the noise)
SPEED_MANY = {"preserve": ("house bird car horse apple chair table window river mountain flower boat train plane cup "
                           "bottle book lamp door road bridge castle forest beach cloud moon star sun rock tower").split()}
SPEED_CASES = [
    ({}, {"retain_scale": 0.05}),
    (SPEED_MANY, SPEED_MANY | {"threshold": 0.01}),
    ({}, {"erase_scale": 3.0}),
    ({}, {"token": "aligned"}),
    ({}, {"layers": "kv"}),
    ({}, {"filter": False}),
    ({}, {"aug_num": 0}),
    (SPEED_MANY, SPEED_MANY | {"aug_num": 3}),
    (SPEED_MANY, SPEED_MANY | {"seed": 1}),
    ({}, {"invariant": False}),
    ({}, {"clusters": 1}),
    ({}, {"lamb": 1.0}),
    ({}, {"preserve": ["house"]}),
    ({}, {"preserve_empty": False}),
    ({}, {"templates": ["a painting of a {}"]}),
    ({}, {"edits": [{"replace": "cat", "with": "dog", "weight": 5.0}, {"erase": "tree"}]}),
]


@pytest.mark.parametrize("base,changed", SPEED_CASES, ids=[next(k for k in c if k not in b or c[k] != b[k])
                                                           for b, c in SPEED_CASES])
def test_every_speed_setting_changes_the_delta(tiny, base, changed):
    _, model = tiny("sd1")
    assert _diff(_delta(model, "speed", **base), _delta(model, "speed", **changed)) > 1e-3


EMCID_CASES = [
    {"alpha": 0.9},
    {"cov_weight": 10.0},
    {"cov_weight": None, "cov_ratio": 0.1},  # the default weight, set from the edit's size
    {"layers": "1"},
    {"corpus": CORPUS[:3]},
    {"cov_positions": "tokens"},
    {"c0_exclude_edited": False},  # the corpus names cat and tree
    {"erase_scale": 4.0},
    {"preserve_scale": 50.0},
    {"key_mode": "each"},
    {"target_anchor": "first"},
    {"preserve": []},
    {"preserve_empty": False},
    {"edits": [{"replace": "cat", "with": "dog", "weight": 5.0}, {"erase": "tree"}]},
    {"targets": "text", "steps": 3},
]


@pytest.mark.parametrize("changed", EMCID_CASES, ids=[next(iter(c)) for c in EMCID_CASES])
def test_every_emcid_setting_changes_the_delta(tiny, tmp_path, changed):
    _, model = tiny("sd1")
    base = _te_base(tmp_path) | {"cov_weight": 100.0}
    assert _diff(_delta(model, "emcid", **base), _delta(model, "emcid", **(base | changed))) > 1e-4


def test_emcid_stage_i_settings_change_the_targets(tiny, tmp_path):
    _, model = tiny("sd1")
    base = _te_base(tmp_path) | {"targets": "text", "steps": 2, "cov_weight": 100.0}
    ref = _delta(model, "emcid", **base)
    for k, v in {"steps": 4, "lr": 0.05, "clamp": 0.01, "weight_decay": 5.0}.items():
        assert _diff(ref, _delta(model, "emcid", **(base | {k: v}))) > 1e-4, k
    # batch_concepts only groups the work: each concept's gradient is its own (Adam is elementwise)
    assert _diff(ref, _delta(model, "emcid", **(base | {"batch_concepts": 1}))) < 1e-5


NULLSPACE_CASES = [
    ({}, {"lambda": 50.0}),
    ({}, {"threshold": 1e-4}),
    ({"threshold": 1e-3}, {"threshold": 1e-3, "relative": True}),
    ({}, {"projector": "preserve", "corpus": None, "cov_cache_dir": None}),
    ({}, {"preserve_scale": 1e4}),
    ({}, {"erase_scale": 5.0}),
    ({}, {"key_mode": "mean"}),
    ({}, {"layers": "1"}),
    ({}, {"target_anchor": "first", "key_mode": "mean"}),
    ({}, {"site": "cross_attention", "layers": None}),
    ({"site": "cross_attention", "layers": None}, {"site": "cross_attention", "layers": "v"}),
    ({"site": "cross_attention", "layers": None}, {"site": "cross_attention", "layers": None, "token": "aligned"}),
]


@pytest.mark.parametrize("base,changed", NULLSPACE_CASES, ids=[",".join(c) for _, c in NULLSPACE_CASES])
def test_every_nullspace_setting_changes_the_delta(tiny, tmp_path, base, changed):
    _, model = tiny("sd1")
    common = _te_base(tmp_path) | {"threshold": 0.5}
    a = _delta(model, "nullspace", **{k: v for k, v in (common | base).items() if v is not None})
    b = _delta(model, "nullspace", **{k: v for k, v in (common | changed).items() if v is not None})
    assert _diff(a, b) > 1e-4


def test_emcid_preserve_set_keeps_its_outputs(tiny, tmp_path):
    """EMCID gives preserve its UCE meaning: the preserve prompts' text states move less with it."""
    from concept_edit.core.apply import apply_delta

    _, model = tiny("sd1")
    prompts = [t.format(c) for c in PRESERVE for t in TEMPLATES]
    ids = [model.padded_ids(p) for p in prompts]
    before = torch.cat(model.encode_ids(ids)).double()

    def drift(plan):
        d = compute_delta(model, plan, progress=False)
        h = apply_delta(d, model.weights(list(d.layers)), check_fingerprint=False)
        try:
            after = torch.cat(model.encode_ids(ids)).double()
        finally:
            h.remove()
        return ((after - before).norm() / before.norm()).item()

    base = _te_base(tmp_path) | {"cov_weight": 1.0, "alpha": 0.9}
    without = drift(_plan("emcid", **base, preserve=[]))
    kept = drift(_plan("emcid", **base, preserve_scale=100.0))
    assert without > 1e-4 and kept < 0.5 * without


def test_nullspace_reports_measured_preserve_drift(tiny, tmp_path):
    _, model = tiny("sd1")
    loose = _delta(model, "nullspace", **_te_base(tmp_path), threshold=10.0, relative=True)  # everything editable
    tight = _delta(model, "nullspace", targets="dest_hidden", layers="0-1", projector="preserve", threshold=1e-6)
    assert loose.metadata["preserve_drift"] > 2 * tight.metadata["preserve_drift"]
    x = _delta(model, "nullspace", site="cross_attention", projector="preserve", threshold=1e-6)
    assert x.metadata["preserve_drift"] < 1e-3 < loose.metadata["preserve_drift"]


# -- refusals ----------------------------------------------------------------------------------
@pytest.mark.parametrize("d,msg", [
    ({"edits": EDITS, "lamda": 1.0}, "did you mean 'lambda'"),
    ({"edits": EDITS, "options": {"tokn": "last"}}, "did you mean 'token'"),
    ({"edits": EDITS, "preserv": ["x"]}, "did you mean 'preserve'"),
    ({"edits": [{"erase": "losax", "typ": "style"}]}, "did you mean 'type'"),
    ({"edits": [{"erase": "x", "with": "y"}]}, "unknown key 'with'"),
    ({"edits": [{"erase": "x"}, {"replace": "X", "with": "y"}]}, "edited twice"),
    ({"edits": [{"replace": "x", "with": "X"}]}, "with itself"),
    ({"edits": EDITS, "preserve": "besev"}, "preserve must be a list"),
    ({"edits": [{"debias": "doctor", "attributes": "crowned"}]}, "attributes must be a list"),
    ({"edits": EDITS, "preserve_empty": "false"}, "preserve_empty must be true or false"),
    ({"edits": EDITS, "lambda": "0.5"}, "must be float"),
    ({"edits": EDITS, "lambda": -1}, ">= 0"),
    ({"edits": EDITS, "lambda": 0, "erase_scale": 0, "preserve_scale": 0}, "nothing would change"),
    ({"edits": [{"erase": "x", "weight": 0}]}, "weight must be > 0"),
    ({"edits": EDITS, "lambda": float("inf")}, "must be finite"),
    ({"edits": EDITS, "lambda": 1, "options": {"lambda": 2}}, "both at the top level and under options"),
    ({"edits": [{"erase": "x", "type": "style", "guide": "art"}]}, "type or guide, not both"),
    ({"method": "emcid", "edits": EDITS, "lambda": 0.5}, "has no setting 'lambda'"),
    ({"method": "emcid", "edits": EDITS, "token": "aligned"}, "must be one of last"),
    ({"method": "emcid", "edits": EDITS, "options": {"targets": "dest_hidden", "steps": 5}}, "no effect with targets: dest_hidden"),
    ({"method": "emcid", "edits": EDITS, "options": {"targets": "text", "guidance": 5.0}}, "no effect with targets: text"),
    ({"method": "emcid", "edits": EDITS, "alpha": 0}, "in (0, 1]"),
    ({"method": "emcid", "edits": EDITS, "cov_weight": 1000, "cov_ratio": 30}, "cov_ratio has no effect with a fixed cov_weight"),
    ({"method": "emcid", "edits": EDITS, "cov_weight": 0}, "cov_weight 0 drops C0"),
    ({"method": "emcid+uce", "edits": EDITS, "cov_ratio": 0}, "cov_ratio 0 drops C0"),
    ({"method": "nullspace", "edits": EDITS, "options": {"site": "cross_attention", "key_mode": "each"}}, "no effect"),
    ({"method": "nullspace", "edits": EDITS, "options": {"projector": "preserve", "corpus": ["a"]}}, "no effect"),
    ({"method": "nullspace", "edits": EDITS, "options": {"projector": "corpus", "preserve_scale": 2.0}}, "no effect"),
    ({"method": "nullspace", "edits": EDITS, "options": {"site": "cross_attention", "layers": [0]}}, "'kv' or 'v'"),
    ({"method": "rece", "edits": EDITS, "epochs": 0}, ">= 1"),
    ({"method": "rece", "edits": EDITS, "update": "resolve", "adv_preserve_scale": 1.0}, "no effect with update: resolve"),
    ({"method": "rece", "edits": EDITS, "readers": "context"}, "UNet cross-attention"),
    ({"method": "rece", "edits": EDITS, "token": "all"}, "must be one of last, aligned"),
    ({"method": "speed", "edits": EDITS, "aug_num": 0, "seed": 1}, "no effect with aug_num: 0"),
    ({"method": "speed", "edits": EDITS, "invariant": False, "lamb": 0.1}, "no effect with invariant: false"),
    ({"method": "speed", "edits": EDITS, "invariant": False, "clusters": 1}, "no effect with invariant: false"),
    ({"method": "speed", "edits": EDITS, "retain_scale": 0}, "must be > 0"),
    ({"method": "speed", "edits": EDITS, "aug_num": -1}, ">= 0"),
    ({"method": "speed", "edits": EDITS, "lambda": 0.5}, "ridge towards the original weights is retain_scale"),
    ({"method": "speed", "edits": EDITS, "preserve_scale": 2.0}, "null-space projector"),
    ({"method": "speed", "edits": EDITS, "readers": "context"}, "UNet cross-attention"),
    ({"method": "speed", "edits": EDITS, "token": "all"}, "must be one of last, aligned"),
    ({"method": "speed", "edits": EDITS, "layers": "k"}, "must be one of kv, v"),
    ({"method": "uce2", "edits": EDITS}, "unknown method"),
])
def test_bad_plans_are_refused_with_a_message(d, msg):
    with pytest.raises(SettingsError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        plan_from_dict(d)


def test_plan_errors_are_plan_errors_and_files_are_checked(tmp_path):
    p = tmp_path / "p.yaml"
    p.write_text("edits: [{erase: x}]\npreserve: !!python/object/apply:os.system ['touch pwned']\n")
    with pytest.raises(PlanError, match="not valid YAML"):
        load_plan(p)
    assert not (tmp_path / "pwned").exists()
    p.write_text("edits: [{erase: x\n")
    with pytest.raises(PlanError, match="not valid YAML"):
        load_plan(p)
    j = tmp_path / "p.json"
    j.write_text(json.dumps({"edits": EDITS, "preserve_empty": "false"}))
    with pytest.raises(PlanError, match="preserve_empty"):
        load_plan(j)
    with pytest.raises(PlanError, match="is a folder"):
        load_plan(tmp_path)


def test_nullspace_corpus_projector_refuses_a_preserve_set(tiny):
    _, model = tiny("sd1")
    with pytest.raises(ValueError, match="does not use the preserve set"):
        _delta(model, "nullspace", projector="corpus", targets="dest_hidden", corpus=CORPUS)


def test_preserving_an_edited_concept_warns_and_is_recorded(tiny):
    _, model = tiny("sd1")
    with pytest.warns(UserWarning, match="cat is edited"):
        plan = _plan("uce", preserve=["cat", "house"])
    d = compute_delta(model, plan, progress=False)
    assert d.metadata["preserve"] == ["house"] and d.metadata["preserve_dropped"] == ["cat"]


# -- metadata and hosts ------------------------------------------------------------------------
def test_metadata_records_the_settings_in_effect_only(tiny, tmp_path):
    _, model = tiny("sd1")
    d = _delta(model, "emcid", **_te_base(tmp_path))
    hp = d.metadata["hyperparameters"]
    assert hp["targets"] == "dest_hidden" and hp["alpha"] == 0.5 and hp["layers"] == "0-1"
    assert not {"steps", "lr", "guidance", "seed", "lambda"} & set(hp)  # dest_hidden runs no optimisation
    u = _delta(model, "uce", **{"lambda": 2.0})
    assert u.metadata["hyperparameters"]["lambda"] == 2.0 and "alpha" not in u.metadata["hyperparameters"]


def test_every_method_has_help_for_every_setting():
    for method, cls in SETTINGS.items():
        for key, text in cls.help().items():
            assert text, (method, key)


def test_cli_flags_override_a_plan_and_edit_flags_are_refused(tiny_sd1_dir, tmp_path, capsys):
    from concept_edit.cli.main import main
    from concept_edit.files.formats import read_metadata

    plan = tmp_path / "plan.yaml"
    plan.write_text("lambda: 0.5\ntoken: last\ntemplates: ['{}']\npreserve: [horse]\nedits:\n  - replace: cat\n    with: dog\n")
    out = tmp_path / "d.safetensors"
    assert main(["edit", "--model", str(tiny_sd1_dir), "--plan", str(plan), "--lambda", "3", "--token", "aligned",
                 "--template", "a photo of a {}", "--preserve", "bird", "--set", "erase_scale=2", "-o", str(out)]) == 0
    meta = read_metadata(out)
    hp = meta["hyperparameters"]
    assert hp["lambda"] == 3.0 and hp["token"] == "aligned" and hp["erase_scale"] == 2.0
    assert hp["templates"] == ["a photo of a {}"] and meta["preserve"] == ["bird"]
    rc = main(["edit", "--model", str(tiny_sd1_dir), "--plan", str(plan), "--erase", "x", "-o", str(tmp_path / "e.safetensors")])
    assert rc == 2 and "cannot be combined with --plan" in capsys.readouterr().err
    rc = main(["edit", "--model", str(tiny_sd1_dir), "--erase", "x", "--set", "alpah=1", "-o", str(tmp_path / "f.safetensors")])
    assert rc == 2 and "has no setting 'alpah'" in capsys.readouterr().err
    assert not (tmp_path / "e.safetensors").exists() and not (tmp_path / "f.safetensors").exists()


def test_each_node_shows_only_the_settings_its_method_uses():
    from concept_edit.nodes.edit_nodes import (
        METHODS,
        edit_inputs,
        edit_node_ids,
        node_settings,
        setting_widgets,
    )

    assert set(setting_widgets("uce")) == {"lambda_", "erase_scale", "preserve_scale", "token", "layers"}
    emcid = set(setting_widgets("emcid"))
    assert {"alpha", "cov_weight", "layers", "preserve_scale", "c0_exclude_edited"} <= emcid
    assert not {"lambda_", "token", "erase_scale", "threshold"} & emcid
    ns = set(setting_widgets("nullspace"))  # cross-attention, projector "preserve" (no corpus)
    assert {"lambda_", "threshold", "relative", "layers", "token"} <= ns and "c0_exclude_edited" not in ns
    assert "token" not in setting_widgets("nullspace_te")  # the text encoder edits at the last token only
    for key in METHODS:  # widget values build the same settings an edit file would
        _, engine, _, fixed, _ = METHODS[key]
        widgets = {w: spec[1].get("default") for w, spec in setting_widgets(key).items()}
        built = build_settings(engine, node_settings(key, widgets))
        assert dataclasses.asdict(built) == dataclasses.asdict(build_settings(engine, fixed)), key
    for method, kind, _, _ in edit_node_ids().values():
        optional = [name for name, _, opt in edit_inputs(method, kind) if opt]
        assert ("base" in optional) == (METHODS[method][4] == "unet")


def test_unknown_words_are_warned_about(tiny):
    _, model = tiny("sd1")
    plan = plan_from_dict({"edits": [{"erase": "qxzvjk"}]})
    with pytest.warns(UserWarning, match="qxzvjk"):
        d = compute_delta(model, plan, progress=False)
    assert d.metadata["unknown_words"] == ["qxzvjk"]


def test_settings_doc_is_in_sync():
    from pathlib import Path

    from concept_edit.core.settings import markdown

    doc = Path(__file__).resolve().parents[1] / "docs" / "settings.md"
    assert doc.read_text() == markdown(), "regenerate: python -m concept_edit.core.settings > docs/settings.md"


def test_cli_quoting_keeps_names_whole():
    from concept_edit.cli.main import build_parser, plan_dict_from_args

    args = build_parser().parse_args(["edit", "--debias", '"16:9 photo":"Smith, John",b:0.1,0.2', "--replace", "C# coder=x",
                                      "-o", "x.safetensors"])
    d = plan_dict_from_args(args)
    assert d["edits"][0] == {"replace": "C# coder", "with": "x"}
    assert d["edits"][1] == {"debias": "16:9 photo", "attributes": ["Smith, John", "b"], "alphas": [0.1, 0.2]}


def test_emcid_distill_settings_change_the_targets(tiny, tmp_path):
    """The image-generating stage I settings (distill): each changes the delta."""
    _, model = tiny("sd1")
    base = _te_base(tmp_path) | {"targets": "distill", "steps": 2, "gen_steps": 2, "images_per_concept": 1,
                                 "cov_weight": 100.0, "edits": [{"replace": "cat", "with": "dog"}]}
    ref = _delta(model, "emcid", **dict(base))
    for k, v in {"seed": 1, "images_per_concept": 2, "gen_steps": 3, "guidance": 2.0, "text_weight": 5.0}.items():
        assert _diff(ref, _delta(model, "emcid", **(dict(base) | {k: v}))) > 1e-4, k


@pytest.mark.parametrize("changed", [{"cov_positions": "tokens"}, {"corpus": CORPUS[:3]}, {"c0_exclude_edited": False}],
                         ids=["cov_positions", "corpus", "c0_exclude_edited"])
def test_nullspace_corpus_settings_change_the_delta(tiny, tmp_path, changed):
    _, model = tiny("sd1")
    base = _te_base(tmp_path) | {"threshold": 0.05}
    assert _diff(_delta(model, "nullspace", **base), _delta(model, "nullspace", **(base | changed))) > 1e-4


def test_emcid_uce_settings_change_the_delta(tiny, tmp_path):
    _, model = tiny("sd1")
    base = _te_base(tmp_path) | {"cov_weight": 100.0}
    ref = _delta(model, "emcid+uce", **base)
    for k, v in {"lambda": 5.0, "uce_layers": "v", "alpha": 0.9}.items():
        assert _diff(ref, _delta(model, "emcid+uce", **(base | {k: v}))) > 1e-4, k


def test_nullspace_unet_guided_refinement_changes_the_targets(tiny, tmp_path):
    _, model = tiny("sd1")
    base = {"site": "cross_attention", "corpus": CORPUS, "cov_cache_dir": str(tmp_path / "c0"), "threshold": 0.05,
            "edits": [{"replace": "cat", "with": "dog"}]}
    plain = _delta(model, "nullspace", **dict(base))
    refined = _delta(model, "nullspace", **(dict(base) | {"targets": "refine", "steps": 3, "gen_steps": 2,
                                                         "images_per_concept": 1}))
    assert refined.metadata["stage_i"]["steps_run"] == 3 and _diff(plain, refined) > 1e-4
