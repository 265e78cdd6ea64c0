"""Row sampling: each coalition valued on a few target rows, corrected by the intact model.

A lesion game's value is a mean over target rows (per target set). With `rows_per_set = k`, a
coalition is run on k rows of each set, drawn at random, and every other row gets the intact
model's statistics plus the mean lesion effect on the drawn rows of its set (the difference
estimator, with the intact model on the same rows as a control variate):

    v(S) ~ mean_rows intact + mean_drawn (stats_S - intact)

which is unbiased for an objective that averages its rows, and costs k / n_set of a full
evaluation. The rows are drawn from the coalition's own bits and `seed`, so a coalition gets the
same rows in any batch, on any worker and after a resume. Coalitions with at most `EXACT_ENDS`
lesioned or intact units run on every row: they are what estimators enumerate exactly (the
kernel's sizes 1 and n - 1), and their values must be exact for the standard errors to hold.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

EXACT_ENDS = 1
"""Coalitions with at most this many lesioned (or intact) units are valued on every row."""


def on_every_row(coalitions: torch.Tensor) -> torch.Tensor:
    """`bool [B]`: which coalitions are valued on every row (within `EXACT_ENDS` of either end).

    >>> on_every_row(torch.tensor([[1, 1, 1], [1, 0, 1], [1, 0, 0], [0, 0, 0]]).bool()).tolist()
    [True, True, True, True]
    >>> on_every_row(torch.tensor([[1, 1, 0, 0]]).bool()).tolist()
    [False]
    """
    intact = coalitions.sum(1)
    return torch.minimum(intact, coalitions.shape[1] - intact) <= EXACT_ENDS


def draw_rows(coalition: torch.Tensor, group: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """Sorted row indices `long [k * n_sets]`: k rows of each target set (all of a set's rows
    when it has no more than k), drawn without replacement from the coalition's bits and `seed`.

    >>> group = torch.tensor([0, 0, 0, 1, 1, 1])
    >>> rows = draw_rows(torch.tensor([True, False, True]), group, 1, seed=0)
    >>> group[rows].tolist()
    [0, 1]
    """
    bits = np.packbits(coalition.cpu().numpy().astype(np.uint8)).tobytes()
    digest = hashlib.blake2b(bits + seed.to_bytes(8, "little"), digest_size=8).digest()
    rng = np.random.default_rng(int.from_bytes(digest, "little"))
    picked = []
    for s in range(int(group.max()) + 1):
        members = (group == s).nonzero()[:, 0].numpy()
        if len(members) <= k:
            picked.append(members)
        else:
            picked.append(np.sort(rng.choice(members, k, replace=False)))
    return torch.from_numpy(np.concatenate(picked)).long()


def impute(
    drawn: torch.Tensor, rows: torch.Tensor, intact: torch.Tensor, group: torch.Tensor
) -> torch.Tensor:
    """Statistics of every row `[N, ...]` (float64) from those of the drawn `rows` `[k, ...]`:
    drawn rows keep theirs, every other row gets its intact statistics `intact [N, ...]` plus the
    mean difference from the intact model on the drawn rows of its set.

    >>> intact = torch.tensor([[1.0], [2.0], [3.0], [4.0]])
    >>> impute(torch.tensor([[2.5], [4.0]]), torch.tensor([0, 3]), intact,
    ...        torch.tensor([0, 0, 1, 1])).flatten().tolist()
    [2.5, 3.5, 3.0, 4.0]
    """
    intact = intact.double()
    change = drawn.double() - intact[rows]
    n_sets = int(group.max()) + 1
    sums = torch.zeros(n_sets, *change.shape[1:], dtype=torch.float64)
    sums.index_add_(0, group[rows], change)
    counts = torch.bincount(group[rows], minlength=n_sets).clamp_min(1).double()
    shift = sums / counts.reshape(-1, *[1] * (change.dim() - 1))
    out = intact + shift[group]
    out[rows] = drawn.double()
    return out
