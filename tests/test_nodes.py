"""The ComfyUI node pack's host-neutral parts, without ComfyUI: import, the edit nodes' inputs against
the committed node interface, widget parsing, plans, summaries, the delta -> LoRA patch conversion,
and the example workflows' consistency. The V3 node classes themselves are tested inside a real
ComfyUI (tests/test_comfyui_*.py)."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from concept_edit.core.delta import ConceptDelta, LayerDelta
from concept_edit.core.plan import PlanError
from concept_edit.engines.registry import compute_delta
from concept_edit.files.formats import kohya_state_dict
from concept_edit.nodes.common import (
    debias_edits,
    edit_summary,
    erase_edits,
    make_plan,
    moderate_edits,
    parse_floats,
    parse_list,
    parse_pairs,
    replace_edits,
    residual_errors,
)
from concept_edit.nodes.delta_io_nodes import check_inside
from concept_edit.nodes.edit_nodes import edit_inputs, edit_node_ids
from concept_edit.nodes.patches import split_components

REPO = Path(__file__).resolve().parents[1]


INTERFACE = json.loads((REPO / "tests" / "data" / "node_interface_0.1.json").read_text())
SOCKETS = {"MODEL", "CLIP", "IMAGE", "CONCEPT_DELTA", "CONCEPT_ATTENTION"}


def test_pack_imports_under_its_folder_name_without_comfyui():
    """ComfyUI imports the repository folder under its directory name: relative imports only, no
    ComfyUI needed to import the pack or its node logic, the V3 entrypoint and web directory are
    exported, and there is no NODE_CLASS_MAPPINGS (ComfyUI would then ignore the entrypoint)."""
    code = (
        "import importlib, importlib.util, inspect, sys\n"
        f"spec = importlib.util.spec_from_file_location('ConceptEdit', {str(REPO / '__init__.py')!r}, "
        f"submodule_search_locations=[{str(REPO)!r}])\n"
        "m = importlib.util.module_from_spec(spec); sys.modules['ConceptEdit'] = m; spec.loader.exec_module(m)\n"
        "for mod in ('edit_nodes', 'delta_io_nodes', 'attention_nodes', 'patches', 'common', 'routes'):\n"
        "    importlib.import_module('ConceptEdit.nodes.' + mod)\n"
        "assert not {'comfy', 'comfy_api', 'folder_paths', 'server'} & set(sys.modules), 'imported ComfyUI'\n"
        "assert 'concept_edit' not in sys.modules, 'absolute self-import'\n"
        "assert not hasattr(m, 'NODE_CLASS_MAPPINGS')\n"
        "print(inspect.iscoroutinefunction(m.comfy_entrypoint), m.WEB_DIRECTORY)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "./web"]
    assert (REPO / "web" / "concept_edit.js").exists()


def _interface_of_edit_node(method: str, kind: str) -> list:
    rows = []
    for name, spec, optional in edit_inputs(method, kind):
        sec = "optional" if optional else "required"
        if spec is None:
            rows.append([sec, name, name.upper()])
        elif isinstance(spec[0], list):
            rows.append([sec, name, "COMBO", spec[0]])
        else:
            rows.append([sec, name, spec[0]])
    return rows


# edit nodes added after release 0.1 (not in its interface snapshot)
NEW_EDIT_NODES = {f"ConceptEdit{m}{k}" for m, kinds in (("RECE", ("Erase", "Replace")),
                                                          ("SPEED", ("Erase", "Replace", "Moderate", "Debias")))
                  for k in kinds}


def test_edit_nodes_keep_the_interface_saved_workflows_use():
    """Every edit node of release 0.1 still exists with the same inputs in the same order (saved UI
    workflows store widget values by position); the real-host test checks the whole /object_info.
    Nodes added since are the only ones not in the snapshot."""
    ids = edit_node_ids()
    assert set(ids) - set(INTERFACE) == NEW_EDIT_NODES
    for node_id, (method, kind, display, _) in ids.items():
        if node_id in INTERFACE:
            assert _interface_of_edit_node(method, kind) == INTERFACE[node_id]["inputs"], node_id
        assert display.endswith("(ConceptEdit)")
    assert {"ConceptEditSaveDelta", "ConceptEditLoadDelta", "ConceptEditAttentionCapture",
            "ConceptEditAttentionHeatmaps"} == set(INTERFACE) - set(ids)


def test_parsing_widgets():
    assert parse_list("Van Gogh, Monet\n# comment\n\nPicasso  # trailing") == ["Van Gogh", "Monet", "Picasso"]
    assert parse_list("C# programmer, \"Smith, John\"\nF#") == ["C# programmer", "Smith, John", "F#"]
    assert parse_pairs("cat -> dog\nred car = blue car, 16:9 -> square") == [("cat", "dog"), ("red car", "blue car"), ("16:9", "square")]
    with pytest.raises(PlanError):
        parse_pairs("cat")
    assert parse_floats("0.5, 0.5") == [0.5, 0.5] and parse_floats("") == []
    with pytest.raises(PlanError):
        parse_floats("a, b")
    e = erase_edits("Van Gogh\nMonet", "style", "")
    assert [(x.kind, x.source, x.target) for x in e] == [("erase", "Van Gogh", "art"), ("erase", "Monet", "art")]
    assert erase_edits("cat", "object", "")[0].target == ""
    assert erase_edits("cat", "object", "animal")[0].target == "animal"
    assert replace_edits("cat -> dog")[0].target == "dog"
    assert moderate_edits("gore", 0.5)[0].strength == 0.5
    d = debias_edits("doctor", "male, female", "0.3, 0.7", "")
    assert d[0].attributes == ["male", "female"] and d[0].ratios == [0.3, 0.7] and d[0].alphas == [0.3, 0.7]
    assert debias_edits("doctor", "male, female", "", "0.1, 0.2")[0].alphas == [0.1, 0.2]
    with pytest.raises(PlanError):
        erase_edits(" , ", "style", "")
    with pytest.warns(UserWarning, match="Monet is edited"):
        plan = make_plan(e, "uce", ["Monet"], ["{}", "a painting by {}"], {})
    assert plan.preserve == [] and plan.dropped_preserve == ["Monet"]  # Monet is also erased
    assert make_plan(erase_edits("Van Gogh", "style", ""), "uce", ["Monet"], ["{}"], {}).preserve == ["Monet"]


def test_residual_and_summary_on_a_real_edit(tiny):
    _, model = tiny("sd1")
    plan = make_plan(erase_edits("Van Gogh", "style", "") + replace_edits("cat -> dog"), "uce", ["Monet"], ["{}"], {"lambda": 0.5})
    delta = compute_delta(model, plan, progress=False)
    errs = residual_errors(model, plan, delta)
    assert set(errs) == set(delta.layers)
    assert max(errs.values()) < 0.5  # lambda 0.5 pulls towards W0; targets are mostly reached
    loose = make_plan(plan.edits, "uce", [], ["{}"], {"lambda": 50.0})
    assert min(residual_errors(model, loose, compute_delta(model, loose, progress=False)).values()) > max(errs.values())
    s = edit_summary(delta, plan, errs, {"strength": 1.0})
    assert s["concepts"] == ["erase Van Gogh -> art", "replace cat -> dog"]
    assert s["layers"] == len(delta.layers) and s["components"] == {"unet": len(delta.layers)}
    assert s["max_rank"] == delta.max_rank and 0 <= s["residual_error"]["mean"] <= s["residual_error"]["max"]
    json.dumps(s)  # goes to the browser


def test_lora_state_dict_matches_saved_file(tmp_path):
    from concept_edit.files.formats import save_lora
    from safetensors.torch import load_file

    g = torch.Generator().manual_seed(0)
    layers = {
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k": LayerDelta(torch.randn(8, 2, generator=g), torch.randn(2, 4, generator=g)),
        "text_encoder.text_model.encoder.layers.3.mlp.fc2": LayerDelta(torch.randn(4, 1, generator=g), torch.randn(1, 16, generator=g)),
    }
    delta = ConceptDelta(layers, {"family": "sd1", "method": "uce"})
    sd, names, errors = kohya_state_dict(delta)
    assert names["lora_te_text_model_encoder_layers_3_mlp_fc2"] == "text_encoder.text_model.encoder.layers.3.mlp.fc2" and not errors
    save_lora(delta, tmp_path / "d.safetensors")
    saved = load_file(str(tmp_path / "d.safetensors"))
    assert set(sd) == set(saved)
    for k in sd:
        assert torch.equal(sd[k], saved[k])
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight" in sd
    assert "lora_te_text_model_encoder_layers_3_mlp_fc2.alpha" in sd
    unet, te = split_components(delta)
    assert list(unet.layers) == [next(iter(layers))] and len(te.layers) == 1
    sdxl, _, _ = kohya_state_dict(ConceptDelta(layers, {"family": "sdxl"}))
    assert any(k.startswith("lora_te1_") for k in sdxl)


def test_save_prefix_must_stay_inside(tmp_path):
    assert check_inside(tmp_path, "concept_edit/erase") == "concept_edit/erase"
    assert check_inside(tmp_path, "  ") == "concept_edit"
    for bad in ("../../etc/x", "/etc/x", ".", "a/../../x"):
        with pytest.raises(ValueError, match="leaves the loras folder"):
            check_inside(tmp_path, bad)


# --------------------------------------------------------------------------- example workflows
def _load_build():
    spec = importlib.util.spec_from_file_location("ce_build_workflows", REPO / "example_workflows" / "build.py")
    m = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(m)
    return m


def _widget_names(node_type: str) -> list[str]:
    return [row[1] for row in INTERFACE[node_type]["inputs"] if row[2] not in SOCKETS]


@pytest.mark.parametrize("name", sorted(_load_build().WORKFLOWS))
def test_example_workflows_are_consistent(name):
    build = _load_build()
    wf = json.loads((REPO / "example_workflows" / name).read_text())
    assert wf == json.loads(json.dumps(build.WORKFLOWS[name]())), "regenerate with example_workflows/build.py"
    ids = {n["id"] for n in wf["nodes"]}
    for lid, src, sslot, dst, dslot, typ in wf["links"]:
        assert src in ids and dst in ids
        s = next(n for n in wf["nodes"] if n["id"] == src)
        d = next(n for n in wf["nodes"] if n["id"] == dst)
        assert s["outputs"][sslot]["type"] == typ == d["inputs"][dslot]["type"]
        assert lid in s["outputs"][sslot]["links"] and d["inputs"][dslot]["link"] == lid
    for n in wf["nodes"]:
        if n["type"] in INTERFACE:
            assert len(n["widgets_values"]) == len(_widget_names(n["type"])), n["type"]
            req = {r[1] for r in INTERFACE[n["type"]]["inputs"] if r[0] == "required" and r[2] in SOCKETS}
            linked = {i["name"] for i in n["inputs"] if i["link"] is not None}
            assert req <= linked, (n["type"], req - linked)
        else:
            assert n["type"] in build.BUILTIN


def test_every_example_workflow_has_a_thumbnail():
    """ComfyUI's template browser shows <name>.jpg beside <name>.json (tests/browser/make_thumbnails.py)."""
    from PIL import Image

    for wf in (REPO / "example_workflows").glob("*.json"):
        with Image.open(wf.with_suffix(".jpg")) as im:
            assert im.format == "JPEG" and im.size[0] >= 400, wf.name


class _ProtocolOnly:
    """Only the EditableModel protocol (what ComfyEditableModel offers): no ``.pipe``."""

    def __init__(self, m):
        self._m = m
        for a in ("family", "key_dim", "max_tokens", "tokenizer"):
            setattr(self, a, getattr(m, a))

    def __getattr__(self, name):
        if name in ("token_ids", "encode_ids", "padded_ids", "cross_attention_weights", "weights"):
            return getattr(self._m, name)
        raise AttributeError(name)


@pytest.mark.parametrize("method", ["uce", "nullspace", "emcid", "nullspace_te", "rece", "speed"])
def test_node_methods_run_on_what_the_comfyui_adapter_offers(tiny, method):
    """Every method offered as a node runs on what ComfyUI gives it: the EditableModel protocol
    alone (UNet methods), or a text-encoder-only pipeline (text-encoder methods)."""
    from types import SimpleNamespace

    from concept_edit.adapters.comfy_model import _StubUNet
    from concept_edit.adapters.diffusers_model import DiffusersModel
    from concept_edit.nodes.edit_nodes import METHODS

    pipe, model = tiny("sd1")
    _, engine, kinds, options, site = METHODS[method]
    if site == "unet":
        em = _ProtocolOnly(model)
    else:
        em = DiffusersModel(SimpleNamespace(text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=_StubUNet(32)))
    edits = erase_edits("Van Gogh", "style", "")
    if "replace" in kinds:
        edits += replace_edits("cat -> dog")
    plan = make_plan(edits, engine, ["Monet"], ["{}"], dict(options))
    delta = compute_delta(em, plan, progress=False)
    want = "unet." if site == "unet" else "text_encoder.text_model.encoder.layers."
    assert delta.layers and all(n.startswith(want) for n in delta.layers)
    json.dumps(edit_summary(delta, plan))


# a value other than the default for every setting widget of the RECE and SPEED nodes
CHANGED = {
    "rece": {"lambda_": 2.0, "erase_scale": 2.0, "preserve_scale": 3.0, "token": "aligned", "layers": "v", "epochs": 2,
             "reg_lambda": 0.5, "adv_ridge": 1.0, "adv_preserve_scale": 2.0, "update": "resolve"},
    "speed": {"retain_scale": 0.05, "threshold": 1.0, "erase_scale": 3.0, "token": "aligned", "layers": "kv",
              "filter": False, "aug_num": 2, "seed": 5, "invariant": False, "clusters": 1, "lamb": 0.5},
}


def _node_delta(model, method: str, widgets: dict, kind: str = "erase"):
    """The delta an edit node computes from these widget values (its plan, as ``edit_node`` builds it),
    on what the ComfyUI adapter offers."""
    from concept_edit.nodes.edit_nodes import METHODS, node_settings

    _, engine, _, _, _ = METHODS[method]
    edits = erase_edits("Van Gogh", "style", "") if kind == "erase" else moderate_edits("Van Gogh", 0.8)
    plan = make_plan(edits, engine, ["Monet", "a cat"], ["{}", "a painting by {}"], node_settings(method, widgets))
    return compute_delta(_ProtocolOnly(model), plan, progress=False)


def _dense_diff(a: ConceptDelta, b: ConceptDelta) -> float:
    names = set(a.layers) | set(b.layers)
    zero = {n: (a.layers.get(n) or b.layers[n]).dense() * 0 for n in names}
    return max(((a.layers[n].dense() if n in a.layers else zero[n])
                - (b.layers[n].dense() if n in b.layers else zero[n])).abs().max().item() for n in names)


@pytest.mark.parametrize("method", ["rece", "speed"])
def test_every_setting_widget_of_the_rece_and_speed_nodes_changes_the_delta(tiny, method):
    """Each setting widget the node shows changes the delta (or, under another setting that makes it
    ineffective, is refused with the reason): no widget is accepted and ignored."""
    from concept_edit.core.settings import SettingsError
    from concept_edit.nodes.edit_nodes import setting_widgets

    _, model = tiny("sd1")
    widgets = setting_widgets(method)
    assert set(widgets) == set(CHANGED[method])  # the settings the method uses, and only those
    defaults = {w: spec[1]["default"] for w, spec in widgets.items()}
    ref = _node_delta(model, method, defaults)
    assert ref.metadata["method"] == method and ref.layers
    # switching these off makes others ineffective; those are checked with them on
    dependents = {"rece": {"update": ("adv_ridge", "adv_preserve_scale")},
                  "speed": {"invariant": ("clusters", "lamb")}}[method]
    # on the tiny model the augmentation noise moves no eigenvalue across the default threshold
    context = {"seed": {"threshold": 1.0}}
    for w, v in CHANGED[method].items():
        base = {**defaults, **context.get(w, {})}
        delta = _node_delta(model, method, {**base, w: v})
        assert _dense_diff(ref if base == defaults else _node_delta(model, method, base), delta) > 1e-6, w
        for dep in dependents.get(w, ()):  # the dependent widget changed too: refused, naming it
            with pytest.raises(SettingsError, match=f"{dep} has no effect"):
                _node_delta(model, method, {**defaults, w: v, dep: CHANGED[method][dep]})
    if method == "speed":  # aug_num 0 (no noise) leaves seed at its default: accepted
        assert _dense_diff(ref, _node_delta(model, method, {**defaults, "aug_num": 0})) > 1e-6
        with pytest.raises(SettingsError, match="seed has no effect"):
            _node_delta(model, method, {**defaults, "aug_num": 0, "seed": 5})


def test_rece_has_no_moderate_or_debias_node_and_speed_moderates(tiny):
    """RECE attacks erased / replaced concepts: a plan of only moderate edits is refused (so there is
    no such node); SPEED moderates (targets as UCE)."""
    from concept_edit.nodes.edit_nodes import edit_node_ids

    kinds = {(m, k) for m, k, _, _ in edit_node_ids().values()}
    assert {("rece", "erase"), ("rece", "replace")} <= kinds and not {("rece", "moderate"), ("rece", "debias")} & kinds
    _, model = tiny("sd1")
    with pytest.raises(PlanError, match="rece attacks"):
        _node_delta(model, "rece", {}, kind="moderate")
    assert _node_delta(model, "speed", {}, kind="moderate").layers


def test_emcid_node_c0_weight_widget_zero_means_set_from_the_edit():
    """A FLOAT widget cannot be empty: the EMCID nodes' C0 weight shows 0 for "set from the edit's
    size" (the engine default), and any other value is a fixed weight, as a saved 0.1 workflow's
    10,000 still is."""
    from concept_edit.core.settings import build_settings
    from concept_edit.nodes.edit_nodes import node_settings, setting_widgets

    kind, spec = setting_widgets("emcid")["cov_weight"]
    assert kind == "FLOAT" and spec["default"] == 0.0 and spec["min"] == 0.0
    auto = build_settings("emcid", node_settings("emcid", {"cov_weight": 0.0, "alpha": 0.5}))
    assert auto.cov_weight is None and "cov_ratio" in auto.effective()
    fixed = build_settings("emcid", node_settings("emcid", {"cov_weight": 10000.0}))
    assert fixed.cov_weight == 10000.0 and "cov_ratio" not in fixed.effective()
