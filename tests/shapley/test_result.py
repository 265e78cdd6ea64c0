"""Results round-trip through JSON and carry what the contract promises."""

from __future__ import annotations

import dataclasses
import json

import torch

from msa_edit.shapley import InteractionResult, ShapleyResult, estimate, interactions
from msa_edit.shapley.toys import mlp_game


def test_shapley_result_json_round_trip() -> None:
    res = estimate(mlp_game(n_hidden=10, per_class=True), 10, budget=200, progress=False)
    back = ShapleyResult.from_json(json.loads(json.dumps(res.to_json(), allow_nan=False)))
    assert torch.equal(back.values, res.values) and torch.equal(back.stderr, res.stderr)
    assert (back.n_evaluations, back.method, back.seed) == (res.n_evaluations, "adjusted", 0)
    assert back.surrogate == res.surrogate != ""
    assert len(back.trace) == len(res.trace)
    assert torch.equal(back.trace[-1].values, res.trace[-1].values)


def test_infinite_stderr_survives_strict_json() -> None:
    res = estimate(mlp_game(n_hidden=10), 10, method="permutation", budget=20, progress=False)
    assert res.n_samples == 2  # the smallest budget still gives a standard error
    res = dataclasses.replace(res, stderr=torch.full_like(res.stderr, float("inf")))
    back = ShapleyResult.from_json(json.loads(json.dumps(res.to_json(), allow_nan=False)))
    assert torch.isinf(back.stderr).all()


def test_interaction_result_json_round_trip() -> None:
    res = interactions(mlp_game(n_hidden=6), 6, [(0, 1), (2, 3)], progress=False)
    back = InteractionResult.from_json(json.loads(json.dumps(res.to_json())))
    assert back.pairs == ((0, 1), (2, 3)) and torch.equal(back.values, res.values)
