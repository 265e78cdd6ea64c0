"""Exact Shapley values by enumerating all 2^n coalitions."""

from __future__ import annotations

from math import comb

import torch

EXACT_MAX_PLAYERS = 20
"""Above this many players exact enumeration (2^n game rows) is refused; sample instead."""

CHUNK = 1 << 14


def all_coalitions(n_players: int, start: int = 0, stop: int | None = None) -> torch.Tensor:
    """Coalitions `bool [stop - start, n]` numbered by integers: bit i of the number = player i.

    >>> all_coalitions(2).int().tolist()
    [[0, 0], [1, 0], [0, 1], [1, 1]]
    """
    stop = (1 << n_players) if stop is None else stop
    ints = torch.arange(start, stop, dtype=torch.int64)
    return ((ints[:, None] >> torch.arange(n_players)) & 1).bool()


def shapley_weights(n_players: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per coalition size s: the weight of v(S) for players inside S and outside S.

    phi_i = sum_S v(S) * (w_in[|S|] if i in S else -w_out[|S|]), with
    w_in[s] = (s-1)!(n-s)!/n! and w_out[s] = s!(n-s-1)!/n!.

    >>> [round(x, 4) for x in shapley_weights(2)[0].tolist()]
    [0.0, 0.5, 0.5]
    """
    n = n_players
    w_in = torch.zeros(n + 1, dtype=torch.float64)
    w_out = torch.zeros(n + 1, dtype=torch.float64)
    for s in range(n + 1):
        if s >= 1:
            w_in[s] = 1.0 / (n * comb(n - 1, s - 1))
        if s <= n - 1:
            w_out[s] = 1.0 / (n * comb(n - 1, s))
    return w_in, w_out


def accumulate_exact(coalitions: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """This block's share `[n, D]` of exact Shapley values, from rows `bool [B, n]`, `[B, D]`.

    Summed over blocks that together hold every coalition exactly once, the shares give the exact
    values.
    """
    n = coalitions.shape[1]
    w_in, w_out = shapley_weights(n)
    sizes = coalitions.sum(1)
    inside = coalitions.double()
    weights = inside * w_in[sizes][:, None] - (1.0 - inside) * w_out[sizes][:, None]
    return weights.T @ values.double()
