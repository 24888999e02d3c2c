"""UCE debiasing: find attribute coefficients alpha by generating, classifying and updating.

Every iteration solves the edit from the original weights, applies it, generates, then removes
it (in ``finally``), so nothing leaks from one iteration into the next.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from tqdm.auto import tqdm

from ..adapters.generate import generate
from ..core.apply import apply_delta
from ..core.plan import EditPlan
from .uce import uce_delta

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
    steps_ = {e.source: step_size for e in targets}
    last_sign: dict[str, float] = {}
    history: list[dict] = []
    # per concept: (gap, alphas, ratios) of its best iteration. Generation is mode-seeking, so a
    # concept's ratio can jump from all-one-attribute to all-the-other between two alphas: its step
    # halves whenever the error changes sign (a bisection towards the crossing), and each concept
    # keeps its own best alphas rather than those of the iteration with the best worst-case gap.
    best: dict[str, tuple[float, list[float], list[float]]] = {}
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
        gaps = {e.source: max(abs(r - d) for r, d in zip(ratios[e.source], e.ratios)) for e in targets}
        history.append({"iteration": it, "alphas": {k: list(v) for k, v in alphas.items()}, "ratios": ratios,
                        "gap": max(gaps.values()), "steps": dict(steps_)})
        for e in targets:
            if e.source not in best or gaps[e.source] < best[e.source][0]:
                best[e.source] = (gaps[e.source], list(alphas[e.source]), ratios[e.source])
        if max(gaps.values()) <= tol:
            break
        for e in targets:
            err0 = e.ratios[0] - ratios[e.source][0]
            sign = (err0 > 0) - (err0 < 0)
            if sign and last_sign.get(e.source, sign) != sign:
                steps_[e.source] /= 2
            if sign:
                last_sign[e.source] = sign
            a = alphas[e.source]
            for i, (r, d) in enumerate(zip(ratios[e.source], e.ratios)):
                a[i] += steps_[e.source] * (d - r)
    gap = max(b[0] for b in best.values())
    best_alphas = {k: b[1] for k, b in best.items()}
    best_ratios = {k: b[2] for k, b in best.items()}
    return DebiasResult(best_alphas, best_ratios, gap <= tol, history)
