"""One entry point for every editing method: plan.method -> the engine that computes its delta."""
from __future__ import annotations

import importlib

from ..core.delta import ConceptDelta
from ..core.plan import EditPlan, PlanError

# method name -> (module, function); each function is f(model, plan, **kw) -> ConceptDelta
ENGINES = {
    "uce": ("uce", "uce_delta"),
    "emcid": ("emcid", "emcid_delta"),
    "nullspace": ("nullspace", "nullspace_delta"),
    "emcid+uce": ("emcid", "emcid_uce_delta"),
}


def engine(method: str):
    if method not in ENGINES:
        raise PlanError(f"unknown method {method!r}; available: {', '.join(ENGINES)}")
    mod, fn = ENGINES[method]
    try:
        module = importlib.import_module(f".{mod}", __package__)
    except ModuleNotFoundError as e:
        raise PlanError(f"method {method!r} is not available in this installation ({e})") from e
    return getattr(module, fn)


def compute_delta(model, plan: EditPlan, **kw) -> ConceptDelta:
    return engine(plan.method)(model, plan, **kw)
