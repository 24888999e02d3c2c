"""Closed-form editing solvers: pure tensor math, no diffusers or ComfyUI imports."""
from .emcid import emcid_solve_layer, emcid_system, spread_residual
from .linalg import LayerSolution, SolveReport, solve_spd
from .nullspace import (
    EditHistory,
    NullSpaceProjector,
    null_space_projector,
    nullspace_solve_layer,
    projector_from_keys,
)
from .rece import (
    RECESystem,
    adversarial_embeddings,
    output_distance,
    rece_system,
    rece_system_factored,
)
from .speed import (
    RetainMoment,
    erase_map,
    invariant_keys,
    kmeans,
    least_direction,
    retain_moment,
    retain_projector,
    speed_solve_layer,
)
from .uce import UCESolution, uce_solve, uce_solve_layer

__all__ = [
    "LayerSolution", "SolveReport", "solve_spd",
    "UCESolution", "uce_solve", "uce_solve_layer",
    "emcid_solve_layer", "emcid_system", "spread_residual",
    "EditHistory", "NullSpaceProjector", "null_space_projector", "nullspace_solve_layer",
    "projector_from_keys",
    "RECESystem", "adversarial_embeddings", "output_distance", "rece_system", "rece_system_factored",
    "RetainMoment", "erase_map", "invariant_keys", "kmeans", "least_direction", "retain_moment", "retain_projector",
    "speed_solve_layer",
]
