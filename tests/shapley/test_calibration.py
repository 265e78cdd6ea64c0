"""Error bars that hold at small budgets: on a 60-player game with in-layer interactions (closed
form), "value ± 1.96 stderr" covers the exact value at least 90 % of the time from twice the
kernel's least budget, and the stderr is not smaller than the seed-to-seed spread it claims to
measure. The delta-method stderr this replaced covered 52 % there (stderr / spread 0.36)."""

from __future__ import annotations

import pytest
import torch

from msa_edit.shapley import estimate
from msa_edit.shapley.estimate import min_budget
from msa_edit.shapley.toys import layered_game

SEEDS = 20


@pytest.mark.parametrize(
    ("method", "multiple"),
    [("kernel", 2), ("kernel", 5), ("permutation", 5), ("adjusted", 2), ("adjusted", 5)],
)
def test_intervals_cover_the_exact_values(method: str, multiple: int) -> None:
    game, exact = layered_game(n_layers=6, width=10)
    budget = min_budget(method, 60) * multiple
    groups = [i // 10 for i in range(60)]
    runs = [estimate(game, 60, method, budget, s, groups=groups, progress=False)
            for s in range(1, SEEDS + 1)]  # fmt: skip
    values = torch.stack([r.values.double() for r in runs])
    stderr = torch.stack([r.stderr.double() for r in runs])
    coverage = float(((values - exact).abs() <= 1.96 * stderr).double().mean())
    ratio = float((stderr.mean(0) / values.std(0)).median())
    assert 0.9 <= coverage <= 1.0
    assert 0.8 <= ratio <= 2.0
