"""A ComfyUI CLIP as transformers text encoders, for the text-encoder methods (EMCID, the null-space
engine's text-encoder site), which hook a transformers ``CLIPTextModel``'s layers.

:func:`text_encoder_model` rebuilds one ``CLIPTextModel`` per ComfyUI CLIP stream from the CLIP's
*effective* weights (its patches applied), shaped so that the library reads exactly the states
ComfyUI feeds the UNet. ComfyUI picks them per stream in ``sd1_clip.SDClipModel``: a layer
(``layer`` / ``layer_idx``, the last one unless the family or CLIPSetLastLayer says otherwise) and
whether the final layer norm is applied to it (``layer_norm_hidden_state``); the padding token is
the tokenizer's (``pad_with_end``):

* SD 1.x (clip_l): the last layer, through the final layer norm, padded with EOS: a plain encoder;
* SD 2.x (clip_h): the penultimate layer *through the final layer norm*, padded with token 0: the
  encoder without its last layer (as diffusers ships SD 2.x: 23 of OpenCLIP-H's 24 layers), whose
  output is that;
* SDXL (clip_l ‖ clip_g): the penultimate layer of each, no final layer norm, clip_l padded with
  EOS and clip_g with 0: what the library reads of an SDXL pipeline (``hidden_states[-2]``).

ComfyUI computes CLIP in float32 from its stored (float16 on the CPU) weights; the rebuilt encoders
hold float32 copies of those weights, so the states agree to float32 rounding. A CLIP that reads
another layer than its family's default (CLIPSetLastLayer) is refused: an edit would be computed
for states the UNet does not read.
"""
from __future__ import annotations

import copy
from types import SimpleNamespace

import torch

from .comfy_clip import prefix_clip
from .comfy_model import (
    ComfyModelError,
    _clip_keys,
    _unet_config,
    detect_family,
    effective_weights,
)
from .families import FAMILIES, encoders_from_keys
from .families import detect_family as detect_from_encoders
from .ldm_keymap import params_on_meta

# the transformers activation of each encoder kind (families.py): OpenAI CLIP / OpenCLIP
ACTIVATION = {"clip": "quick_gelu", "openclip": "gelu"}


class _StubUNet(torch.nn.Module):
    """Stands in for the UNet in a text-encoder-only pipeline (only its config is read)."""

    def __init__(self, cross_attention_dim: int):
        super().__init__()
        self.config = SimpleNamespace(cross_attention_dim=cross_attention_dim)


def comfy_read(enc, layer_idx: int | None) -> tuple[int, bool]:
    """(index of the layer whose output ComfyUI feeds the UNet, through the final layer norm?) for
    one ComfyUI encoder (``SDClipModel``, e.g. ``clip.cond_stage_model.clip_l``) as
    ``CLIP.encode_from_tokens`` sets it up: its default options, then ``layer_idx`` (the CLIP's
    ``layer_idx``, set by CLIPSetLastLayer; None: not set) through ``set_clip_options``."""
    n = enc.num_layers
    layer, idx = enc.options_default[:2]
    if layer_idx is not None:
        layer, idx = ("last", None) if abs(layer_idx) > n else ("hidden", layer_idx)
    if layer == "last":
        return n - 1, True
    if layer != "hidden":
        raise ComfyModelError(f"ComfyUI's encoder returns {layer!r} states; text-encoder methods need one layer")
    return idx % n, bool(enc.layer_norm_hidden_state)


def _kept_layers(family: str, stream: str, n: int, read: tuple[int, bool]) -> int:
    """How many layers of the ComfyUI encoder the rebuilt one keeps so that the library reads
    ``read`` from it; refuses a read it cannot reproduce."""
    layer, normed = read
    if FAMILIES[family].penultimate:  # the library reads hidden_states[-2], no final layer norm
        ok, keep = (layer == n - 2 and not normed), n
    else:  # the library reads the final output, through the final layer norm
        ok, keep = normed, layer + 1
    if not ok:
        norm = "with" if normed else "without"
        raise ComfyModelError(f"ComfyUI's {family} clip_{stream} reads layer {layer} of {n} ({norm} the final layer norm), "
                              "which the text-encoder methods cannot reproduce")
    return keep


def _encoder(clip, enc, prefix: str, kind: str, keep: int, pad: int):
    """A float32 CLIPTextModel of the first ``keep`` layers of ComfyUI encoder ``enc`` (state-dict
    ``prefix``) with the CLIP's effective weights."""
    from transformers import CLIPTextConfig, CLIPTextModel

    top, layers = prefix + "text_model.", prefix + "text_model.encoder.layers."
    keys = [k for k in _clip_keys(clip)
            if k.startswith(top) and not (k.startswith(layers) and int(k[len(layers):].split(".")[0]) >= keep)]
    sd = {k[len(top):]: v for k, v in effective_weights(clip.patcher, keys, base="patched").items()}
    tok_emb, pos_emb = sd["embeddings.token_embedding.weight"], sd["embeddings.position_embedding.weight"]
    cfg = CLIPTextConfig(
        vocab_size=tok_emb.shape[0], hidden_size=tok_emb.shape[1], max_position_embeddings=pos_emb.shape[0],
        intermediate_size=sd["encoder.layers.0.mlp.fc1.weight"].shape[0], num_hidden_layers=keep,
        num_attention_heads=enc.transformer.text_model.encoder.layers[0].self_attn.heads,
        hidden_act=ACTIVATION[kind], bos_token_id=49406, eos_token_id=49407, pad_token_id=pad,
    )
    with params_on_meta():  # no random initialisation: every parameter is assigned below
        te = CLIPTextModel(cfg)
    target = getattr(te, "text_model", te)  # transformers >= 5 flattens CLIPTextModel
    missing, unexpected = target.load_state_dict(sd, strict=False, assign=True)
    missing = [m for m in missing if "position_ids" not in m]
    if missing or unexpected or any(p.is_meta for p in te.parameters()):
        raise ComfyModelError(f"could not map ComfyUI's {prefix} onto a CLIPTextModel; "
                              f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    return te.eval().requires_grad_(False)


def _tokenizer(clip, stream: str):
    """A copy of the transformers tokenizer of ComfyUI's stream, with ComfyUI's length and padding."""
    sd_tok = getattr(clip.tokenizer, f"clip_{stream}")
    tok = copy.deepcopy(sd_tok.tokenizer)  # ComfyUI's own object stays untouched
    tok.model_max_length = int(getattr(sd_tok, "max_length", 77))  # its config says 8192
    tok.pad_token = tok.convert_ids_to_tokens(int(sd_tok.pad_token))  # SD 2.x / clip_g pad with "!" (id 0)
    return tok


def text_encoder_model(clip, model_patcher=None):
    """A :class:`DiffusersModel` over transformers CLIPTextModels holding this CLIP's *effective*
    weights (its patches applied) that read exactly the text states ComfyUI feeds the UNet (see the
    module docstring), for the text-encoder methods (EMCID, null-space text-encoder site).

    SD 1.x, SD 2.x and SDXL. Refused: a CLIPSetLastLayer other than the family's default (SD 1.x
    -1, SD 2.x and SDXL -2; a refusal names it), a CLIP that ComfyUI encodes with other code than
    its own SD1/SDXL CLIP classes (attention masks, zeroed padding: :func:`.comfy_clip.prefix_clip`),
    and any read ComfyUI makes that no CLIPTextModel reproduces. Layer names are the library's: ``text_encoder.`` / ``text_encoder_2.`` (SDXL's clip_g).
    """
    from .diffusers_model import DiffusersModel

    if model_patcher is not None:
        family = detect_family(model_patcher, clip)
    else:
        family = detect_from_encoders(encoders_from_keys(_clip_keys(clip), "comfy_prefix"))
    if prefix_clip(clip) is None:  # not ComfyUI's own SD1/SDXL CLIP code (or masked / zeroed padding)
        raise ComfyModelError(f"this CLIP ({type(clip.cond_stage_model).__name__}) encodes with code the text-encoder "
                              "methods do not reproduce; use UCE")
    parts = {}
    for spec in FAMILIES[family].text_encoders:
        stream = spec.comfy_prefix.split(".")[0][len("clip_"):]
        enc = getattr(clip.cond_stage_model, f"clip_{stream}")
        n = enc.num_layers
        read, default = comfy_read(enc, clip.layer_idx), comfy_read(enc, None)
        if read != default:
            raise ComfyModelError(
                f"CLIPSetLastLayer({clip.layer_idx}) makes ComfyUI read layer {read[0] - n} of clip_{stream}; the text-encoder "
                f"methods edit the states a {family} model reads by default (layer {default[0] - n}): remove CLIPSetLastLayer "
                f"(or set it to {default[0] - n}) before this node")
        keep = _kept_layers(family, stream, n, read)
        tok = _tokenizer(clip, stream)
        parts[spec.component] = (_encoder(clip, enc, spec.comfy_prefix, spec.kind, keep, tok.pad_token_id), tok)
    (te, tok), (te2, tok2) = parts["text_encoder"], parts.get("text_encoder_2", (None, None))
    if model_patcher is not None:
        ctx = int(_unet_config(model_patcher)["context_dim"])
    else:
        ctx = sum(p[0].config.hidden_size for p in parts.values())
    pipe = SimpleNamespace(text_encoder=te, tokenizer=tok, text_encoder_2=te2, tokenizer_2=tok2, unet=_StubUNet(ctx))
    return DiffusersModel(pipe)
