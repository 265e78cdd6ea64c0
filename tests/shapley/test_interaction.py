"""Pairwise Shapley interaction index against closed forms; the sampled estimate is honest."""

from __future__ import annotations

import itertools
import math

import torch

from msa_edit.shapley import interactions
from msa_edit.shapley.toys import mlp_game, unanimity_game

CARRIERS = [[0, 1], [1, 2, 3], [0, 4, 5, 6], [2], [3, 7], list(range(8))]


def unanimity_sii(coef: torch.Tensor, pairs) -> torch.Tensor:
    """I_ij of a sum of unanimity games: sum over carriers T containing i and j of c_T / (|T|-1)."""
    out = torch.zeros(len(pairs), *coef.shape[1:], dtype=torch.float64)
    for p, (i, j) in enumerate(pairs):
        for t, c in zip(CARRIERS, coef, strict=True):
            if i in t and j in t:
                out[p] += c / (len(t) - 1)
    return out


def by_definition(game, n: int, i: int, j: int) -> float:
    others = [p for p in range(n) if p not in (i, j)]
    total = 0.0
    for size in range(n - 1):
        weight = math.factorial(size) * math.factorial(n - size - 2) / math.factorial(n - 1)
        for s in itertools.combinations(others, size):
            rows = torch.zeros(4, n, dtype=torch.bool)
            rows[:, list(s)] = True
            rows[1, i] = rows[3, i] = rows[2, j] = rows[3, j] = True
            v = game(rows).double()
            total += weight * float(v[3] - v[1] - v[2] + v[0])
    return total


def test_exact_on_unanimity_games_scalar_and_vector() -> None:
    gen = torch.Generator().manual_seed(0)
    pairs = [(0, 1), (1, 3), (2, 3), (0, 5), (4, 6), (3, 7), (1, 6)]
    for shape in [(), (2,)]:
        coef = torch.randn(len(CARRIERS), *shape, generator=gen, dtype=torch.float64)
        res = interactions(unanimity_game(CARRIERS, coef), 8, pairs, progress=False)
        assert res.method == "exact" and res.values.shape == (len(pairs), *shape)
        assert torch.allclose(res.values, unanimity_sii(coef, pairs), atol=1e-9)


def test_exact_matches_definition_on_a_model_game() -> None:
    game = mlp_game(n_hidden=7)
    res = interactions(game, 7, [(0, 1), (2, 5)], progress=False)
    for p, (i, j) in enumerate(res.pairs):
        assert abs(float(res.values[p]) - by_definition(game, 7, i, j)) < 1e-9


def test_sampled_is_unbiased_and_its_stderr_is_honest() -> None:
    game = mlp_game(n_hidden=12)
    pairs = [(0, 1), (3, 7), (5, 11)]
    truth = interactions(game, 12, pairs, budget=1 << 12, progress=False).values
    z = []
    for seed in range(40):
        res = interactions(game, 12, pairs, budget=240, seed=seed, progress=False)
        assert res.method == "sampled" and res.n_evaluations <= 240
        z.append((res.values - truth) / res.stderr)
    z_all = torch.cat(z)
    assert abs(float(z_all.mean())) < 0.35  # no bias beyond noise (120 z-scores)
    assert 0.85 <= float((z_all.abs() <= 1.96).double().mean()) <= 0.99
