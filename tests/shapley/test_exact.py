"""Exact Shapley values against closed forms and exhaustive enumeration of orders."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from msa_edit.shapley import estimate
from msa_edit.shapley.toys import (
    airport_game,
    glove_game,
    mlp_game,
    unanimity_game,
    weighted_majority_game,
)

TOL = 1e-9


def by_orders(game, n: int) -> torch.Tensor:
    """Ground truth by definition: average marginal contribution over all n! orders."""
    phi = torch.zeros(n, dtype=torch.float64)
    for order in itertools.permutations(range(n)):
        mask = torch.zeros(n + 1, n, dtype=torch.bool)
        for k, player in enumerate(order):
            mask[k + 1 :, player] = True
        values = game(mask).double()
        phi[list(order)] += values[1:] - values[:-1]
    return phi / math.factorial(n)


def exact(game, n: int) -> torch.Tensor:
    return estimate(game, n, method="exact", progress=False).values


def test_glove_game() -> None:
    phi = exact(glove_game(1, 2), 3)
    assert torch.allclose(phi, torch.tensor([2 / 3, 1 / 6, 1 / 6], dtype=torch.float64), atol=TOL)


def test_airport_game_closed_form() -> None:
    costs = [1.0, 3.0, 3.0, 7.0, 10.0, 12.5]
    n = len(costs)
    expected = [
        sum((costs[k] - (costs[k - 1] if k else 0.0)) / (n - k) for k in range(i + 1))
        for i in range(n)
    ]
    assert torch.allclose(
        exact(airport_game(costs), n), torch.tensor(expected, dtype=torch.float64), atol=TOL
    )


@pytest.mark.parametrize(
    ("weights", "quota", "expected"),
    [
        ([2, 1, 1], 3, [2 / 3, 1 / 6, 1 / 6]),
        ([1] * 7, 4, [1 / 7] * 7),  # symmetric majority
        ([5, 1, 1, 1], 5, [1.0, 0.0, 0.0, 0.0]),  # dictator
    ],
)
def test_weighted_majority_closed_forms(weights, quota, expected) -> None:
    phi = exact(weighted_majority_game(weights, quota), len(weights))
    assert torch.allclose(phi, torch.tensor(expected, dtype=torch.float64), atol=TOL)


def test_weighted_majority_matches_all_orders() -> None:
    game = weighted_majority_game([4, 3, 3, 2, 1, 1, 1], 8)
    assert torch.allclose(exact(game, 7), by_orders(game, 7), atol=TOL)


def test_sum_of_unanimity_games() -> None:
    gen = torch.Generator().manual_seed(1)
    n = 9
    carriers = [[0], [1, 2], [2, 3, 4], [0, 5, 6, 7, 8], [1, 4, 8], list(range(n))]
    coef = torch.randn(len(carriers), generator=gen, dtype=torch.float64)
    expected = torch.zeros(n, dtype=torch.float64)
    for t, c in zip(carriers, coef, strict=True):
        expected[t] += c / len(t)
    assert torch.allclose(exact(unanimity_game(carriers, coef), n), expected, atol=TOL)


def test_vector_valued_modes_are_known_tensors() -> None:
    gen = torch.Generator().manual_seed(2)
    n = 6
    carriers = [[0, 1], [2], [1, 3, 5], [0, 4]]
    coef = torch.randn(len(carriers), 2, 3, generator=gen, dtype=torch.float64)
    expected = torch.zeros(n, 2, 3, dtype=torch.float64)
    for t, c in zip(carriers, coef, strict=True):
        expected[t] += c / len(t)
    res = estimate(unanimity_game(carriers, coef), n, method="exact", progress=False)
    assert res.values.shape == (n, 2, 3)
    assert torch.allclose(res.values, expected, atol=TOL)
    assert torch.equal(res.stderr, torch.zeros_like(res.values))


@pytest.mark.parametrize("method", ["exact", "permutation", "antithetic", "kernel", "auto"])
def test_efficiency_for_every_method(method: str) -> None:
    game = mlp_game(n_hidden=10, per_class=True)
    budget = None if method == "exact" else 300
    res = estimate(game, 10, method=method, budget=budget, progress=False)
    assert torch.allclose(res.values.sum(0), res.v_full - res.v_empty, atol=TOL)
    assert res.values.shape == (10, 3)


def test_single_player() -> None:
    res = estimate(lambda c: c.double()[:, 0] * 2 + 1, 1, progress=False)
    assert res.values.tolist() == [2.0]
    assert res.n_evaluations == 2


@pytest.mark.parametrize("method", ["permutation", "antithetic", "kernel"])
def test_sampled_methods_become_exact_when_every_coalition_is_evaluated(method: str) -> None:
    game = mlp_game(n_hidden=6)
    res = estimate(game, 6, method=method, budget=64, progress=False)
    assert res.stopped == "exhausted"
    assert torch.allclose(res.values, exact(game, 6), atol=TOL)
