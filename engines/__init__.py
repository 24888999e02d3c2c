"""Editing methods: prompts -> keys -> targets -> closed-form solve -> ConceptDelta.

Each engine takes an EditableModel (any host adapter) and an EditPlan; the tensor math lives
in :mod:`..solvers`. ``compute_delta`` dispatches on ``plan.method``.
"""
from .registry import ENGINES, compute_delta, engine

__all__ = ["ENGINES", "compute_delta", "engine"]
