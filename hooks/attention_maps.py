"""Cross-attention map capture for diffusers pipelines and ComfyUI models.

Both hosts feed one :class:`AttentionStore`, which keeps, per branch ("positive" = the prompt,
"negative" = the classifier-free-guidance negative/unconditional prompt) and per image, the
softmax cross-attention probabilities of every text token, averaged over heads, summed over
every cross-attention layer and every denoising step, each layer's map first resized to a common
latent grid. :meth:`AttentionStore.maps` returns them upsampled to the image size.

* diffusers: :func:`install_diffusers_capture` swaps the UNet's ``attn2`` processors for
  :class:`DiffusersCrossAttentionCapture` (and returns a handle that restores the originals).
  Classifier-free guidance in diffusers batches ``[negative, positive]``; the first half of the
  batch is recorded as "negative" when ``cfg=True``.
* ComfyUI: :class:`ComfyAttn2Capture` is an ``attn2`` *replace* patch (``set_model_attn2_replace``)
  that computes the attention itself (identical output) and splits the batch by ComfyUI's
  ``cond_or_uncond`` list (0 = positive, 1 = negative), so the two branches never mix.

Nothing here imports ComfyUI or diffusers at module import time.
"""
from __future__ import annotations

import math
import re
import threading

import torch
import torch.nn.functional as F

BRANCHES = ("positive", "negative")


class AttentionStore:
    """Accumulates cross-attention probabilities per branch: sum over layers and steps."""

    def __init__(self, grid: tuple[int, int] | None = None):
        self.grid = grid  # (h, w) the maps are accumulated at; None = the largest seen first
        self._sum: dict[str, torch.Tensor] = {}
        self._count: dict[str, int] = {}
        self.steps: set = set()
        self.layers: set = set()
        self._lock = threading.Lock()

    def reset(self) -> None:
        with self._lock:
            self._sum.clear()
            self._count.clear()
            self.steps.clear()
            self.layers.clear()

    def add(self, branch: str, probs: torch.Tensor, hw: tuple[int, int], *, layer=None, step=None) -> None:
        """``probs``: (batch, h*w, tokens) head-averaged attention probabilities of one layer call."""
        if branch not in BRANCHES:
            raise ValueError(f"branch must be one of {BRANCHES}")
        h, w = hw
        b, n, t = probs.shape
        if n != h * w:
            raise ValueError(f"attention has {n} queries, expected {h}x{w}")
        m = probs.detach().float().cpu().permute(0, 2, 1).reshape(b, t, h, w)
        with self._lock:
            if self.grid is None:
                self.grid = (h, w)
            if (h, w) != tuple(self.grid):
                m = F.interpolate(m, size=tuple(self.grid), mode="bilinear", align_corners=False)
            cur = self._sum.get(branch)
            if cur is None or cur.shape[0] != b:
                self._sum[branch] = m
                self._count[branch] = 0
            else:
                if cur.shape[1] < t:  # a longer context (e.g. a prompt past 77 tokens): widen
                    cur = F.pad(cur, (0, 0, 0, 0, 0, t - cur.shape[1]))
                cur[:, :t] += m
                self._sum[branch] = cur
            self._count[branch] = self._count.get(branch, 0) + 1
            if layer is not None:
                self.layers.add(layer)
            if step is not None:
                self.steps.add(step)

    def has(self, branch: str = "positive") -> bool:
        return branch in self._sum

    def raw(self, branch: str = "positive") -> torch.Tensor:
        """(batch, tokens, h, w) mean attention over the recorded layer calls."""
        if branch not in self._sum:
            raise KeyError(f"no {branch} cross-attention was recorded (did the sampler run? CFG 1 skips the negative)")
        return self._sum[branch] / max(self._count[branch], 1)

    def maps(self, branch: str, token_indices: list[int] | list[list[int]], size: tuple[int, int]) -> torch.Tensor:
        """(batch, len(token_indices), H, W) maps for the given tokens, upsampled to ``size``, each
        normalised to [0, 1]. An entry may be a list of indices (a multi-token word): summed."""
        raw = self.raw(branch)
        picks = []
        for ix in token_indices:
            ix = [ix] if isinstance(ix, int) else list(ix)
            ix = [i for i in ix if 0 <= i < raw.shape[1]]
            picks.append(raw[:, ix].sum(1) if ix else torch.zeros_like(raw[:, 0]))
        m = torch.stack(picks, 1) if picks else raw[:, :0]
        m = F.interpolate(m, size=tuple(size), mode="bicubic", align_corners=False).clamp_min(0)
        flat = m.flatten(2)
        lo = flat.min(-1, keepdim=True).values
        hi = flat.max(-1, keepdim=True).values
        flat = (flat - lo) / (hi - lo).clamp_min(1e-12)
        return flat.reshape(m.shape)


def head_mean_probs(q: torch.Tensor, k: torch.Tensor, heads: int, scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) averaged over heads; q (b, n, h*d), k (b, t, h*d) -> (b, n, t)."""
    b, n, hd = q.shape
    d = hd // heads
    qh = q.float().reshape(b, n, heads, d).transpose(1, 2)
    kh = k.float().reshape(b, k.shape[1], heads, d).transpose(1, 2)
    s = (qh @ kh.transpose(-1, -2)) * (scale if scale is not None else d**-0.5)
    return s.softmax(-1).mean(1)


def _hw_from(n: int, shape_hint) -> tuple[int, int]:
    """Latent (h, w) of a layer with ``n`` queries, from the full latent shape (aspect ratio)."""
    if shape_hint is not None:
        H, W = int(shape_hint[-2]), int(shape_hint[-1])
        if H * W == n:
            return H, W
        f = math.sqrt(H * W / n)
        h, w = round(H / f), round(W / f)
        if h * w == n:
            return h, w
        # odd sizes: UNet downsampling rounds up
        for hh in (math.ceil(H / f), math.floor(H / f)):
            if hh and n % hh == 0:
                return hh, n // hh
    r = int(math.isqrt(n))
    return (r, n // r) if r * (n // r) == n else (1, n)


# --------------------------------------------------------------------------------- diffusers
class DiffusersCrossAttentionCapture:
    """diffusers attention processor for ``attn2`` that records head-averaged probabilities.

    Computes the same output as ``AttnProcessor`` (explicit softmax), so a capture run samples
    the same image as an uncaptured one up to float rounding.
    """

    def __init__(self, store: AttentionStore, name: str, state: dict):
        self.store = store
        self.name = name
        self.state = state  # shared: {"latent_hw": (h, w), "cfg": bool, "step": int}

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        if encoder_hidden_states is None:
            raise RuntimeError("DiffusersCrossAttentionCapture is for cross-attention (attn2) only")
        residual = hidden_states
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        q = attn.to_q(hidden_states)
        ctx = encoder_hidden_states
        if attn.norm_cross:
            ctx = attn.norm_encoder_hidden_states(ctx)
        k = attn.to_k(ctx)
        v = attn.to_v(ctx)
        B, N, _ = q.shape
        heads = attn.heads
        d = k.shape[-1] // heads
        qh = q.reshape(B, N, heads, d).transpose(1, 2)
        kh = k.reshape(B, -1, heads, d).transpose(1, 2)
        vh = v.reshape(B, -1, heads, d).transpose(1, 2)
        scores = (qh.float() @ kh.float().transpose(-1, -2)) * attn.scale
        if attention_mask is not None:
            mask = attn.prepare_attention_mask(attention_mask, k.shape[1], B)
            scores = scores + mask.reshape(B, heads, 1, -1).float()
        probs = scores.softmax(-1)
        out = (probs.to(vh.dtype) @ vh).transpose(1, 2).reshape(B, N, heads * d)
        pm = probs.mean(1)
        hw = _hw_from(N, self.state.get("latent_hw"))
        if self.state.get("cfg") and B % 2 == 0:
            half = B // 2
            self.store.add("negative", pm[:half], hw, layer=self.name, step=self.state.get("step"))
            self.store.add("positive", pm[half:], hw, layer=self.name, step=self.state.get("step"))
        else:
            self.store.add("positive", pm, hw, layer=self.name, step=self.state.get("step"))
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


class DiffusersCapture:
    """Handle returned by :func:`install_diffusers_capture`; ``remove()`` restores the processors."""

    def __init__(self, unet, store, state, originals):
        self.unet = unet
        self.store = store
        self.state = state
        self._originals = originals
        self._pre = unet.register_forward_pre_hook(self._on_unet_call, with_kwargs=True)

    def _on_unet_call(self, module, args, kwargs):
        sample = args[0] if args else kwargs.get("sample")
        if sample is not None:
            self.state["latent_hw"] = tuple(sample.shape[-2:])
        self.state["step"] = self.state.get("step", -1) + 1
        return None

    def remove(self):
        self._pre.remove()
        self.unet.set_attn_processor(self._originals)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


def install_diffusers_capture(pipe_or_unet, store: AttentionStore | None = None, *, cfg: bool = True) -> DiffusersCapture:
    """Record cross-attention of every ``attn2`` of the UNet into ``store`` (a new one if None).

    ``cfg``: the pipeline batches [negative, positive] (diffusers does when guidance > 1).
    """
    unet = getattr(pipe_or_unet, "unet", pipe_or_unet)
    store = store or AttentionStore()
    state = {"cfg": cfg, "step": -1, "latent_hw": None}
    originals = dict(unet.attn_processors)
    new = {}
    for name, proc in originals.items():
        new[name] = DiffusersCrossAttentionCapture(store, name, state) if ".attn2." in name else proc
    unet.set_attn_processor(new)
    return DiffusersCapture(unet, store, state, originals)


# --------------------------------------------------------------------------------- ComfyUI
class ComfyAttn2Capture:
    """ComfyUI ``attn2`` replace patch: ``patch(q, k, v, extra_options) -> out`` (after to_q/k/v,
    before to_out), which records head-averaged attention probabilities into ``store``.

    Register it for every cross-attention block with :func:`comfy_capture_blocks` /
    ``model.set_model_attn2_replace(patch, block_name, number)``. Deep copies (ComfyUI deep-copies
    ``model_options`` when it clones a model) share this object, so the capture node and the
    heatmap node see the same store.
    """

    def __init__(self, store: AttentionStore):
        self.store = store
        self.runs = 0

    def __deepcopy__(self, memo):
        return self

    def to(self, *args, **kwargs):
        return self

    @staticmethod
    def _step(extra_options):
        sig = extra_options.get("sigmas")
        return None if sig is None else round(float(sig.flatten()[0]), 6)

    def on_sample_start(self, *args, **kwargs):
        self.store.reset()
        self.runs += 1

    def __call__(self, q, k, v, extra_options):
        heads = int(extra_options["n_heads"])
        B, N, HD = q.shape
        d = HD // heads
        qh = q.reshape(B, N, heads, d).transpose(1, 2)
        kh = k.reshape(k.shape[0], -1, heads, d).transpose(1, 2)
        vh = v.reshape(v.shape[0], -1, heads, d).transpose(1, 2)
        probs = ((qh.float() @ kh.float().transpose(-1, -2)) * d**-0.5).softmax(-1)
        out = (probs.to(vh.dtype) @ vh).transpose(1, 2).reshape(B, N, HD)
        pm = probs.mean(1)
        shape = extra_options.get("original_shape")
        hw = _hw_from(N, shape)
        cou = list(extra_options.get("cond_or_uncond") or [0])
        step = self._step(extra_options)
        layer = (extra_options.get("block"), extra_options.get("block_index"))
        if B % len(cou) == 0:
            per = B // len(cou)
            for j, c in enumerate(cou):
                self.store.add("negative" if c == 1 else "positive", pm[j * per : (j + 1) * per], hw, layer=layer, step=step)
        return out.to(q.dtype)


_BLOCK_RE = re.compile(
    r"^diffusion_model\.(input_blocks\.(\d+)|middle_block|output_blocks\.(\d+))\.\d+\.transformer_blocks\.\d+\.attn2\.to_k\.weight$"
)


def comfy_capture_blocks(state_dict_keys) -> list[tuple[str, int]]:
    """(block_name, number) of every ComfyUI UNet block holding cross-attention."""
    out = set()
    for k in state_dict_keys:
        m = _BLOCK_RE.match(k)
        if m:
            if m.group(2) is not None:
                out.add(("input", int(m.group(2))))
            elif m.group(3) is not None:
                out.add(("output", int(m.group(3))))
            else:
                out.add(("middle", 0))
    order = {"input": 0, "middle": 1, "output": 2}
    return sorted(out, key=lambda t: (order[t[0]], t[1]))


def install_comfy_capture(model_patcher, store: AttentionStore | None = None):
    """A clone of ``model_patcher`` whose cross-attention is recorded into ``store``.

    Returns ``(clone, capture)``; the store is reset each time sampling starts.
    """
    store = store or AttentionStore()
    cap = ComfyAttn2Capture(store)
    m = model_patcher.clone()
    blocks = comfy_capture_blocks(m.model.state_dict().keys())
    if not blocks:
        raise ValueError("this model has no cross-attention blocks to capture")
    for name, num in blocks:
        m.set_model_attn2_replace(cap, name, num)
    try:  # reset per sampling run (ComfyUI >= 0.3 has patcher callbacks)
        from comfy.patcher_extension import CallbacksMP

        m.add_callback(CallbacksMP.ON_PRE_RUN, lambda *a, **k: cap.on_sample_start())
    except Exception:  # pragma: no cover - older ComfyUI: accumulate until the heatmap node reads
        pass
    return m, cap


# --------------------------------------------------------------------------------- tokens
def word_token_indices(tokenizer, prompt: str, words: list[str]) -> dict[str, list[int]]:
    """Positions (BOS = 0) of each word's tokens inside ``prompt``'s tokenization.

    A word (or phrase) is matched as a contiguous run of its own token ids; every occurrence
    counts. Words not found map to an empty list.
    """
    ids = tokenizer(prompt, add_special_tokens=False).input_ids
    out = {}
    for w in words:
        wid = tokenizer(w.strip(), add_special_tokens=False).input_ids
        hits = []
        if wid:
            for s in range(len(ids) - len(wid) + 1):
                if ids[s : s + len(wid)] == wid:
                    hits += [1 + s + j for j in range(len(wid))]
        out[w] = hits
    return out


def prompt_tokens(tokenizer, prompt: str) -> list[dict]:
    """The prompt's tokens for display: [{"index", "id", "text", "word_end"}], BOS/EOS excluded."""
    ids = tokenizer(prompt, add_special_tokens=False).input_ids
    toks = tokenizer.convert_ids_to_tokens(ids)
    out = []
    for i, (tid, t) in enumerate(zip(ids, toks)):
        text = t.replace("</w>", "")
        out.append({"index": i + 1, "id": int(tid), "text": text, "word_end": t.endswith("</w>")})
    return out
