"""Stage I fan-out through Ray on a local one-CPU cluster (skipped when ray is not installed)."""
import pytest

ray = pytest.importorskip("ray")


def test_stage_i_through_ray_matches_cache_protocol(tiny, tmp_path):
    from concept_edit.engines.stage_i import (
        StageIConfig,
        TargetRequest,
        compute_targets,
    )

    _, model = tiny("sd1")
    reqs = [TargetRequest("cat", "dog"), TargetRequest("car", "boat")]
    cfg = StageIConfig(mode="text", steps=3, batch_concepts=1)
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    try:
        r = compute_targets(model, reqs, ["a photo of a {}"], {"text_encoder": [0, 1]}, cfg, cache_dir=tmp_path,
                            executor="ray", progress=False)
    finally:
        ray.shutdown()
    assert r.steps_run == 6 and r.computed == 2
    assert len(list(tmp_path.glob("*.safetensors"))) == 2
    local = compute_targets(model, reqs, ["a photo of a {}"], {"text_encoder": [0, 1]}, cfg, cache_dir=tmp_path, progress=False)
    assert local.steps_run == 0 and local.cached == 2
