"""Model families as data: what SD 1.x, SD 2.x and SDXL are made of, and one rule telling them apart.

A family is decided by its text encoders alone: which pipeline components exist and whether
each is OpenAI's CLIP (quick_gelu; stored under transformers names in single files; ComfyUI's
``clip_l``) or an OpenCLIP model (gelu; OpenCLIP names; ``clip_h`` / ``clip_g``). Every host
reduces what it has to those facts (``{component: kind}``) and calls :func:`detect_family`:

* diffusers pipelines and config folders: the text-encoder configs (:func:`encoders_from_configs`);
* original-layout single files: which text-encoder prefixes their keys carry
  (:func:`encoders_from_keys` with ``single_file_prefix``);
* ComfyUI: which CLIP prefixes its CLIP's state dict carries (``comfy_prefix``).

Widths are not used to decide (the tiny test models are narrow); ``cross_attention_dim`` is the
real checkpoints' width, a consistency check for hosts that only ever see real models.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


class UnknownFamilyError(ValueError):
    pass


@dataclass(frozen=True)
class TextEncoderSpec:
    component: str  # canonical pipeline component
    kind: str  # "clip" (OpenAI CLIP) | "openclip"
    single_file_prefix: str  # its prefix in an original-layout (ldm / sgm) single file
    comfy_prefix: str  # its prefix in a ComfyUI CLIP's state dict


@dataclass(frozen=True)
class Family:
    name: str
    text_encoders: tuple[TextEncoderSpec, ...]
    penultimate: bool  # the UNet reads the penultimate encoder layer (no final layer norm)
    cross_attention_dim: int  # UNet context width of the real checkpoints

    @property
    def encoders(self) -> dict[str, str]:
        """The facts that identify this family: {component: kind}."""
        return {e.component: e.kind for e in self.text_encoders}


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("sd1", (TextEncoderSpec("text_encoder", "clip", "cond_stage_model.transformer.", "clip_l.transformer."),),
               penultimate=False, cross_attention_dim=768),
        Family("sd2", (TextEncoderSpec("text_encoder", "openclip", "cond_stage_model.model.", "clip_h.transformer."),),
               penultimate=False, cross_attention_dim=1024),
        Family("sdxl", (TextEncoderSpec("text_encoder", "clip", "conditioner.embedders.0.transformer.", "clip_l.transformer."),
                        TextEncoderSpec("text_encoder_2", "openclip", "conditioner.embedders.1.model.", "clip_g.transformer.")),
               penultimate=True, cross_attention_dim=2048),
    )
}


def detect_family(encoders: Mapping[str, str], *, cross_attention_dim: int | None = None) -> str:
    """"sd1" | "sd2" | "sdxl": the family whose text encoders are exactly ``encoders``
    ({component: "clip" | "openclip"}). ``cross_attention_dim``, if given, must be the family's
    real width (for hosts that see only real checkpoints)."""
    facts = dict(encoders)
    for fam in FAMILIES.values():
        if fam.encoders == facts:
            if cross_attention_dim is not None and cross_attention_dim != fam.cross_attention_dim:
                raise UnknownFamilyError(
                    f"unsupported model: {fam.name} text encoders but a UNet context width of {cross_attention_dim} "
                    f"({fam.name} has {fam.cross_attention_dim})"
                )
            return fam.name
    known = "; ".join(f"{f.name}: {f.encoders}" for f in FAMILIES.values())
    raise UnknownFamilyError(
        f"unsupported model: text encoders {facts or 'none'}; ConceptEdit supports SD 1.x, SD 2.x and SDXL ({known})"
    )


def encoder_kind(config) -> str:
    """"clip" or "openclip" from a text encoder's config (dict or config object): OpenAI's CLIP
    uses quick_gelu, the OpenCLIP encoders of SD 2.x / SDXL use gelu."""
    act = config.get("hidden_act") if isinstance(config, Mapping) else getattr(config, "hidden_act", None)
    return "clip" if (act or "quick_gelu") == "quick_gelu" else "openclip"


def encoders_from_configs(configs: Mapping) -> dict[str, str]:
    """{component: kind} from component configs (``{"text_encoder": cfg, "text_encoder_2": cfg or None, …}``)."""
    return {c: encoder_kind(configs[c]) for c in TEXT_ENCODERS if configs.get(c)}


def encoders_from_keys(keys: Iterable[str], field: str = "single_file_prefix") -> dict[str, str]:
    """{component: kind} from state-dict keys: the text encoders whose prefix (``field`` of
    :class:`TextEncoderSpec`: ``single_file_prefix`` or ``comfy_prefix``) some key carries."""
    specs = {getattr(e, field): e for f in FAMILIES.values() for e in f.text_encoders}
    found: dict[str, str] = {}
    for k in keys:
        for prefix, e in specs.items():
            if k.startswith(prefix):
                found[e.component] = e.kind
    return found
