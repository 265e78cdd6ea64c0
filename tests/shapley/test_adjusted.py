"""Regression-adjusted Monte Carlo: exact surrogate values, no bias, honest stderr, and a lead over
kernel regression where the game has the surrogate's structure."""

from __future__ import annotations

import pytest
import torch

from msa_edit.errors import MsaEditError
from msa_edit.shapley import estimate
from msa_edit.shapley.adjusted import AdjustedSampler
from msa_edit.shapley.exact import accumulate_exact, all_coalitions
from msa_edit.shapley.surrogate import ladder, rung_sizes
from msa_edit.shapley.toys import layered_game, unanimity_game


@pytest.mark.parametrize("groups", [[0, 0, 0, 1, 1, 2, 2, 2, 2, 3], [5, 5, 1, 1, 1, 1], [0] * 8])
def test_every_feature_has_its_exact_shapley_values(groups: list[int]) -> None:
    """Each feature column, as a game over all 2^n coalitions, has the values `Basis.shapley`
    claims (products, one-group and two-group count features; groups of 1-4 players)."""
    coalitions = all_coalitions(len(groups))
    bases = ladder(groups)
    assert [b.n_features for b in bases] == rung_sizes(groups)
    for basis in bases:
        exact = accumulate_exact(coalitions, basis.design(coalitions))
        assert torch.allclose(exact, basis.shapley, atol=1e-12), basis.name


def cross_group_game(n: int, seed: int) -> tuple[torch.Tensor, object]:
    """Unanimity game with carriers of 1-4 players anywhere (across groups too): no rung fits it
    exactly, so the Monte Carlo correction carries real variance."""
    g = torch.Generator().manual_seed(seed)
    carriers = [torch.randperm(n, generator=g)[: int(torch.randint(1, 5, (1,), generator=g))]
                for _ in range(3 * n)]  # fmt: skip
    coef = torch.randn(len(carriers), generator=g, dtype=torch.float64)
    exact = torch.zeros(n, dtype=torch.float64)
    for members, a in zip(carriers, coef, strict=True):
        exact[members] += a / len(members)
    return exact, unanimity_game([c.tolist() for c in carriers], coef)


def candidates(game, n: int, groups: list[int], budget: int, seed: int) -> dict:
    sampler = AdjustedSampler(n, seed, budget, groups)
    fixed = sampler.fixed()
    sampler.set_fixed(game(fixed)[:, None])
    blocks = sampler.draw((budget - len(fixed)) // 2)
    sampler.add(blocks, [game(b)[:, None] for b in blocks])
    return sampler.candidates()


def test_each_surrogate_estimate_is_unbiased() -> None:
    """Mean error over 60 seeds within 3 standard errors of zero for every player and rung."""
    n, groups = 12, [i // 4 for i in range(12)]
    exact, game = cross_group_game(n, seed=0)
    runs = [candidates(game, n, groups, 300, s) for s in range(60)]
    for name in ("linear", "counts", "within", "across"):
        errors = torch.stack([r[name][0][:, 0] for r in runs]) - exact
        mean, se = errors.mean(0), errors.std(0) / len(runs) ** 0.5
        assert bool((se > 0).all()), name
        assert bool((mean.abs() <= 3 * se).all()), (name, (mean / se).tolist())


def test_the_stderr_is_calibrated() -> None:
    """95 % intervals of every rung cover the exact values 90-99 % of the time at 300 coalitions,
    and the reported stderr matches the seed-to-seed spread (ratio 0.7-1.4)."""
    n, groups = 12, [i // 4 for i in range(12)]
    exact, game = cross_group_game(n, seed=1)
    runs = [candidates(game, n, groups, 300, s) for s in range(40)]
    for name in ("linear", "counts", "within", "across"):
        values = torch.stack([r[name][0][:, 0] for r in runs])
        stderr = torch.stack([r[name][1][:, 0] for r in runs])
        coverage = float(((values - exact).abs() <= 1.96 * stderr).double().mean())
        ratio = float((stderr.mean(0) / values.std(0)).median())
        assert 0.9 <= coverage <= 0.99, (name, coverage)
        assert 0.7 <= ratio <= 1.4, (name, ratio)


def test_a_surrogate_that_fits_the_game_beats_the_kernel() -> None:
    """On a game with interactions only inside layers, the `within` rung represents it exactly,
    so the adjusted values are exact up to the fit's ridge (1e-9 relative) while the kernel's
    error is not small."""
    game, exact = layered_game(n_layers=3, width=6)
    groups = [i // 6 for i in range(18)]
    for seed in range(3):
        adj = estimate(game, 18, "adjusted", 600, seed, groups=groups, progress=False)
        ker = estimate(game, 18, "kernel", 600, seed, progress=False)
        assert adj.surrogate in ("within", "across")
        assert float((adj.values - exact).abs().max()) < 1e-6
        assert float((ker.values - exact).abs().max()) > 1e-3
        assert float(adj.stderr.max()) < 1e-6


def test_without_a_useful_surrogate_it_returns_the_kernel_values() -> None:
    """Players each in a group of their own and a budget too small to cross-fit: the kernel."""
    game, _ = layered_game(n_layers=2, width=5)
    adj = estimate(game, 10, "adjusted", 40, 0, progress=False)
    ker = estimate(game, 10, "kernel", 40, 0, progress=False)
    assert adj.surrogate == "kernel"
    assert torch.equal(adj.values, ker.values) and torch.equal(adj.stderr, ker.stderr)


@pytest.mark.parametrize(
    ("groups", "message"),
    [([0, 1], "groups has 2 labels but there are n_players=3"), ("abc", "a list of ints")],
)
def test_bad_groups_are_refused(groups: object, message: str) -> None:
    game, _ = layered_game(n_layers=1, width=3)
    with pytest.raises(MsaEditError, match=message):
        estimate(game, 3, "adjusted", 8, groups=groups, progress=False)  # type: ignore[arg-type]


def test_an_additive_game_gets_the_kernel_values() -> None:
    """Every rung fits an additive game exactly, so none beats the `linear` yardstick and the
    kernel's values (exact here) are returned."""
    weights = torch.linspace(-1.0, 2.0, 12, dtype=torch.float64)
    res = estimate(lambda c: c.double() @ weights, 12, "adjusted", 400, 0,
                   groups=[i // 4 for i in range(12)], progress=False)  # fmt: skip
    assert res.surrogate == "kernel"
    assert torch.allclose(res.values, weights, atol=1e-9)
