"""Attention capture (diffusers processor, ComfyUI attn2 patch logic) and heatmap rendering."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from concept_edit.hooks.attention_maps import (
    AttentionStore,
    ComfyAttn2Capture,
    comfy_capture_blocks,
    head_mean_probs,
    install_diffusers_capture,
    prompt_tokens,
    word_token_indices,
)
from concept_edit.hooks.heatmap import colormap, heatmap_images, to_pil


def test_store_sums_layers_and_resizes_to_first_grid():
    s = AttentionStore()
    p8 = torch.softmax(torch.randn(1, 64, 5), -1)
    p4 = torch.softmax(torch.randn(1, 16, 5), -1)
    s.add("positive", p8, (8, 8), layer="a", step=1)
    s.add("positive", p4, (4, 4), layer="b", step=1)
    s.add("negative", p8, (8, 8), layer="a", step=1)
    raw = s.raw("positive")
    assert raw.shape == (1, 5, 8, 8) and s.grid == (8, 8)
    assert len(s.layers) == 2 and len(s.steps) == 1
    # probabilities over tokens sum to one per pixel; the mean over layers keeps that (bilinear too)
    assert torch.allclose(raw.sum(1), torch.ones(1, 8, 8), atol=1e-5)
    assert not torch.allclose(s.raw("negative"), raw)
    m = s.maps("positive", [1, [2, 3]], (32, 24))
    assert m.shape == (1, 2, 32, 24)
    assert float(m.min()) == pytest.approx(0.0, abs=1e-6) and float(m.max()) == pytest.approx(1.0, abs=1e-6)
    s.reset()
    assert not s.has("positive")
    with pytest.raises(KeyError):
        s.raw("positive")


def _ref_attention(q, k, v, heads):
    b, n, hd = q.shape
    d = hd // heads
    qh, kh, vh = (x.reshape(b, -1, heads, d).transpose(1, 2) for x in (q, k, v))
    out = torch.nn.functional.scaled_dot_product_attention(qh, kh, vh)
    return out.transpose(1, 2).reshape(b, n, hd)


def test_comfy_attn2_patch_output_and_branches():
    torch.manual_seed(0)
    store = AttentionStore()
    cap = ComfyAttn2Capture(store)
    heads, d = 2, 4
    # batch of 4: [negative x2, positive x2] as ComfyUI's cond_or_uncond = [1, 0] says
    q = torch.randn(4, 16, heads * d)
    k = torch.randn(4, 7, heads * d)
    v = torch.randn(4, 7, heads * d)
    opts = {"n_heads": heads, "cond_or_uncond": [1, 0], "original_shape": [4, 4, 4, 4],
            "sigmas": torch.tensor([3.0]), "block": ("input", 1), "block_index": 0}
    out = cap(q, k, v, opts)
    assert torch.allclose(out, _ref_attention(q, k, v, heads), atol=1e-5)
    probs = head_mean_probs(q, k, heads)
    assert torch.allclose(store.raw("negative").flatten(2).transpose(1, 2), probs[:2], atol=1e-6)
    assert torch.allclose(store.raw("positive").flatten(2).transpose(1, 2), probs[2:], atol=1e-6)
    assert store.steps == {3.0}
    # ComfyUI deep-copies model_options when cloning: the copy must feed the same store
    import copy

    assert copy.deepcopy({"p": cap})["p"] is cap
    cap.on_sample_start()
    assert not store.has("positive") and cap.runs == 1


def test_comfy_capture_blocks_sd15_layout():
    keys = [f"diffusion_model.input_blocks.{i}.1.transformer_blocks.0.attn2.to_k.weight" for i in (1, 2, 4, 5, 7, 8)]
    keys += ["diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight"]
    keys += [f"diffusion_model.output_blocks.{i}.1.transformer_blocks.0.attn2.to_k.weight" for i in range(3, 12)]
    keys += ["diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_k.weight"]
    blocks = comfy_capture_blocks(keys)
    assert len(blocks) == 16 and blocks[0] == ("input", 1) and ("middle", 0) in blocks and blocks[-1] == ("output", 11)


def test_word_token_indices(tiny):
    pipe, _ = tiny("sd1")
    tok = pipe.tokenizer
    idx = word_token_indices(tok, "a painting by van gogh of a cat", ["Van Gogh", "cat", "dog"])
    assert idx["Van Gogh"] == [4, 5] and idx["cat"] == [8] and idx["dog"] == []
    toks = prompt_tokens(tok, "a cat")
    assert [t["text"] for t in toks] == ["a", "cat"] and toks[0]["index"] == 1


def test_diffusers_capture_matches_uncaptured_run(tiny):
    pipe, _ = tiny("sd1")
    kw = dict(prompt="a painting of a cat", negative_prompt="blurry", num_inference_steps=2, guidance_scale=5.0,
              height=32, width=32, output_type="np")
    before = dict(pipe.unet.attn_processors)
    ref = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    with install_diffusers_capture(pipe) as cap:
        got = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    assert np.abs(got - ref).max() < 1e-4
    n_attn2 = sum(".attn2." in k for k in before)
    assert len(cap.store.layers) == n_attn2 and len(cap.store.steps) == 2
    assert cap.store.has("positive") and cap.store.has("negative")
    maps = cap.store.maps("positive", [[4], [5]], (32, 32))
    assert maps.shape == (1, 2, 32, 32)
    assert {k: type(v) for k, v in pipe.unet.attn_processors.items()} == {k: type(v) for k, v in before.items()}


def test_heatmap_rendering():
    c = colormap(np.array([0.0, 0.5, 1.0]))
    assert c.shape == (3, 3) and (c >= 0).all() and (c <= 1).all()
    assert c[0].sum() < 0.1 and c[2].sum() > 2.5  # dark to bright
    maps = np.random.rand(2, 3, 8, 8).astype(np.float32)
    rgb = heatmap_images(maps)
    assert rgb.shape == (6, 8, 8, 3)
    over = heatmap_images(maps, np.zeros((2, 8, 8, 3), np.float32), alpha=0.5)
    assert np.allclose(over, 0.5 * rgb)
    assert to_pil(rgb[0]).size == (8, 8)


def test_heatmap_of_a_word_not_in_the_prompt_is_an_error(tiny):
    """A word missing from the prompt would render as a dark (unattended-looking) map: refuse it."""
    from concept_edit.nodes.attention_nodes import render_heatmaps

    tok = tiny("sd1")[0].tokenizer
    s = AttentionStore()
    s.add("positive", torch.softmax(torch.randn(1, 16, 77), -1), (4, 4), layer="a", step=1)
    with pytest.raises(ValueError, match="not in the prompt: 'dog'.*a painting of a cat"):
        render_heatmaps(s, tok, "a painting of a cat", ["cat", "dog"], None, "positive", False, 0.5, size=(32, 32))
