"""On the same game and the same permutations, `permutation` gives msapy 1.7.3's values."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
import torch

from msa_edit.shapley import estimate, sample_permutations
from msa_edit.shapley.toys import mlp_game

msa = pytest.importorskip("msapy.msa")
N = 10


def objective(game):
    """msapy's objective receives the lesioned players; our game receives the intact mask."""

    def f(lesioned: tuple) -> np.ndarray | float:
        mask = torch.ones(1, N, dtype=torch.bool)
        mask[0, list(lesioned)] = False
        out = game(mask)[0]
        return float(out) if out.dim() == 0 else out.numpy()

    return f


def msapy_values(game, orders: np.ndarray, lazy: bool) -> torch.Tensor:
    # lazy msapy lesions players along the order (walks it from the full coalition down), which is
    # our marginal walk along the reversed order
    space = [tuple(int(p) for p in (o[::-1] if lazy else o)) for o in orders]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        table = msa.interface(
            n_permutations=len(space),
            elements=list(range(N)),
            objective_function=objective(game),
            permutation_space=space,
            lazy=lazy,
            n_parallel_games=1,
            dual_progress_bars=False,
        )
    columns = table[list(range(N))]
    if type(table).__name__ == "ShapleyModeND":  # already averaged: one row per output element
        return torch.tensor(columns.to_numpy().T)
    return torch.tensor(columns.mean().to_numpy())  # ShapleyTable: one row per permutation


@pytest.mark.filterwarnings("ignore:A Permutation space is given")
@pytest.mark.parametrize("per_class", [False, True])
@pytest.mark.parametrize("lazy", [True, False])
def test_permutation_matches_msapy_on_the_same_permutations(per_class: bool, lazy: bool) -> None:
    game = mlp_game(n_hidden=N, per_class=per_class)
    ours = estimate(game, N, method="permutation", budget=300, seed=3, progress=False)
    orders = sample_permutations(N, ours.n_samples, seed=3)
    assert len({tuple(o) for o in orders}) == len(orders)  # msapy silently drops repeated orders
    theirs = msapy_values(game, orders, lazy)
    assert theirs.shape == ours.values.shape
    assert torch.allclose(ours.values, theirs.double(), atol=1e-12, rtol=0)
