"""Image generation and before/after grids (fixed seeds, so the two sides are comparable)."""
from __future__ import annotations

import torch
from PIL import Image, ImageDraw


def sampler_kwargs(pipe, n: int, guidance_scale: float) -> dict:
    """Keyword arguments that make ``guidance_scale`` and the prompt length take effect on any
    supported pipeline. A FLUX transformer without a guidance embedding (schnell, the FLUX testbed)
    ignores ``guidance_scale``: it gets true classifier-free guidance against "" instead. FLUX/SD3
    pad T5 to the length the edit's keys used (adapters.mmdit_model.t5_length)."""
    name = type(pipe).__name__
    if not name.startswith(("Flux", "StableDiffusion3")):
        return {"guidance_scale": guidance_scale}
    from .mmdit_model import t5_length

    family = "flux" if name.startswith("Flux") else "sd3"
    out = {"max_sequence_length": t5_length(pipe, family), "guidance_scale": guidance_scale}
    if family == "flux" and not pipe.transformer.config.guidance_embeds and guidance_scale > 1:
        out.update(true_cfg_scale=guidance_scale, negative_prompt=[""] * n)
    return out


def generate(pipe, prompts: list[str], *, seed: int = 0, steps: int = 20, size: int | None = None,
             guidance_scale: float = 7.5, batch_size: int = 8, progress: bool = False) -> list[Image.Image]:
    """One image per prompt; prompt i always uses seed ``seed + i``."""
    if size is None:  # the pipeline's default resolution (an MMDiT pipeline has no UNet)
        unet = getattr(pipe, "unet", None)
        size = (unet.config.sample_size if unet is not None else pipe.default_sample_size) * pipe.vae_scale_factor
    pipe.set_progress_bar_config(disable=not progress)
    images = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        gens = [torch.Generator("cpu").manual_seed(seed + start + i) for i in range(len(chunk))]
        out = pipe(chunk, num_inference_steps=steps, generator=gens, height=size, width=size, output_type="pil",
                   **sampler_kwargs(pipe, len(chunk), guidance_scale))
        images += out.images
    return images


def image_grid(rows: list[list[Image.Image]], row_labels: list[str], col_labels: list[str], *, cell: int = 128) -> Image.Image:
    """Rows of images with text labels on the left and on top."""
    pad_left, pad_top = 150, 20
    W = pad_left + cell * max(len(r) for r in rows)
    H = pad_top + cell * len(rows)
    grid = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(grid)
    for j, label in enumerate(col_labels):
        draw.text((pad_left + j * cell + 4, 4), label[:22], fill="black")
    for i, row in enumerate(rows):
        draw.text((4, pad_top + i * cell + cell // 2 - 6), row_labels[i][:24], fill="black")
        for j, img in enumerate(row):
            grid.paste(img.convert("RGB").resize((cell, cell), Image.NEAREST), (pad_left + j * cell, pad_top + i * cell))
    return grid
