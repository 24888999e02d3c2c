"""Text-encoder access for the MLP editors (EMCID, null-space): layer selection, fc2 key capture,
hidden states at the subject token, offsets injected after a layer, UNet conditioning.

Works over a :class:`~concept_edit.adapters.diffusers_model.DiffusersModel` (``model.pipe``).
A host adapter that wants EMCID / null-space on the text encoder needs the equivalent of
:func:`encoder_components`, :func:`run_encoder` and :func:`unet_conditioning`; see
docs/text_encoder_editing.md.

Canonical layer names: ``text_encoder.text_model.encoder.layers.{i}.mlp.fc2`` (and
``text_encoder_2.…`` for SDXL's second encoder); a T5 encoder's MLP output projection (FLUX's
``text_encoder_2``, SD3's ``text_encoder_3``) is ``<comp>.encoder.block.{i}.layer.1.DenseReluDense.wo``:
the same closed form applies, its keys are the inputs of ``wo`` (the gated-GELU activations).
"fc2" below means either.

Which layers the pipeline reads: SD 1.x/2.x read the last layer (through the final layer norm);
SDXL reads the penultimate layer of both encoders (``hidden_states[-2]``), so its last layer
only feeds the pooled embedding of encoder 2 and is never edited here. The default edit
range is every read layer except the last one read (EMCID's best setting). The MMDiT families
(FLUX, SD3; ``model`` an :class:`~.mmdit_model.MMDiTModel`): FLUX reads CLIP-L's pooled vector
(its last layer) and T5's last layer; SD3 reads the penultimate layer of CLIP-L and CLIP-G (as
SDXL) and T5's last layer. T5 is bidirectional and the pipelines run it on padded sequences
without a mask, so its states are always taken from full sequences padded to the model's
``max_sequence_length`` (no causal prefix shortcut, no resumed forward).
"""
from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass

import torch

from ..core.prompts import Prompt
from .base import PromptTooLongError, content_ids, text_module_path
from .families import ALL_TEXT_ENCODERS, FAMILIES, encoder_kind

# The text states the UNet's cross-attention reads (to_k / to_v input), named like a layer: the
# key of their C0 (second_moments), of their stage I offsets and of null-space edits on them.
TEXT_STATES = "text_states"


class LayerSelectionError(ValueError):
    pass


# -- layers ----------------------------------------------------------------------------------
def encoder_components(model) -> list[str]:
    pipe = model.pipe
    return [c for c in ALL_TEXT_ENCODERS if getattr(pipe, c, None) is not None]


def encoder(model, comp: str):
    return getattr(model.pipe, comp)


def is_t5(enc) -> bool:
    return encoder_kind(enc.config) == "t5"


def text_model(enc):
    """The CLIP transformer inside an encoder: transformers >= 5 flattens CLIPTextModel (no
    ``.text_model``), CLIPTextModelWithProjection keeps it."""
    return getattr(enc, "text_model", enc)


def enc_layers(enc):
    """The encoder's layers: CLIP ``encoder.layers``, T5 ``encoder.block``."""
    return enc.encoder.block if is_t5(enc) else text_model(enc).encoder.layers


def mlp_out(enc, i: int) -> torch.nn.Module:
    """The MLP output projection of layer ``i``: CLIP ``mlp.fc2``, T5 ``layer[-1].DenseReluDense.wo``."""
    layer = enc_layers(enc)[i]
    return layer.layer[-1].DenseReluDense.wo if is_t5(enc) else layer.mlp.fc2


def num_layers(model, comp: str) -> int:
    return len(enc_layers(encoder(model, comp)))


def read_depth(model, comp: str) -> int:
    """How many layers (from the bottom) the denoiser's text inputs depend on (T5: all of them)."""
    n = num_layers(model, comp)
    return n - 1 if FAMILIES[model.family].penultimate and not is_t5(encoder(model, comp)) else n


def default_layers(model, comp: str) -> list[int]:
    """Every layer the pipeline reads except the last one read."""
    return list(range(max(1, read_depth(model, comp) - 1)))


def fc2_name(comp: str, i: int, model=None) -> str:
    """Canonical name of layer ``i``'s MLP output projection (``model`` tells a T5 component apart:
    FLUX's ``text_encoder_2`` is T5, SDXL's and SD3's are CLIP)."""
    if model is not None and is_t5(encoder(model, comp)):
        return f"{comp}.encoder.block.{i}.layer.1.DenseReluDense.wo"
    return f"{comp}.text_model.encoder.layers.{i}.mlp.fc2"


def parse_fc2_name(name: str) -> tuple[str, int]:
    comp, rest = name.split(".", 1)
    parts = rest.split(".")
    if parts[-2:] == ["DenseReluDense", "wo"] and "block" in parts:
        return comp, int(parts[parts.index("block") + 1])
    if parts[-2:] != ["mlp", "fc2"] or "layers" not in parts:
        raise KeyError(f"{name!r} is not a text-encoder fc2 layer")
    return comp, int(parts[parts.index("layers") + 1])


def text_module(model, name: str) -> torch.nn.Module:
    """Module of a canonical text-encoder name (``comp.text_model.…``)."""
    comp, sub = name.split(".", 1)
    enc = encoder(model, comp)
    return enc.get_submodule(text_module_path(enc, sub))


def _parse(spec, n: int) -> list[int]:
    if isinstance(spec, int):
        spec = [spec]
    if isinstance(spec, str):
        out = []
        for part in spec.split(","):
            part = part.strip()
            m = re.fullmatch(r"(\d+)\s*-\s*(\d+)", part)
            if m:
                out += list(range(int(m.group(1)), int(m.group(2)) + 1))
            elif part:
                out.append(int(part))
        spec = out
    return sorted({int(i) + n if int(i) < 0 else int(i) for i in spec})


def resolve_layers(model, spec=None) -> dict[str, list[int]]:
    """Edit layers per encoder component.

    ``spec``: None (defaults), a list / "0-9" / "0,3,5" string applied to every encoder, or a
    dict {component: spec}. Negative indices count from the encoder's last layer. Layers the
    pipeline does not read (SDXL: the last one) are refused.
    """
    comps = encoder_components(model)
    out = {}
    for comp in comps:
        s = spec.get(comp) if isinstance(spec, dict) else spec
        if isinstance(spec, dict) and comp not in spec:
            continue
        n = num_layers(model, comp)
        layers = default_layers(model, comp) if s is None else _parse(s, n)
        depth = read_depth(model, comp)
        bad = [i for i in layers if not 0 <= i < depth]
        if bad:
            raise LayerSelectionError(
                f"{comp}: cannot edit layer(s) {bad}; this {model.family} pipeline reads layers 0..{depth - 1} "
                f"of {n}" + (" (it reads the penultimate layer)" if FAMILIES[model.family].penultimate else "")
            )
        if not layers:
            raise LayerSelectionError(f"{comp}: no layers selected")
        out[comp] = layers
    if not out:
        raise LayerSelectionError(f"no text encoder selected from {comps}")
    return out


# -- token sequences -------------------------------------------------------------------------
@dataclass
class TokenizedPrompt:
    ids: list[int]  # BOS + content + EOS (no padding), CLIP tokens
    subject: int  # position of the last subject token (0 = BOS when the subject is empty)
    prompt: Prompt | None = None  # the text, for encoders with another tokenizer (T5)


def tokenize_prompts(model, prompts: list[Prompt]) -> list[TokenizedPrompt]:
    tok = model.tokenizer
    out = []
    for p in prompts:
        ids = content_ids(model, p.text)
        n_sub = len(model.token_ids(p.text[: p.subject_end])) if p.subject_end else 0
        out.append(TokenizedPrompt([tok.bos_token_id, *ids, tok.eos_token_id], n_sub, p))
    return out


def t5_batch(model, prompts: list[TokenizedPrompt], *, truncate: bool = False):
    """(ids B x max_sequence_length, lengths incl. EOS, subject positions) for a T5 encoder of an
    MMDiT model: each prompt's text padded as the pipeline pads it. A prompt longer than the
    model's ``max_sequence_length`` is refused (its key would be another prompt's) unless
    ``truncate`` (C0 captions: truncated as the pipeline truncates them)."""
    tok, L = model.t5_tokenizer, model.max_sequence_length
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids = torch.full((len(prompts), L), pad, dtype=torch.long)
    lengths, subjects = [], []
    for r, p in enumerate(prompts):
        if p.prompt is None:
            raise ValueError("T5 keys need the prompt's text (TokenizedPrompt.prompt)")
        seq = tok(p.prompt.text).input_ids
        if len(seq) > L:
            if not truncate:
                raise PromptTooLongError(p.prompt.text, len(seq), L)
            seq = seq[: L - 1] + [tok.eos_token_id]
        ids[r, : len(seq)] = torch.tensor(seq)
        lengths.append(len(seq))
        subjects.append(min(model.t5_index(p.prompt), len(seq) - 1))
    return ids, torch.tensor(lengths), torch.tensor(subjects)


def encoder_batch(model, comp: str, prompts: list[TokenizedPrompt], positions: str):
    """(padded ids, position mask) that the pipeline feeds encoder ``comp`` for ``prompts``; the
    mask selects every position (``padded``) or BOS..EOS only (``tokens``)."""
    if is_t5(encoder(model, comp)):
        ids, lengths, _ = t5_batch(model, prompts, truncate=True)
    else:
        ids = padded_batch(model, comp, prompts)
        lengths = torch.tensor([len(p.ids) for p in prompts])
    if positions == "padded":
        return ids, torch.ones(ids.shape, dtype=torch.bool)
    return ids, torch.arange(ids.shape[1])[None, :] < lengths[:, None]


def padded_batch(model, comp: str, prompts: list[TokenizedPrompt]) -> torch.Tensor:
    """The 77-token ids the pipeline feeds encoder ``comp`` (its tokenizer's padding token)."""
    tok = model.pipe.tokenizer_2 if comp == "text_encoder_2" else model.pipe.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    L = model.max_tokens
    ids = torch.full((len(prompts), L), pad, dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, : len(p.ids)] = torch.tensor(p.ids)
    return ids


# -- running an encoder with capture and injection ---------------------------------------------
@dataclass
class Injection:
    """Add ``delta[r]`` to the output of layer ``layer`` at row r, position ``positions[r]``."""

    layer: int
    delta: torch.Tensor  # (B, hidden)
    positions: torch.Tensor  # (B,) long


@contextlib.contextmanager
def _hooks(enc, *, fc2_layers=(), out_layers=(), injection: Injection | None = None, positions=None, store=None):
    layers = enc_layers(enc)
    handles = []

    if injection is not None:
        rows = torch.arange(injection.positions.shape[0])

        def inject(mod, inp, out):
            h = (out[0] if isinstance(out, tuple) else out).clone()
            h[rows, injection.positions] = h[rows, injection.positions] + injection.delta.to(h.dtype)
            return (h, *out[1:]) if isinstance(out, tuple) else h

        handles.append(layers[injection.layer].register_forward_hook(inject))

    def take(x):
        return x[torch.arange(x.shape[0]), positions] if positions is not None else x

    for i in fc2_layers:
        handles.append(
            mlp_out(enc, i).register_forward_pre_hook(lambda m, inp, i=i: store.__setitem__(("fc2_in", i), take(inp[0])))
        )
    for i in out_layers:  # a T5 block returns (hidden states, position bias, …)
        handles.append(layers[i].register_forward_hook(
            lambda m, inp, out, i=i: store.__setitem__(("out", i), take(out[0] if isinstance(out, tuple) else out))))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def run_encoder(
    model,
    comp: str,
    ids: torch.Tensor,
    positions: torch.Tensor | None,
    *,
    fc2_layers=(),
    out_layers=(),
    injection: Injection | None = None,
    grad: bool = False,
):
    """One forward of encoder ``comp`` on ``ids`` (B x T). Returns (model output, captures) where
    captures[("fc2_in", i)] / captures[("out", i)] are taken at ``positions`` (B,) or full if None."""
    enc = encoder(model, comp)
    store: dict = {}
    dev = enc.device
    ctx = contextlib.nullcontext() if grad else torch.no_grad()
    with ctx, _hooks(enc, fc2_layers=fc2_layers, out_layers=out_layers, injection=injection, positions=positions, store=store):
        out = enc(ids.to(dev))
    return out, store


def run_layers(model, comp: str, hidden: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Run layers ``start..stop`` (inclusive) of encoder ``comp`` on hidden states entering
    layer ``start``, with the model's own causal mask; module hooks fire as in a full forward."""
    from transformers.masking_utils import create_causal_mask

    enc = encoder(model, comp)
    tm = text_model(enc)
    # keywords as CLIPTextTransformer itself calls it (``past_key_values`` is deprecated for ``cache``)
    mask = create_causal_mask(config=tm.config, inputs_embeds=hidden, attention_mask=None, cache=None)
    for layer in enc_layers(enc)[start : stop + 1]:
        hidden = layer(hidden, mask, is_causal=True)
    return hidden


def subject_states(
    model,
    comp: str,
    prompts: list[TokenizedPrompt],
    *,
    fc2_layers=(),
    out_layers=(),
    batch_size: int = 64,
    capture_input: int | None = None,
    start: tuple[int, list[torch.Tensor]] | None = None,
) -> dict:
    """fc2 inputs / layer outputs at each prompt's last subject token (no grad, float32, cpu).

    CLIP is causal, so only the prefix up to the subject token is encoded; prefixes are batched
    by length and right-padded with EOS (which cannot affect earlier positions).

    ``capture_input=l`` also returns, under ("in", l), the hidden states entering layer l for
    every prefix (a list of (len_i x hidden) tensors); ``start=(l, those states)`` resumes the
    forward at layer l from them instead of running the layers below it again (valid while the
    layers below l are unchanged). Layers above the last requested one are not run then.

    T5 (bidirectional) runs full padded sequences every time: ``start`` is ignored and
    ``capture_input`` returns None.
    """
    if is_t5(encoder(model, comp)):
        out = _t5_subject_states(model, comp, prompts, fc2_layers, out_layers, batch_size)
        if capture_input is not None:
            out[("in", capture_input)] = None
        return out
    seqs = [p.ids[: p.subject + 1] for p in prompts]
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    eos = model.tokenizer.eos_token_id
    enc = encoder(model, comp)
    dev = enc.device
    res: dict = {}
    inputs: list = [None] * len(seqs)
    stop = max([*fc2_layers, *out_layers, capture_input if capture_input is not None else 0])
    for begin in range(0, len(order), batch_size):
        chunk = order[begin : begin + batch_size]
        width = max(len(seqs[i]) for i in chunk)
        pos = torch.tensor([len(seqs[i]) - 1 for i in chunk], device=dev)
        store: dict = {}
        handles = []
        if capture_input is not None:
            handles.append(
                enc_layers(enc)[capture_input].register_forward_pre_hook(lambda m, inp: store.__setitem__("in", inp[0].detach()))
            )
        try:
            with torch.no_grad(), _hooks(enc, fc2_layers=fc2_layers, out_layers=out_layers, positions=pos, store=store):
                if start is None:
                    ids = torch.full((len(chunk), width), eos, dtype=torch.long)
                    for r, i in enumerate(chunk):
                        ids[r, : len(seqs[i])] = torch.tensor(seqs[i])
                    enc(ids.to(dev))
                else:
                    l0, states = start
                    h = torch.zeros(len(chunk), width, states[chunk[0]].shape[-1], dtype=states[chunk[0]].dtype)
                    for r, i in enumerate(chunk):
                        h[r, : len(seqs[i])] = states[i]
                    run_layers(model, comp, h.to(dev), l0, stop)
        finally:
            for hd in handles:
                hd.remove()
        for key, val in store.items():
            if key == "in":
                for r, i in enumerate(chunk):
                    inputs[i] = val[r, : len(seqs[i])].cpu()
                continue
            buf = res.setdefault(key, [None] * len(seqs))
            for r, i in enumerate(chunk):
                buf[i] = val[r].float().cpu()
    out = {k: torch.stack(v) for k, v in res.items()}
    if capture_input is not None:
        out[("in", capture_input)] = inputs
    return out


def _t5_subject_states(model, comp, prompts, fc2_layers, out_layers, batch_size) -> dict:
    ids, _, subjects = t5_batch(model, prompts)
    res: dict = {}
    for s in range(0, len(prompts), batch_size):
        _, st = run_encoder(model, comp, ids[s : s + batch_size], subjects[s : s + batch_size].to(encoder(model, comp).device),
                            fc2_layers=fc2_layers, out_layers=out_layers)
        for k, v in st.items():
            res.setdefault(k, []).append(v.float().cpu())
    return {k: torch.cat(v) for k, v in res.items()}


# -- what the UNet reads -----------------------------------------------------------------------
def _unet_states(model, comp, out, store):
    if FAMILIES[model.family].penultimate:
        return store[("out", num_layers(model, comp) - 2)]
    return out.last_hidden_state


def eos_positions(ids: torch.Tensor, eos: int) -> torch.Tensor:
    return (ids == eos).int().argmax(dim=-1)


def unet_conditioning(
    model,
    prompts: list[TokenizedPrompt],
    *,
    injections: dict | None = None,
    state_offset: Injection | None = None,
    grad: bool = False,
):
    """(encoder_hidden_states, added_cond_kwargs or None, eos_features) for padded ``prompts``.

    ``injections`` maps component -> :class:`Injection` (subject-token offsets, with gradient);
    ``state_offset`` adds offsets to the UNet-read states themselves (its ``layer`` is ignored).
    ``eos_features`` is the final-layer feature at the first EOS of each encoder, concatenated
    (EMCID's text-alignment feature E(p)).
    """
    injections = injections or {}
    states, eos_feats, pooled = [], [], None
    for comp in encoder_components(model):
        ids = padded_batch(model, comp, prompts)
        n = num_layers(model, comp)
        outs = (n - 2,) if FAMILIES[model.family].penultimate else ()
        out, st = run_encoder(model, comp, ids, None, out_layers=outs, injection=injections.get(comp), grad=grad)
        states.append(_unet_states(model, comp, out, st))
        pos = eos_positions(ids, model.tokenizer.eos_token_id).to(out.last_hidden_state.device)
        eos_feats.append(out.last_hidden_state[torch.arange(ids.shape[0]), pos])
        if comp == "text_encoder_2":
            pooled = out.text_embeds if hasattr(out, "text_embeds") else out[0]
    ehs = torch.cat(states, dim=-1)
    if state_offset is not None:
        rows = torch.arange(ehs.shape[0])
        ehs = ehs.clone()
        ehs[rows, state_offset.positions] = ehs[rows, state_offset.positions] + state_offset.delta.to(ehs.dtype)
    added = None
    if model.family == "sdxl":
        unet = model.pipe.unet
        size = unet.config.sample_size * model.pipe.vae_scale_factor
        tid = torch.tensor([size, size, 0, 0, size, size], dtype=ehs.dtype, device=ehs.device)
        added = {"text_embeds": pooled, "time_ids": tid.expand(ehs.shape[0], -1)}
    return ehs, added, torch.cat(eos_feats, dim=-1)


def text_states_fingerprint_weights(model) -> dict:
    """The weights whose values determine stage I targets (for cache keys)."""
    out = {}
    for comp in encoder_components(model):
        for name, p in encoder(model, comp).named_parameters():
            if name.endswith("weight"):
                out[f"{comp}.{name}"] = p
    unet = getattr(model.pipe, "unet", None)
    for name, p in unet.named_parameters() if unet is not None else ():
        if name.endswith("attn2.to_k.weight") or name.endswith("conv_in.weight") or name.endswith("conv_out.weight"):
            out[f"unet.{name}"] = p
    return out
