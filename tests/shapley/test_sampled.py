"""Sampled estimators: convergence, honest standard errors, determinism, budget, early stopping."""

from __future__ import annotations

import pytest
import torch

from msa_edit.shapley import estimate
from msa_edit.shapley.toys import mlp_game

SAMPLED = ["permutation", "antithetic", "kernel", "adjusted"]
N = 10


@pytest.fixture(scope="module")
def game():
    return mlp_game(n_hidden=N, per_class=True)


@pytest.fixture(scope="module")
def truth(game):
    return estimate(game, N, method="exact", progress=False).values


def rmse(game, truth, method: str, budget: int, seeds: range) -> float:
    errs = [
        (estimate(game, N, method=method, budget=budget, seed=s, progress=False).values - truth)
        .pow(2)
        .mean()
        for s in seeds
    ]
    return float(torch.stack(errs).mean().sqrt())


@pytest.mark.parametrize("method", SAMPLED)
def test_error_shrinks_with_budget(game, truth, method: str) -> None:
    small = rmse(game, truth, method, 100, range(12))
    large = rmse(game, truth, method, 500, range(12))
    assert large < 0.7 * small


@pytest.mark.parametrize("method", SAMPLED)
def test_stderr_covers_true_error_at_stated_rate(game, truth, method: str) -> None:
    covered, total, var, sq = 0, 0, 0.0, 0.0
    for seed in range(60):
        res = estimate(game, N, method=method, budget=250, seed=seed, progress=False)
        err = (res.values - truth).abs()
        covered += int((err <= 1.96 * res.stderr).sum())
        total += err.numel()
        var += float(res.stderr.pow(2).sum())
        sq += float(err.pow(2).sum())
    rate = covered / total
    assert 0.88 <= rate <= 0.99, f"95% intervals covered {rate:.3f}"
    # the mean reported variance matches the mean squared error within 30%
    assert 0.7 < var / sq < 1.3


@pytest.mark.parametrize("method", [*SAMPLED, "auto"])
def test_same_seed_same_bits(game, method: str) -> None:
    for seed in (0, 7):
        a = estimate(game, N, method=method, budget=200, seed=seed, progress=False)
        b = estimate(game, N, method=method, budget=200, seed=seed, progress=False)
        assert torch.equal(a.values, b.values) and torch.equal(a.stderr, b.stderr)
    c = estimate(game, N, method=method, budget=200, seed=1, progress=False)
    assert not torch.equal(a.values, c.values)


@pytest.mark.parametrize("method", SAMPLED)
def test_batch_size_does_not_change_the_result(game, method: str) -> None:
    def row_by_row(c: torch.Tensor) -> torch.Tensor:  # batch-invariant numerics
        return torch.cat([game(row[None]) for row in c])

    a = estimate(row_by_row, N, method=method, budget=200, batch_size=3, progress=False)
    b = estimate(row_by_row, N, method=method, budget=200, batch_size=512, progress=False)
    assert torch.equal(a.values, b.values)


@pytest.mark.parametrize("method", SAMPLED)
def test_each_distinct_coalition_evaluated_once_in_batches(game, method: str) -> None:
    seen: list[bytes] = []
    sizes: list[int] = []

    def recording(c: torch.Tensor) -> torch.Tensor:
        sizes.append(c.shape[0])
        seen.extend(bytes(row.tolist()) for row in c)
        return game(c)

    res = estimate(recording, N, method=method, budget=300, batch_size=16, progress=False)
    assert len(seen) == len(set(seen)) == res.n_evaluations <= 300
    assert max(sizes) <= 16
    assert res.n_evaluations >= 300 - 2 * N  # the budget is used, up to one sample's worth


def test_trace_records_convergence(game, truth) -> None:
    res = estimate(game, N, method="kernel", budget=600, progress=False)
    evals = [p.n_evaluations for p in res.trace]
    assert evals == sorted(evals) and len(evals) >= 3
    assert evals[-1] == res.n_evaluations
    assert torch.allclose(res.trace[-1].values.double(), res.values, atol=1e-6)
    first_err = (res.trace[0].values.double() - truth).abs().max()
    assert (res.values - truth).abs().max() < first_err


def test_stops_when_stderr_below_tolerance(game) -> None:
    big = mlp_game(n_hidden=14)
    res = estimate(big, 14, method="antithetic", tol=0.04, progress=False)
    assert res.stopped == "tol"
    assert float(res.stderr.max()) <= 0.04
    finer = estimate(big, 14, method="antithetic", tol=0.02, progress=False)
    assert finer.stopped == "tol" and finer.n_samples > 3 * res.n_samples
    assert float(finer.stderr.max()) <= 0.02


def test_stops_when_topk_ranking_is_stable() -> None:
    big = mlp_game(n_hidden=14)
    truth = estimate(big, 14, method="exact", progress=False)
    res = estimate(big, 14, method="kernel", topk=3, progress=False)
    assert res.stopped == "topk"
    assert res.n_evaluations < 1 << 14
    assert set(res.ranking(3)) == set(truth.ranking(3))


def test_auto_is_exact_when_the_budget_allows(game, truth) -> None:
    res = estimate(game, N, budget=1 << N, progress=False)
    assert res.method == "exact" and torch.allclose(res.values, truth, atol=1e-12)
    assert estimate(game, N, budget=300, progress=False).method == "adjusted"


def test_progress_bar_only_when_asked(game, capsys) -> None:
    estimate(game, N, method="kernel", budget=100, progress=False)
    assert capsys.readouterr().err == ""
    estimate(game, N, method="kernel", budget=100, progress=True)
    err = capsys.readouterr().err
    assert "coalitions" in err and "/100" in err
