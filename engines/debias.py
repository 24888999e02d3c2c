"""UCE debiasing: find attribute coefficients alpha by generating, classifying and updating.

Every evaluation solves the edit from the original weights, applies it, generates, then removes
it (in ``finally``), so nothing leaks from one evaluation into the next. The result is always one
evaluated set of alphas with the ratios measured for exactly that set: the edits are solved
jointly, so one concept's alphas change the others' images and ratios measured in different
evaluations cannot be combined.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from ..adapters.generate import generate
from ..core.apply import apply_delta
from ..core.plan import EditPlan
from ..core.progress import tqdm
from .uce import uce_delta

# classify(images, attributes) -> index into attributes for each image
Classifier = Callable[[list, list[str]], list[int]]


@dataclass
class DebiasResult:
    """``alphas`` and ``ratios`` are ``history[evaluation]``: alphas generated together and the
    attribute ratios measured for them; ``converged`` when every concept's ratios are within tol."""

    alphas: dict[str, list[float]]
    ratios: dict[str, list[float]]
    converged: bool
    history: list[dict] = field(default_factory=list)
    evaluation: int = 0


def observed_ratios(labels: list[int], k: int) -> list[float]:
    return [labels.count(i) / max(len(labels), 1) for i in range(k)]


def fit_debias(pipe, model, plan: EditPlan, classify: Classifier, *, n_images: int = 16, steps: int = 20,
               tol: float = 0.05, max_iters: int = 10, step_size: float = 1.0, seed: int = 0,
               prompt_template: str = "{}", progress: bool = True) -> DebiasResult:
    """Fit alphas for every debias edit of ``plan`` jointly (other edits are solved alongside).

    Runs up to ``max_iters`` update iterations; if none converged and the per-concept best alphas
    come from different iterations, that combination is evaluated once more (``combined`` in its
    history entry). The evaluation with the smallest worst-case gap (then mean gap) is returned.
    Each history entry: iteration, alphas, ratios, gaps (per concept), gap (max), mean_gap,
    steps (per-concept step sizes), combined.
    """
    targets = [e for e in plan.edits if e.kind == "debias"]
    if not targets:
        raise ValueError("plan has no debias edits")
    if max_iters < 1 or n_images < 1:
        raise ValueError(f"fit_debias needs max_iters >= 1 and n_images >= 1, got {max_iters} and {n_images}")
    alphas = {e.source: list(e.alphas or [0.0] * len(e.attributes)) for e in targets}
    steps_ = {e.source: step_size for e in targets}
    last_sign: dict[str, float] = {}
    history: list[dict] = []

    def evaluate(alphas: dict[str, list[float]], combined: bool) -> dict:
        delta = uce_delta(model, plan, alphas=alphas, progress=False)
        handle = apply_delta(delta, model.weights(delta.layers))
        try:
            ratios = {}
            for e in targets:
                imgs = generate(pipe, [prompt_template.format(e.source)] * n_images, seed=seed, steps=steps)
                labels = [int(x) for x in classify(imgs, e.attributes)]
                if len(labels) != n_images or not all(0 <= x < len(e.attributes) for x in labels):
                    raise ValueError(f"the classifier must return one index into {e.attributes} per image "
                                     f"({n_images}), got {labels}")
                ratios[e.source] = observed_ratios(labels, len(e.attributes))
        finally:
            handle.remove()
        gaps = {e.source: max(abs(r - d) for r, d in zip(ratios[e.source], e.ratios)) for e in targets}
        entry = {"iteration": len(history), "alphas": {k: list(v) for k, v in alphas.items()}, "ratios": ratios,
                 "gaps": gaps, "gap": max(gaps.values()), "mean_gap": sum(gaps.values()) / len(gaps),
                 "steps": dict(steps_), "combined": combined}
        history.append(entry)
        return entry

    # Generation is mode-seeking, so a concept's ratio can jump from all-one-attribute to
    # all-the-other between two alphas: its step halves whenever the error changes sign (a
    # bisection towards the crossing).
    for _ in tqdm(range(max_iters), desc="debias", disable=not progress):
        ratios = evaluate(alphas, combined=False)["ratios"]
        if history[-1]["gap"] <= tol:
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
    if history[-1]["gap"] > tol:
        # Concepts often reach their best in different iterations: try those alphas together.
        combo = {s: list(min(history, key=lambda h: h["gaps"][s])["alphas"][s]) for s in alphas}
        if all(h["alphas"] != combo for h in history):
            evaluate(combo, combined=True)
    chosen = min(range(len(history)), key=lambda i: (history[i]["gap"], history[i]["mean_gap"]))
    best = history[chosen]
    return DebiasResult(best["alphas"], best["ratios"], best["gap"] <= tol, history, chosen)
