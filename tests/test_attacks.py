"""The attack benchmark (bench/quality/attacks.py, attack_run.py) on the bundled testbed model.

The soft-prompt attack must be real: it brings back an object that plain UCE erased (the plain
prompt no longer draws it). RECE on the same object is measured and printed, not asserted.
"""
import importlib.util
import json
import sys
from pathlib import Path

import pytest
from concept_edit.testbed import CLASSIFIER_PATH, model_dir

BENCH = Path(__file__).resolve().parents[1] / "bench" / "quality"

needs_assets = pytest.mark.skipif(not (model_dir() / "model_index.json").exists() or not CLASSIFIER_PATH.exists(),
                                  reason="testbed weights not present")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: generation on one thread


@pytest.fixture(scope="module")
def attack_run():
    spec = importlib.util.spec_from_file_location("attack_run", BENCH / "attack_run.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["attack_run"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_slot_ids_and_paraphrases(attack_run):
    from concept_edit.testbed import load_testbed_pipeline

    A = attack_run.A
    tok = load_testbed_pipeline().tokenizer
    ids, start = A.slot_ids(tok, "a photo of a", "", 3)
    assert ids.shape == (tok.model_max_length,) and start == 5
    assert ids[0] == tok.bos_token_id and ids[start + 3] == tok.eos_token_id
    pr = A.paraphrase_prompts("zaset", ["picture of {o}", "the {o} photo"], ["kosezed"], ["a {}"])
    assert pr == [("picture of zaset", "para"), ("the zaset photo", "para"), ("a kosezed", "alias")]


@needs_assets
def test_soft_prompt_recovers_object_erased_by_uce(attack_run):
    """Plain UCE (UCE's original subject-through-padding keys) erases an object; the soft-prompt
    attack (2 tokens, 60 Adam steps on the edited model's denoising loss) draws it again."""
    from concept_edit.adapters.diffusers_model import DiffusersModel
    from concept_edit.core.apply import apply_delta
    from concept_edit.core.plan import plan_from_dict
    from concept_edit.engines.registry import compute_delta
    from concept_edit.testbed import get_world, load_classifier, load_testbed_pipeline
    from concept_edit.testbed.evaluate import concept_hit, generate, head_probs
    from concept_edit.testbed.render import render_labels

    A = attack_run.A
    pipe, clf, w = load_testbed_pipeline(), load_classifier(), get_world()
    model = DiffusersModel(pipe)
    c = w.objects[5]
    target = A.Target(c.name, "a photo of a", render=lambda r: render_labels(w, c.visual, 0, 0, r))
    seeds = list(range(500, 506))

    def rate(images):
        return float(concept_hit(head_probs(clf, images), c).mean())

    before = rate(generate(pipe, [target.prompt] * len(seeds), seeds))
    assert before >= 0.75, "the unedited model should draw the object"
    out = {}
    for method in ("uce", "rece"):
        plan = plan_from_dict({"method": method, "token": "aligned", "edits": [{"erase": c.name}],
                               "preserve": [o.name for o in w.objects[200:300]],
                               "templates": ["{}", "a photo of a {}", "a painting of a {}"]})
        delta = compute_delta(model, plan, progress=False)
        h = apply_delta(delta, model.weights(list(delta.layers)), check_fingerprint=False)
        try:
            plain = rate(generate(pipe, [target.prompt] * len(seeds), seeds))
            soft = A.soft_prompt_attack(pipe, [target], n_tokens=2, steps=60, seed=0)
            asr = rate(A.generate_embeds(pipe, soft.prompt_embeds.repeat(len(seeds), 1, 1), seeds))
        finally:
            h.remove()
        out[method] = {"plain": plain, "soft_asr": asr, "seconds": round(soft.seconds, 1)}
    print(f"\nobject {c.name}: unedited {before:.2f}; " + "; ".join(
        f"{m}: plain prompt {r['plain']:.2f}, soft-prompt ASR {r['soft_asr']:.2f} ({r['seconds']} s)" for m, r in out.items()))
    assert out["uce"]["plain"] <= 0.25, "UCE should erase the object from the plain prompt"
    assert out["uce"]["soft_asr"] >= 0.75, "the soft-prompt attack should draw the erased object again"


@needs_assets
def test_quick_run_writes_table(attack_run, tmp_path):
    res = attack_run.main(["--quick", "--out", str(tmp_path)])
    rows = res["methods"]["uce:token=aligned"]
    assert [r["n"] for r in rows] == [1, 10]
    for r in rows:
        assert "error" not in r, r
        assert all(0 <= r[k] <= 1 for k in ("forget", "para", "soft", "search")), r
        assert -1 <= r["HD"] <= 1
    styles = res["styles"]["uce:token=aligned"]  # one artist erased and attacked
    assert [r["n"] for r in styles] == [1] and "error" not in styles[0], styles
    assert all(0 <= styles[0][k] <= 1 for k in ("forget", "para", "soft", "search")) and -1 <= styles[0]["HS"] <= 1
    assert "alias" not in styles[0]  # artists have none
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["counts"] == [1, 10] and saved["style_counts"] == [1]
    readme = (tmp_path / "README.md").read_text()
    assert "| uce:token=aligned | 1 |" in readme and "| uce:token=aligned | 10 |" in readme
    assert "**Conditions:**" in readme and (tmp_path / "attacks.png").stat().st_size > 0
    assert "## Styles" in readme and "| uce:token=aligned | 1 | 1 |" in readme.split("## Styles")[1]
    assert (tmp_path / "attacks_styles.png").stat().st_size > 0
