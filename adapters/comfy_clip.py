"""ComfyUI's own CLIP modules run on real-length id prefixes, giving what ``encode_from_tokens`` gives.

``clip.encode_from_tokens`` always runs 77 positions (ComfyUI's ``CLIPTextModel_`` adds all 77
position embeddings to its input), while a last-token key needs only its prompt's prefix: CLIP is
causal, so position i depends only on positions <= i. :class:`PrefixCLIP` runs the *same* modules
as ComfyUI — the token embedding, the encoder layers and the final layer norm of
``comfy/clip_model.py``, through ComfyUI's casting ops (fp16 weights, float32 compute on the CPU),
after ``clip.load_model()`` has loaded the CLIP's patches (LoRAs, text-encoder edits) — on a batch
of equal-length prefixes, with the first L position embeddings and an L x L causal mask, and reads
what ComfyUI's ``SDClipModel.forward`` reads: the last layer, or the layer chosen by the model or by
clip-skip (``clip.layer_idx``, CLIPSetLastLayer) with or without the final layer norm; SDXL's
clip_l and clip_g states are concatenated in that order, as ``SDXLClipModel`` does. No token
weights (ids only, weight 1.0: ComfyUI then encodes no empty-prompt row) and no pooled output.

:func:`prefix_clip` claims only CLIPs whose code path this reproduces — ComfyUI's ``SD1ClipModel``
(SD 1.x / 2.x) and ``SDXLClipModel`` wrappers over ``SDClipModel`` encoders with ComfyUI's
``CLIPTextModel``, no attention mask, no zeroed padding — and returns None for anything else
(another class, a subclass overriding a step, "all layers" output), so the caller falls back to
``encode_from_tokens`` at 77 positions rather than approximate.
"""
from __future__ import annotations

import torch


def _encoders(csm) -> list | None:
    """[(token stream, SDClipModel)] of ComfyUI's CLIP wrapper in concatenation order, or None."""
    from comfy import sd1_clip, sdxl_clip

    fn = getattr(type(csm), "encode_token_weights", None)
    if fn is sdxl_clip.SDXLClipModel.encode_token_weights:
        return [("l", csm.clip_l), ("g", csm.clip_g)]
    if fn is sd1_clip.SD1ClipModel.encode_token_weights:
        return [(csm.clip_name, getattr(csm, csm.clip))]
    return None


def _reproducible(enc) -> bool:
    """``enc`` runs SDClipModel's own code on ComfyUI's CLIPTextModel, with no attention mask
    and no zeroed padding (both would make positions after EOS differ), reading one layer."""
    from comfy import clip_model, sd1_clip

    t = type(enc)
    return (isinstance(enc, sd1_clip.SDClipModel)
            and t.encode_token_weights is sd1_clip.ClipTokenWeightEncoder.encode_token_weights
            and all(getattr(t, m) is getattr(sd1_clip.SDClipModel, m) for m in ("encode", "forward", "process_tokens"))
            and type(enc.transformer) is clip_model.CLIPTextModel
            and type(enc.transformer.text_model) is clip_model.CLIPTextModel_
            and not enc.enable_attention_masks and not enc.zero_out_masked
            and enc.layer != "all")  # "all" is fixed at construction; the others are set per call


class PrefixCLIP:
    """Real-length encoding on a ComfyUI CLIP; build with :func:`prefix_clip`."""

    def __init__(self, clip, encoders: list):
        self.clip = clip
        self.encoders = encoders

    def prepare(self) -> bool:
        """Set the CLIP's options and load its patches exactly as ``encode_from_tokens`` does;
        False if the layer it now reads is one this class does not reproduce."""
        csm = self.clip.cond_stage_model
        csm.reset_clip_options()
        if self.clip.layer_idx is not None:
            csm.set_clip_options({"layer": self.clip.layer_idx})
        self.clip.load_model()
        return all(enc.layer in ("last", "hidden") for _, enc in self.encoders)

    @torch.no_grad()
    def states(self, rows: dict[str, list[list[int]]]) -> torch.Tensor:
        """float32 states (B x L x width) of equal-length id rows per stream; call :meth:`prepare` first."""
        return torch.cat([_forward(enc, rows[s]) for s, enc in self.encoders], dim=-1)


def _forward(enc, rows: list[list[int]]) -> torch.Tensor:
    """``SDClipModel.forward`` + ``CLIPTextModel_.forward`` for ids only, at the rows' own length."""
    import comfy.ops

    tm = enc.transformer.text_model
    emb = enc.transformer.get_input_embeddings()
    dev = emb.weight.device
    ids = torch.tensor(rows, dtype=torch.long, device=dev)
    L = ids.shape[1]
    x = emb(ids, out_dtype=torch.float32)
    x = x + comfy.ops.cast_to(tm.embeddings.position_embedding.weight, dtype=x.dtype, device=dev)[:L]
    mask = torch.full((L, L), -torch.finfo(x.dtype).max, dtype=x.dtype, device=dev).triu_(1)
    last = enc.layer == "last"
    x, mid = tm.encoder(x, mask=mask, intermediate_output=None if last else enc.layer_idx)
    if last:
        return tm.final_layer_norm(x).float().cpu()
    return (tm.final_layer_norm(mid) if enc.layer_norm_hidden_state else mid).float().cpu()


def prefix_clip(clip) -> PrefixCLIP | None:
    """A :class:`PrefixCLIP` for ``clip`` if its encoding is one this module reproduces, else None."""
    try:
        encs = _encoders(clip.cond_stage_model)
    except ImportError:
        return None
    if not encs or not all(_reproducible(e) for _, e in encs):
        return None
    return PrefixCLIP(clip, encs)
