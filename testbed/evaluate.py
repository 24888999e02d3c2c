"""Generate with the testbed pipeline and score with the classifier.

``python -m concept_edit.testbed.evaluate`` measures the unedited model's generation accuracy on
training templates and on held-out paraphrase templates (plus styles, aliases, professions).
"""
from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np
import torch

from .classifier import HEADS, Classifier
from .grammar import (
    HOLDOUT_STYLE_TEMPLATES,
    HOLDOUT_TEMPLATES,
    TRAIN_STYLE_TEMPLATES,
    TRAIN_TEMPLATES,
    fill,
)
from .world import World, build_world

STEPS = 10
GUIDANCE = 4.0
FLUX_STEPS = 10  # Euler steps of the FLUX testbed (flow matching, true classifier-free guidance)


def is_flux(pipe) -> bool:
    return type(pipe).__name__.startswith("Flux")


def pipe_kwargs(pipe, n: int, steps: int | None, guidance: float) -> dict:
    """The sampler call for either testbed (the FLUX model: true CFG against "", T5 at 32 tokens;
    adapters.generate.sampler_kwargs)."""
    from ..adapters.generate import sampler_kwargs

    if is_flux(pipe):
        return dict(num_inference_steps=steps or FLUX_STEPS, height=32, width=32, **sampler_kwargs(pipe, n, guidance))
    return dict(num_inference_steps=steps or STEPS, guidance_scale=guidance)


@torch.no_grad()
def generate(pipe, prompts: list[str], seeds: list[int] | int = 0, *, steps: int | None = None,
             guidance: float = GUIDANCE, batch: int = 64) -> np.ndarray:
    """uint8 images (N,32,32,3); image i uses ``torch.Generator().manual_seed(seeds[i])``."""
    if isinstance(seeds, int):
        seeds = [seeds + i for i in range(len(prompts))]
    out = []
    for i in range(0, len(prompts), batch):
        ps = prompts[i : i + batch]
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds[i : i + batch]]
        im = pipe(ps, generator=gens, output_type="np", **pipe_kwargs(pipe, len(ps), steps, guidance)).images
        out.append(np.clip(np.round(im * 255), 0, 255).astype(np.uint8))
    return np.concatenate(out) if out else np.zeros((0, 32, 32, 3), np.uint8)


@torch.no_grad()
def head_probs(model: Classifier, images, batch: int = 512) -> dict[str, np.ndarray]:
    from .classifier import to_input

    x = to_input(images)
    outs = {k: [] for k in HEADS}
    for i in range(0, len(x), batch):
        o = model(x[i : i + batch])
        for k in HEADS:
            outs[k].append(torch.softmax(o[k], -1))
    return {k: torch.cat(v).numpy() for k, v in outs.items()}


def concept_prob(probs: dict[str, np.ndarray], concept) -> np.ndarray:
    """Classifier probability that each image shows ``concept`` (product of its factor heads)."""
    s, c, p = concept.visual
    return probs["shape"][:, s] * probs["colour"][:, c] * probs["pattern"][:, p]


def concept_hit(probs: dict[str, np.ndarray], concept) -> np.ndarray:
    """Top-1: all three factor heads pick the concept's factors."""
    s, c, p = concept.visual
    return (probs["shape"].argmax(1) == s) & (probs["colour"].argmax(1) == c) & (probs["pattern"].argmax(1) == p)


def object_prompts(world: World, concepts, templates, per_concept: int, rng: random.Random, styled_templates=None,
                   use_alias: bool = False):
    prompts, owners = [], []
    for c in concepts:
        name = c.alias if use_alias else c.name
        for k in range(per_concept):
            if styled_templates and k % 2 == 1:
                st = rng.choice(world.artists).name
                prompts.append(fill(rng.choice(styled_templates), name, st))
            else:
                prompts.append(fill(templates[(k + c.index) % len(templates)], name))
            owners.append(c)
    return prompts, owners


def generation_accuracy(pipe, model, world: World, concepts, templates, per_concept: int = 2, seed: int = 0,
                        styled_templates=None, use_alias: bool = False) -> dict:
    rng = random.Random(seed)
    prompts, owners = object_prompts(world, concepts, templates, per_concept, rng, styled_templates, use_alias)
    imgs = generate(pipe, prompts, seed)
    pr = head_probs(model, imgs)
    hits = np.array([concept_hit({k: v[i : i + 1] for k, v in pr.items()}, c)[0] for i, c in enumerate(owners)])
    probs = np.array([concept_prob({k: v[i : i + 1] for k, v in pr.items()}, c)[0] for i, c in enumerate(owners)])
    per = {}
    for h, c in zip(hits, owners):
        per.setdefault(c.name, []).append(bool(h))
    return {"top1": float(hits.mean()), "prob": float(probs.mean()), "n": len(prompts),
            "per_concept": {k: float(np.mean(v)) for k, v in per.items()},
            "shape": float(np.mean([pr["shape"][i].argmax() == c.shape for i, c in enumerate(owners)])),
            "colour": float(np.mean([pr["colour"][i].argmax() == c.colour for i, c in enumerate(owners)])),
            "pattern": float(np.mean([pr["pattern"][i].argmax() == c.pattern for i, c in enumerate(owners)]))}


def style_accuracy(pipe, model, world: World, n: int = 120, seed: int = 0, templates=TRAIN_STYLE_TEMPLATES) -> float:
    rng = random.Random(seed)
    prompts, want = [], []
    for i in range(n):
        st = world.artists[i % len(world.artists)]
        o = rng.choice(world.objects)
        prompts.append(fill(rng.choice(templates), o.name, st.name))
        want.append(st.index)
    pr = head_probs(model, generate(pipe, prompts, seed))
    return float((pr["style"].argmax(1) == np.array(want)).mean())


def profession_attribute_rates(pipe, model, world: World, per: int = 40, seed: int = 0, templates=TRAIN_TEMPLATES):
    out = {}
    for j, c in enumerate(world.professions):
        prompts = [fill(templates[k % len(templates)], c.name) for k in range(per)]
        pr = head_probs(model, generate(pipe, prompts, seed + 1000 * j))
        out[c.name] = float(pr["attribute"].argmax(1).mean())
    return out


def main(argv=None):
    from . import load_any_testbed_pipeline, load_classifier
    from .data import HEAD

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--arch", choices=("unet", "flux"), default="unet", help="which testbed model")
    ap.add_argument("--steps", type=int, default=None, help="sampler steps (default: the testbed's)")
    ap.add_argument("--classifier", type=Path, default=None)
    ap.add_argument("--n-head", type=int, default=50, help="objects sampled among the first HEAD (100)")
    ap.add_argument("--n-tail", type=int, default=20, help="objects sampled among the rest")
    ap.add_argument("--per-profession", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    t0 = time.time()
    pipe = load_any_testbed_pipeline(a.arch, a.model)
    if a.steps:
        global STEPS, FLUX_STEPS
        STEPS = FLUX_STEPS = a.steps
    clf = load_classifier(a.classifier)
    world = build_world(1000)
    rng = random.Random(7)
    head = rng.sample(world.objects[:HEAD], a.n_head)
    tail = rng.sample(world.objects[HEAD:], a.n_tail) if a.n_tail else []
    res = {}
    for tag, cs in (("head", head), ("tail", tail)):
        if not cs:
            continue
        res[f"{tag}_train_templates"] = generation_accuracy(pipe, clf, world, cs, TRAIN_TEMPLATES, 1, seed=1)
        res[f"{tag}_holdout_templates"] = generation_accuracy(pipe, clf, world, cs, HOLDOUT_TEMPLATES, 1, seed=2)
        print(tag, json.dumps({k: v for k, v in res.items() if k.startswith(tag)}), flush=True)
    res["style_train_templates"] = style_accuracy(pipe, clf, world, n=30, seed=3)
    res["style_holdout_templates"] = style_accuracy(pipe, clf, world, n=30, seed=3, templates=HOLDOUT_STYLE_TEMPLATES)
    res["common_alias"] = generation_accuracy(pipe, clf, world, world.common_aliased, TRAIN_TEMPLATES, 1, seed=4, use_alias=True)
    res["rare_alias"] = generation_accuracy(pipe, clf, world, world.rare_aliased, TRAIN_TEMPLATES, 1, seed=5, use_alias=True)
    res["profession_crowned_rate"] = profession_attribute_rates(pipe, clf, world, per=a.per_profession, seed=6)
    res["seconds"] = time.time() - t0
    print(json.dumps(res, indent=1))
    if a.out:
        a.out.write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
