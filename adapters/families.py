"""Model families as data: what SD 1.x, SD 2.x, SDXL, FLUX.1 and SD3.x are made of, and one rule
telling them apart.

A family is decided by its text encoders alone: which pipeline components exist and whether
each is OpenAI's CLIP (quick_gelu; stored under transformers names in single files; ComfyUI's
``clip_l``), an OpenCLIP model (gelu; OpenCLIP names; ``clip_h`` / ``clip_g``) or T5. Every host
reduces what it has to those facts (``{component: kind}``) and calls :func:`detect_family`:

* diffusers pipelines and config folders: the text-encoder configs (:func:`encoders_from_configs`);
* original-layout single files: which text-encoder prefixes their keys carry
  (:func:`encoders_from_keys` with ``single_file_prefix``);
* ComfyUI: which CLIP prefixes its CLIP's state dict carries (``comfy_prefix``).

Widths are not used to decide (the tiny test models are narrow); ``cross_attention_dim`` is the
real checkpoints' width, a consistency check for hosts that only ever see real models.

Where text enters the denoiser is data too. In the UNet families it is every cross-attention
``attn2.to_k``/``to_v`` (all read the same text states). In the MMDiT families (FLUX, SD3) text is
mixed with image tokens inside joint attention and modulated per block and timestep, so the only
linear maps that read the frozen text-encoder outputs are listed in ``text_readers``: the context
embedder (token states) and the pooled-text embedder (the pooled vector), each with the key space
it reads and its names in original-layout files.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

TEXT_ENCODERS = ("text_encoder", "text_encoder_2")  # the UNet families' encoders
ALL_TEXT_ENCODERS = TEXT_ENCODERS + ("text_encoder_3",)  # SD3 adds T5 as the third


class UnknownFamilyError(ValueError):
    pass


@dataclass(frozen=True)
class TextEncoderSpec:
    component: str  # canonical pipeline component
    kind: str  # "clip" (OpenAI CLIP) | "openclip" | "t5"
    single_file_prefix: str  # its prefix in an original-layout (ldm / sgm) single file
    comfy_prefix: str  # its prefix in a ComfyUI CLIP's state dict


@dataclass(frozen=True)
class TextReader:
    """A linear map of the denoiser that reads text-encoder outputs (MMDiT families)."""

    module: str  # canonical name: ``transformer.<diffusers module path>``
    space: str  # the keys it reads: "states" (per-token text states) | "pooled" (the pooled vector)
    original: str  # its name in original-layout files (ComfyUI's LoRA keys: ``lora_unet_<name with _>``)


@dataclass(frozen=True)
class Family:
    name: str
    text_encoders: tuple[TextEncoderSpec, ...]
    penultimate: bool  # the UNet reads the penultimate encoder layer (no final layer norm)
    cross_attention_dim: int  # width of the text states the denoiser reads, in the real checkpoints
    denoiser: str = "unet"  # pipeline component: "unet" | "transformer"
    text_readers: tuple[TextReader, ...] = ()  # MMDiT: the maps that read text (UNet: every attn2 to_k/to_v)
    max_sequence_length: int = 77  # T5 tokens the pipeline pads to by default (the keys depend on it)

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
        # FLUX.1: T5 states -> context_embedder (txt_in), CLIP-L pooled -> the pooled embedder (vector_in)
        Family("flux", (TextEncoderSpec("text_encoder", "clip", "text_encoders.clip_l.transformer.", "clip_l.transformer."),
                        TextEncoderSpec("text_encoder_2", "t5", "text_encoders.t5xxl.transformer.", "t5xxl.transformer.")),
               penultimate=False, cross_attention_dim=4096, denoiser="transformer",
               text_readers=(TextReader("transformer.context_embedder", "states", "txt_in"),
                             TextReader("transformer.time_text_embed.text_embedder.linear_1", "pooled", "vector_in.in_layer")),
               max_sequence_length=512),
        # SD3.x: [CLIP-L ‖ CLIP-G penultimate states, zero-padded to 4096 ; T5 states] -> context_embedder,
        # CLIP-L ‖ CLIP-G pooled -> the pooled embedder (y_embedder)
        Family("sd3", (TextEncoderSpec("text_encoder", "clip", "text_encoders.clip_l.transformer.", "clip_l.transformer."),
                       TextEncoderSpec("text_encoder_2", "openclip", "text_encoders.clip_g.transformer.", "clip_g.transformer."),
                       TextEncoderSpec("text_encoder_3", "t5", "text_encoders.t5xxl.transformer.", "t5xxl.transformer.")),
               penultimate=True, cross_attention_dim=4096, denoiser="transformer",
               text_readers=(TextReader("transformer.context_embedder", "states", "context_embedder"),
                             TextReader("transformer.time_text_embed.text_embedder.linear_1", "pooled", "y_embedder.mlp.0")),
               max_sequence_length=256),
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
        f"unsupported model: text encoders {facts or 'none'}; ConceptEdit supports SD 1.x, SD 2.x, SDXL, FLUX.1 "
        f"and SD3.x ({known})"
    )


def encoder_kind(config) -> str:
    """"clip", "openclip" or "t5" from a text encoder's config (dict or config object): OpenAI's
    CLIP uses quick_gelu, the OpenCLIP encoders of SD 2.x / SDXL / SD3 use gelu."""
    get = config.get if isinstance(config, Mapping) else (lambda k: getattr(config, k, None))
    if get("model_type") in ("t5", "umt5") or get("d_model") is not None:
        return "t5"
    return "clip" if (get("hidden_act") or "quick_gelu") == "quick_gelu" else "openclip"


def encoders_from_configs(configs: Mapping) -> dict[str, str]:
    """{component: kind} from component configs (``{"text_encoder": cfg, "text_encoder_2": cfg or None, …}``)."""
    return {c: encoder_kind(configs[c]) for c in ALL_TEXT_ENCODERS if configs.get(c)}


def encoders_from_keys(keys: Iterable[str], field: str = "single_file_prefix") -> dict[str, str]:
    """{component: kind} from state-dict keys: the text encoders whose prefix (``field`` of
    :class:`TextEncoderSpec`: ``single_file_prefix`` or ``comfy_prefix``) some key carries."""
    keys = list(keys)
    best: dict[str, str] = {}
    # per family, since a prefix (T5's) names different components in different families; the
    # family with the most encoders present decides what the keys hold
    for fam in FAMILIES.values():
        found = {e.component: e.kind for e in fam.text_encoders if any(k.startswith(getattr(e, field)) for k in keys)}
        if len(found) > len(best):
            best = found
    return best
