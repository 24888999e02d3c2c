"""One entry point for every editing method: plan.method -> the engine that computes its delta."""
from __future__ import annotations

import importlib
import re
import warnings

from ..core.delta import ConceptDelta
from ..core.plan import EditPlan, PlanError

# method name -> (module, function); each function is f(model, plan, **kw) -> ConceptDelta
ENGINES = {
    "uce": ("uce", "uce_delta"),
    "emcid": ("emcid", "emcid_delta"),
    "nullspace": ("nullspace", "nullspace_delta"),
    "emcid+uce": ("emcid", "emcid_uce_delta"),
    "rece": ("rece", "rece_delta"),
    "speed": ("speed", "speed_delta"),
}


# what runs on the MMDiT families (FLUX, SD3): UCE on the text readers, EMCID and null-space on the
# text encoders (targets: dest_hidden); emcid+uce, RECE and SPEED are built for UNet cross-attention
MMDIT_METHODS = ("uce", "emcid", "nullspace")


def engine(method: str):
    if method not in ENGINES:
        raise PlanError(f"unknown method {method!r}; available: {', '.join(ENGINES)}")
    mod, fn = ENGINES[method]
    try:
        module = importlib.import_module(f".{mod}", __package__)
    except ModuleNotFoundError as e:
        raise PlanError(f"method {method!r} is not available in this installation ({e})") from e
    return getattr(module, fn)


def unknown_words(model, concepts) -> list[str]:
    """Words this model's tokenizer does not know as words: split (almost) into single letters."""
    out = []
    for c in concepts:
        for w in re.findall(r"[A-Za-z]{2,}", c):
            pieces = [p.replace("</w>", "") for p in model.tokenizer.tokenize(w)]
            if len(pieces) >= 2 and sum(len(p) == 1 for p in pieces) >= len(pieces) - 1 and w not in out:
                out.append(w)
    return out


def compute_delta(model, plan: EditPlan, **kw) -> ConceptDelta:
    """The delta of ``plan`` on ``model`` by ``plan.method``; warns about concept words the
    model's tokenizer spells letter by letter (the edit then targets letter tokens)."""
    if hasattr(model, "key_spaces") and plan.method not in MMDIT_METHODS:  # MMDiT families (FLUX, SD3)
        raise PlanError(f"method {plan.method!r} does not support {model.family} models yet; use uce "
                        "(it edits their context and pooled-text embedders), or emcid / nullspace (their text "
                        "encoders: CLIP mlp.fc2, T5 DenseReluDense.wo)")
    unknown = unknown_words(model, [e.source for e in plan.edits])
    if unknown:
        warnings.warn(f"this model's tokenizer does not know these words and spells them letter by letter: "
                      f"{', '.join(unknown)}; check the spelling", stacklevel=2)
    delta = engine(plan.method)(model, plan, **kw)
    if unknown:
        delta.metadata["unknown_words"] = unknown
    return delta
