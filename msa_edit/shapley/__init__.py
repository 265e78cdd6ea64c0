"""Shapley values (modes) of batched lesion games: exact, permutation, antithetic, kernel, auto.

>>> import torch
>>> from msa_edit.shapley import estimate
>>> weights = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
>>> res = estimate(lambda c: c.double() @ weights, 3, progress=False)  # additive game
>>> res.values.round(decimals=9).tolist(), res.n_evaluations, res.method
([1.0, 2.0, 3.0], 8, 'exact')
"""

from __future__ import annotations

from msa_edit.shapley.cache import CoalitionCache, Game, GameSpec, check_coalitions
from msa_edit.shapley.estimate import METHODS, estimate, resolve_method
from msa_edit.shapley.interaction import interactions
from msa_edit.shapley.ray_backend import RayBackend, RayPool
from msa_edit.shapley.result import InteractionResult, ShapleyResult, TracePoint
from msa_edit.shapley.sampling import sample_permutations

__all__ = [
    "METHODS",
    "CoalitionCache",
    "Game",
    "GameSpec",
    "InteractionResult",
    "RayBackend",
    "RayPool",
    "ShapleyResult",
    "TracePoint",
    "check_coalitions",
    "estimate",
    "interactions",
    "resolve_method",
    "sample_permutations",
]
