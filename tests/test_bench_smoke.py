"""Smoke test of bench/uce_speed.py's --quick path: it runs, and the published-loop reference
agrees numerically with ConceptEdit's factored UCE (no timing assertions)."""
import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "uce_speed.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("uce_speed_bench", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_concept_names_distinct_and_short(bench):
    edits, keep = bench.concept_names(50)
    names = [n.lower() for n in edits + keep]
    assert len(edits) == len(keep) == 50 and len(set(names)) == 100
    assert all(1 <= len(n.split()) <= 3 for n in names)


def test_quick_run_reference_matches_concept_edit(bench, tmp_path):
    summary = bench.main(["--quick", "--n", "3", "--repeats", "1", "--out", str(tmp_path / "r.json")])
    rows = {r["model"]: r for r in summary["rows"]}
    assert set(rows) == {"tiny-sd1", "tiny-sdxl"}
    for model, r in rows.items():
        for k in bench.VARIANTS:
            assert r[k] is not None and r[k] > 0, (model, k)
        # reference (77-token batch-1 encodes, float32 explicit inverse per layer) == W0 + delta
        assert r["check_ref_vs_ce"]["rel_err_vs_delta"] < 1e-3, r["check_ref_vs_ce"]
        assert r["check_ref_vs_float64"]["rel_err_vs_delta"] < 1e-3
        # bf16 encoding changes the delta a little, not wholesale
        assert 0 < r["delta_rel_err_bf16"] < 0.2
        assert r["ce32_peak_mb"] > 0
    assert "| tiny-sd1 | 3 |" in summary["markdown"]
    assert (tmp_path / "r.json").exists()


def test_mmdit_speed_quick_runs_all_variants():
    """bench/mmdit_speed.py on a tiny FLUX pipeline: floor, ConceptEdit and the published loop all
    run on the same prompts, and the comparison against ConceptEdit's delta is computed."""
    spec = importlib.util.spec_from_file_location("mmdit_speed_bench", BENCH.with_name("mmdit_speed.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rows = {r["variant"]: r for r in mod.run_model("tiny-flux", [2], ["floor", "ce", "ref"], 24, calibrate=False)}
    assert set(rows) == {"floor", "ce", "ref"} and not any("error" in r for r in rows.values()), rows
    assert rows["ce"]["distinct_prompts"] == rows["floor"]["distinct_prompts"] == 5  # 2 erased, 2 preserved, ""
    assert all(rows[v]["seconds"] > 0 and rows[v]["peak_mb"] > 0 for v in rows)
    # the published loop regresses onto outputs that include the bias: its preserved outputs move
    assert rows["ref"]["ref_preserve_shift_context_embedder"] > 0
    assert {"weight_rel_diff_context_embedder", "weight_rel_diff_pooled"} <= set(rows["ref"])
