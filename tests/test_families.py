"""One family detector for every host: diffusers pipelines, config folders, single files and ComfyUI's facts."""

import pytest
from concept_edit.adapters.families import (
    FAMILIES,
    UnknownFamilyError,
    detect_family,
    encoders_from_configs,
    encoders_from_keys,
)
from concept_edit.adapters.ldm_keymap import (
    pipeline_entries,
    read_configs,
    single_file_family,
)

# ComfyUI's CLIP state dicts hold each encoder under clip_<stream>.transformer. with transformers
# names (written out here, independently of the family table)
COMFY_STREAMS = {"sd1": {"text_encoder": "clip_l"}, "sd2": {"text_encoder": "clip_h"},
                 "sdxl": {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}}
REAL_WIDTH = {"sd1": 768, "sd2": 1024, "sdxl": 2048}


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_every_host_agrees(tiny, family, tmp_path):
    pipe, model = tiny(family)
    assert model.family == family  # diffusers adapter (pipeline configs)

    pipe.save_pretrained(str(tmp_path))
    assert detect_family(encoders_from_configs(read_configs(tmp_path))) == family  # config folder

    file_keys = [e.key for e in pipeline_entries(pipe)]  # the keys of its original-layout single file
    assert single_file_family({}, file_keys) == family

    # ComfyUI: the CLIP's state-dict keys and the UNet's context width (real checkpoints only)
    comfy_keys = [f"{stream}.transformer.{k}" for comp, stream in COMFY_STREAMS[family].items()
                  for k in getattr(pipe, comp).state_dict()]
    facts = encoders_from_keys(comfy_keys, "comfy_prefix")
    assert detect_family(facts, cross_attention_dim=REAL_WIDTH[family]) == family
    assert FAMILIES[family].penultimate == (family == "sdxl")


def test_unknown_or_inconsistent_models_are_refused():
    with pytest.raises(UnknownFamilyError, match="context width of 1024"):
        detect_family({"text_encoder": "clip"}, cross_attention_dim=1024)
    with pytest.raises(UnknownFamilyError, match="unsupported model"):
        detect_family({"text_encoder": "openclip", "text_encoder_2": "openclip"})
    with pytest.raises(UnknownFamilyError, match="none"):
        detect_family(encoders_from_keys(["vae.encoder.conv_in.weight"], "comfy_prefix"))
    with pytest.raises(UnknownFamilyError, match="'t5'"):  # T5 alone is no family ConceptEdit knows
        detect_family(encoders_from_keys(["t5xxl.transformer.encoder.block.0.weight"], "comfy_prefix"))


def test_single_file_without_text_encoder_falls_back_to_configs(tiny):
    pipe, _ = tiny("sdxl")
    configs = {c: getattr(pipe, c).config.to_dict() for c in ("text_encoder", "text_encoder_2")}
    assert single_file_family(configs, ["model.diffusion_model.out.2.weight"]) == "sdxl"
