"""The testbed evaluator: a small CNN trained on rendered images, with one head per factor.

Heads: shape, colour, pattern (together they name the object), style (0 = none, 1..30 the
artists) and attribute (crowned or not). ``python -m concept_edit.testbed.classifier`` trains
it and writes ``testbed/assets/classifier.safetensors``.
"""
from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .data import Labels, render_sample
from .world import COLOURS, PATTERNS, SHAPES, World, build_world

HEADS = {"shape": len(SHAPES), "colour": len(COLOURS), "pattern": len(PATTERNS), "style": 31, "attribute": 2}


class Classifier(nn.Module):
    def __init__(self, width: int = 32):
        super().__init__()
        w = width

        def block(i, o):
            return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(inplace=True))

        self.body = nn.Sequential(
            block(3, w), block(w, w), nn.MaxPool2d(2),  # 16
            block(w, 2 * w), block(2 * w, 2 * w), nn.MaxPool2d(2),  # 8
            block(2 * w, 4 * w), nn.MaxPool2d(2),  # 4
            nn.Flatten(), nn.Linear(4 * w * 16, 256), nn.ReLU(inplace=True),
        )
        self.heads = nn.ModuleDict({k: nn.Linear(256, n) for k, n in HEADS.items()})

    def forward(self, x):
        h = self.body(x)
        return {k: m(h) for k, m in self.heads.items()}


def to_input(images) -> torch.Tensor:
    """uint8 (N,32,32,3) array, float (N,32,32,3) in [0,1], list of PIL images -> (N,3,32,32) in [-1,1]."""
    if isinstance(images, (list, tuple)):
        images = np.stack([np.asarray(im.convert("RGB") if hasattr(im, "convert") else im) for im in images])
    if isinstance(images, torch.Tensor):
        images = images.cpu().numpy()
    a = np.asarray(images)
    if a.dtype != np.uint8:
        a = np.clip(np.round(a * 255.0), 0, 255).astype(np.uint8)
    return torch.from_numpy(a).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def _labels_batch(rng: random.Random, world: World, n: int) -> list[Labels]:
    out = []
    for _ in range(n):
        kind = 1 if rng.random() < 0.05 else 0
        j = rng.randrange(len(world.professions) if kind else len(world.objects))
        out.append(Labels(kind, j, rng.randrange(len(world.styles)), int(rng.random() < 0.5)))
    return out


def _targets(world, labs):
    t = {k: [] for k in HEADS}
    for l in labs:
        s, c, p = l.concept(world).visual
        t["shape"].append(s); t["colour"].append(c); t["pattern"].append(p)
        t["style"].append(l.style); t["attribute"].append(l.attribute)
    return {k: torch.tensor(v) for k, v in t.items()}


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    n = x.shape[0]
    blur = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    a = torch.rand(n, 1, 1, 1, generator=g) * 0.6
    x = x * (1 - a) + blur * a
    x = x + torch.randn(x.shape, generator=g) * torch.rand(n, 1, 1, 1, generator=g) * 0.12
    return x.clamp(-1, 1)


def render_batch(world, labs, np_rng):
    return np.stack([render_sample(world, l, np_rng) for l in labs])


def train(out: Path, minutes: float = 10.0, batch: int = 64, seed: int = 0, n_objects: int = 1000):
    world = build_world(n_objects)
    torch.manual_seed(seed)
    rng = random.Random(seed)
    np_rng = np.random.default_rng(seed)
    g = torch.Generator().manual_seed(seed)
    model = Classifier()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    t0 = time.time()
    step = 0
    model.train()
    while time.time() - t0 < minutes * 60:
        frac = (time.time() - t0) / (minutes * 60)
        for gr in opt.param_groups:
            gr["lr"] = 2e-3 * 0.5 * (1 + np.cos(np.pi * min(frac, 1.0)))
        labs = _labels_batch(rng, world, batch)
        x = augment(to_input(render_batch(world, labs, np_rng)), g)
        tg = _targets(world, labs)
        out_ = model(x)
        loss = sum(F.cross_entropy(out_[k], tg[k]) for k in HEADS)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % 100 == 0:
            print(f"[{time.strftime('%H:%M:%S')}] classifier step {step} loss {loss.item():.4f}", flush=True)
    model.eval()
    out.parent.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out))
    acc = heldout_accuracy(model, world, n=4000, seed=seed + 999)
    meta = {"steps": step, "minutes": (time.time() - t0) / 60, "batch": batch, "heldout_accuracy": acc}
    out.with_suffix(".json").write_text(json.dumps(meta, indent=1))
    print(json.dumps(meta), flush=True)
    return model, acc


@torch.no_grad()
def predict(model: Classifier, images, world: World | None = None, batch: int = 512) -> dict[str, np.ndarray]:
    """Per-image predictions: shape, colour, pattern, style, attribute and ``object`` (object id,
    -1 for an unknown combination, -2-j for profession j)."""
    world = world or build_world()
    x = to_input(images)
    outs = {k: [] for k in HEADS}
    for i in range(0, len(x), batch):
        o = model(x[i : i + batch])
        for k in HEADS:
            outs[k].append(o[k].argmax(-1))
    res = {k: torch.cat(v).numpy() for k, v in outs.items()}
    res["object"] = np.array(
        [world.object_of_visual(int(s), int(c), int(p)) for s, c, p in zip(res["shape"], res["colour"], res["pattern"])]
    )
    return res


def heldout_accuracy(model, world, n: int = 4000, seed: int = 12345) -> dict[str, float]:
    """Accuracy on freshly rendered images (a seed never used in training)."""
    rng = random.Random(seed)
    np_rng = np.random.default_rng(seed)
    labs = _labels_batch(rng, world, n)
    imgs = render_batch(world, labs, np_rng)
    pred = predict(model, imgs, world)
    tg = _targets(world, labs)
    acc = {k: float((pred[k] == tg[k].numpy()).mean()) for k in HEADS}
    true_obj = np.array([l.index if l.kind == 0 else -2 - l.index for l in labs])
    acc["object"] = float((pred["object"] == true_obj).mean())
    return acc


def load_classifier(path: str | Path | None = None) -> Classifier:
    from safetensors.torch import load_file

    path = Path(path) if path else Path(__file__).parent / "assets" / "classifier.safetensors"
    m = Classifier()
    m.load_state_dict(load_file(str(path)))
    m.eval()
    return m


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "assets" / "classifier.safetensors")
    ap.add_argument("--minutes", type=float, default=8.0)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    train(a.out, a.minutes, batch=a.batch)


if __name__ == "__main__":
    main()
