"""Pairwise Shapley interaction index (Grabisch & Roubens 1999) for chosen pairs of players.

I_ij = sum_{S in N minus {i,j}} |S|!(n-|S|-2)!/(n-1)! [v(S+ij) - v(S+i) - v(S+j) + v(S)].
Its weights make |S| uniform on 0..n-2 and S uniform within a size, which is how the sampled
estimator draws S (paired with its complement in N minus {i,j}). Negative = redundant pair: removing
both hurts less than the sum of removing each; positive = synergistic.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from math import comb

import numpy as np
import torch

from msa_edit.errors import MsaEditError
from msa_edit.shapley.cache import CoalitionCache, Game, as_rows, pack_keys
from msa_edit.shapley.estimate import AUTO_EXACT_MAX_PLAYERS, default_budget
from msa_edit.shapley.exact import CHUNK, EXACT_MAX_PLAYERS, all_coalitions
from msa_edit.shapley.result import InteractionResult
from msa_edit.shapley.sampling import RunningMoments

FIRST_ROUND = 8


def _check_pairs(pairs: Sequence[tuple[int, int]], n: int) -> tuple[tuple[int, int], ...]:
    out = []
    for pair in pairs:
        if len(pair) != 2:
            raise MsaEditError(f"each pair must be two player indices, got {pair!r}")
        i, j = int(pair[0]), int(pair[1])
        if not (0 <= i < n and 0 <= j < n) or i == j:
            raise MsaEditError(f"pair {pair!r} must name two different players in 0..{n - 1}")
        out.append((i, j))
    if not out:
        raise MsaEditError("pairs is empty; name at least one pair of players, e.g. [(0, 1)]")
    return tuple(out)


def interactions(
    game: Game,
    n_players: int,
    pairs: Sequence[tuple[int, int]],
    budget: int | None = None,
    seed: int = 0,
    batch_size: int = 64,
    *,
    checkpoint: str | os.PathLike[str] | None = None,
    checkpoint_every: float = 60.0,
    progress: bool | None = None,
) -> InteractionResult:
    """Shapley interaction index of each pair, shaped like the game's output.

    Exact when all 2^n coalitions fit the budget (or n <= 10 without one), else sampled within
    `budget` distinct coalitions (default 64 (n+1)), with standard errors.

    >>> both = lambda c: (c[:, 0] & c[:, 1]).double()   # v = 1 iff players 0 and 1 are intact
    >>> interactions(both, 3, [(0, 1), (0, 2)], progress=False).values.tolist()
    [1.0, 0.0]
    """
    if isinstance(n_players, bool) or not isinstance(n_players, int) or n_players < 2:
        raise MsaEditError(
            f"n_players must be an int >= 2 for pair interactions, got {n_players!r}"
        )
    checked = _check_pairs(pairs, n_players)
    if budget is not None and (not isinstance(budget, int) or budget < 8):
        raise MsaEditError(f"budget must be an int >= 8 (one sample of one pair), got {budget!r}")
    exact = n_players <= EXACT_MAX_PLAYERS and (
        budget >= 1 << n_players if budget is not None else n_players <= AUTO_EXACT_MAX_PLAYERS
    )
    limit = (1 << n_players) if exact else (budget or default_budget(n_players))
    cache = CoalitionCache(
        game, n_players, batch_size, checkpoint, checkpoint_every, progress, limit
    )
    try:
        if exact:
            values = _exact(cache, n_players, checked)
            return InteractionResult(
                checked, values, torch.zeros_like(values), 1 << n_players, "exact", seed
            )
        return _sampled(cache, n_players, checked, limit, seed)
    finally:
        cache.close()


def _exact(cache: CoalitionCache, n: int, pairs: tuple[tuple[int, int], ...]) -> torch.Tensor:
    weight = torch.tensor(
        [1.0 / ((n - 1) * comb(n - 2, s)) for s in range(n - 1)], dtype=torch.float64
    )
    idx = torch.tensor(pairs)
    total: torch.Tensor | None = None
    for start in range(0, 1 << n, CHUNK):
        block = all_coalitions(n, start, min(1 << n, start + CHUNK))
        values = cache.get(block)
        has_i, has_j = block[:, idx[:, 0]], block[:, idx[:, 1]]  # [B, P]
        rest = block.sum(1, keepdim=True) - has_i.long() - has_j.long()
        sign = torch.where(has_i == has_j, 1.0, -1.0).double()
        coef = sign * weight[rest]  # [B, P]
        share = coef.T @ as_rows(values)
        total = share if total is None else total + share
    assert total is not None
    return total.reshape(len(pairs), *values.shape[1:])


def _sampled(
    cache: CoalitionCache, n: int, pairs: tuple[tuple[int, int], ...], budget: int, seed: int
) -> InteractionResult:
    rng = np.random.default_rng(seed)
    used: set[bytes] = set()
    moments = [RunningMoments() for _ in pairs]
    full = False
    while not full:
        count = max(FIRST_ROUND, moments[0].count // 4)
        sizes = rng.integers(0, n - 1, size=(count, len(pairs)))
        noise = rng.random((count, len(pairs), n))
        blocks: list[tuple[int, torch.Tensor]] = []
        for k in range(count):
            for p, (i, j) in enumerate(pairs):
                block = _sample_block(n, i, j, int(sizes[k, p]), noise[k, p])
                new = set(pack_keys(block)) - used
                if len(used) + len(new) > budget:
                    full = True
                    break
                used |= new
                blocks.append((p, block))
            if full:
                break
        if not blocks:
            break
        values = as_rows(cache.get(torch.cat([b for _, b in blocks]))).split(8)
        for p in range(len(pairs)):
            rows = [v for (q, _), v in zip(blocks, values, strict=True) if q == p]
            if rows:
                v = torch.stack(rows)  # [m, 8, D]: (S, S+i, S+j, S+ij) then the complement's
                delta = (
                    v[:, 3] - v[:, 1] - v[:, 2] + v[:, 0] + v[:, 7] - v[:, 5] - v[:, 6] + v[:, 4]
                )
                moments[p].add((delta / 2)[:, None, :])
    if any(m.mean is None for m in moments):
        raise MsaEditError(
            f"budget={budget} leaves no sample for some pair; raise it to >= {8 * len(pairs)}"
        )
    shape = cache.output_shape or ()
    values_t = torch.stack([m.mean[0] for m in moments if m.mean is not None]).reshape(
        len(pairs), *shape
    )
    stderr_t = torch.stack([m.stderr()[0] for m in moments]).reshape(len(pairs), *shape)
    return InteractionResult(pairs, values_t, stderr_t, len(used), "sampled", seed)


def _sample_block(n: int, i: int, j: int, size: int, noise: np.ndarray) -> torch.Tensor:
    """Coalitions (S, S+i, S+j, S+ij) for S of `size` from N minus {i, j}, then its complement's."""
    others = np.array([p for p in range(n) if p not in (i, j)], dtype=np.int64)
    order = others[np.argsort(noise[: len(others)], kind="stable")]
    base = torch.zeros(n, dtype=torch.bool)
    base[torch.from_numpy(order[:size])] = True
    rows = []
    for s in (base, ~base):
        s = s.clone()
        s[i] = s[j] = False
        for add_i, add_j in ((False, False), (True, False), (False, True), (True, True)):
            row = s.clone()
            row[i], row[j] = add_i, add_j
            rows.append(row)
    return torch.stack(rows)
