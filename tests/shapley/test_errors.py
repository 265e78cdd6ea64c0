"""Bad input: one clear error each, raised before the game is called where possible."""

from __future__ import annotations

import pytest
import torch

from msa_edit.errors import MsaEditError
from msa_edit.shapley import CoalitionCache, estimate, interactions
from msa_edit.shapley.estimate import min_budget
from msa_edit.shapley.toys import mlp_game


def additive(c: torch.Tensor) -> torch.Tensor:
    return c.double().sum(1)


def never_called(c: torch.Tensor) -> torch.Tensor:
    raise AssertionError("the game must not be called for an invalid request")


@pytest.mark.parametrize(
    ("game", "match"),
    [
        (lambda c: additive(c)[:-1], "returned 3 rows for a batch of 4 coalitions"),
        (lambda c: additive(c).sum(), "returned a 0-d tensor"),
        (
            lambda c: torch.where(c[:, 0], additive(c), torch.nan),
            "NaN or inf .* players \\[0, 1\\] lesioned",
        ),
        (lambda c: additive(c) / c[:, 1].double() * 0 + 1 / c[:, 1].double(), "NaN or inf"),
        (lambda c: c.sum(1), "floating-point tensor, got dtype torch.int64"),
        (lambda c: additive(c).tolist(), "must return a torch.Tensor"),
        (lambda c: torch.zeros(c.shape[0], c.shape[0]), "output shape changed"),
    ],
)
def test_bad_games(game, match: str) -> None:
    with pytest.raises(MsaEditError, match=match):
        estimate(game, 2, method="exact", batch_size=3 if "changed" in match else 4, progress=False)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_players": 0}, "n_players must be an int >= 1, got 0"),
        ({"n_players": 2.5}, "n_players must be an int >= 1"),
        ({"method": "shapiq"}, "unknown method 'shapiq'; choose one of auto, exact"),
        ({"budget": 0}, "budget must be a positive int"),
        ({"budget": 100, "method": "exact"}, "needs 2\\^10 = 1024 coalitions but budget=100"),
        ({"budget": 5, "method": "permutation"}, "budget=5 is too small for method='permutation'"),
        (
            {"budget": 31, "method": "kernel"},
            "needs at least 32 distinct coalitions; raise the "
            "budget, or use method='permutation' \\(from 20\\)$",
        ),
        (
            {"budget": 5},
            "budget=5 is too small for 10 players: the least any method needs for "
            "values with a standard error is 20 distinct coalitions; raise the budget$",
        ),
        ({"n_players": 25, "method": "exact"}, "limited to 20 players"),
        ({"seed": -1}, "seed must be an int >= 0"),
        ({"batch_size": 0}, "batch_size must be a positive int"),
        ({"tol": 0.0}, "tol must be > 0"),
        ({"topk": 11}, "topk must be between 1 and n_players=10"),
    ],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    args = {"n_players": 10, "progress": False, **kwargs}
    with pytest.raises(MsaEditError, match=match):
        estimate(never_called, **args)


def test_non_bool_mask_is_refused() -> None:
    cache = CoalitionCache(additive, 3, progress=False)
    with pytest.raises(MsaEditError, match=r"torch\.bool mask .* got dtype torch\.int64"):
        cache.get(torch.ones(2, 3, dtype=torch.int64))
    with pytest.raises(MsaEditError, match="shape \\[B, 3\\], got \\[2, 4\\]"):
        cache.get(torch.ones(2, 4, dtype=torch.bool))


def test_bad_pairs() -> None:
    with pytest.raises(MsaEditError, match=r"two different players in 0\.\.3"):
        interactions(never_called, 4, [(0, 0)], progress=False)
    with pytest.raises(MsaEditError, match="pairs is empty"):
        interactions(never_called, 4, [], progress=False)


def test_corrupt_checkpoint_is_refused(tmp_path) -> None:
    bad = tmp_path / "c.pt"
    bad.write_text("not a checkpoint")
    with pytest.raises(MsaEditError, match="not a readable msa_edit checkpoint"):
        estimate(never_called, 3, checkpoint=bad, progress=False)


@pytest.mark.parametrize("n", [6, 10, 20])
def test_auto_never_reports_an_infinite_stderr(n: int) -> None:
    """From the least budget any method takes, `auto` picks one whose first estimate has a
    finite standard error (the kernel's is infinite until ceil(n / 2) pairs are sampled)."""
    game = mlp_game(n)
    least = min_budget("kernel", n)
    for budget in range(2 * n, least + 3):
        res = estimate(game, n, method="auto", budget=budget, progress=False)
        assert torch.isfinite(res.stderr).all(), (budget, res.method)
        assert res.method == ("adjusted" if budget >= least else "permutation")
    kernel = estimate(game, n, method="kernel", budget=least, progress=False)
    assert torch.isfinite(kernel.stderr).all()
    with pytest.raises(MsaEditError, match=f"needs at least {least} distinct coalitions"):
        estimate(game, n, method="kernel", budget=least - 1, progress=False)
