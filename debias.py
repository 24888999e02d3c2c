"""UCE debiasing: find attribute coefficients alpha by generating, classifying and updating.

Every iteration solves the edit from the original weights, applies it, generates, then removes
it (in ``finally``), so nothing leaks from one iteration into the next.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from tqdm.auto import tqdm

from .apply import apply_delta
from .edits import EditPlan
from .generate import generate
from .uce_edit import uce_delta

# classify(images, attributes) -> index into attributes for each image
Classifier = Callable[[list, list[str]], list[int]]


@dataclass
class DebiasResult:
    alphas: dict[str, list[float]]
    ratios: dict[str, list[float]]
    converged: bool
    history: list[dict] = field(default_factory=list)


def observed_ratios(labels: list[int], k: int) -> list[float]:
    return [labels.count(i) / max(len(labels), 1) for i in range(k)]


def fit_debias(pipe, model, plan: EditPlan, classify: Classifier, *, n_images: int = 16, steps: int = 20,
               tol: float = 0.05, max_iters: int = 10, step_size: float = 1.0, seed: int = 0,
               prompt_template: str = "{}", progress: bool = True) -> DebiasResult:
    """Fit alphas for every debias edit of ``plan`` jointly (other edits are solved alongside)."""
    targets = [e for e in plan.edits if e.kind == "debias"]
    if not targets:
        raise ValueError("plan has no debias edits")
    alphas = {e.source: list(e.alphas or [0.0] * len(e.attributes)) for e in targets}
    history: list[dict] = []
    best = None
    for it in tqdm(range(max_iters), desc="debias", disable=not progress):
        delta = uce_delta(model, plan, alphas=alphas, progress=False)
        handle = apply_delta(delta, model.weights(delta.layers))
        try:
            ratios = {}
            for e in targets:
                imgs = generate(pipe, [prompt_template.format(e.source)] * n_images, seed=seed, steps=steps)
                ratios[e.source] = observed_ratios(list(classify(imgs, e.attributes)), len(e.attributes))
        finally:
            handle.remove()
        gap = max(abs(r - d) for e in targets for r, d in zip(ratios[e.source], e.ratios))
        history.append({"iteration": it, "alphas": {k: list(v) for k, v in alphas.items()}, "ratios": ratios, "gap": gap})
        if best is None or gap < best[0]:
            best = (gap, {k: list(v) for k, v in alphas.items()}, ratios)
        if gap <= tol:
            break
        for e in targets:
            a = alphas[e.source]
            for i, (r, d) in enumerate(zip(ratios[e.source], e.ratios)):
                a[i] += step_size * (d - r)
    gap, best_alphas, best_ratios = best
    return DebiasResult(best_alphas, best_ratios, gap <= tol, history)
