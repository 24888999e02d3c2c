"""Closed-form editing solvers: pure tensor math, no diffusers or ComfyUI imports."""
from .linalg import SolveReport, solve_spd
from .uce import UCESolution, uce_solve, uce_solve_layer

__all__ = ["SolveReport", "solve_spd", "UCESolution", "uce_solve", "uce_solve_layer"]
