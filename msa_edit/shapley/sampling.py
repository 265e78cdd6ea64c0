"""Permutation (Castro) and antithetic permutation sampling of Shapley values.

Each sample is a random order of the players; the marginal contributions v(prefix + i) - v(prefix)
along it, averaged over samples, estimate the Shapley values without bias. `antithetic` pairs each
order with its reverse and averages the two: one sample = one pair, which cancels most of the
variance coming from the players' positions.
"""

from __future__ import annotations

import numpy as np
import torch

from msa_edit.shapley.intervals import t_factor


def sample_permutations(n_players: int, count: int, seed: int) -> np.ndarray:
    """The first `count` orders `int [count, n]` that seed `seed` gives the permutation samplers.

    Every run with the same seed draws this same stream, so these are exactly the permutations an
    `estimate(..., method="permutation", seed=seed)` with `n_samples == count` used.

    >>> sample_permutations(4, 2, seed=0).tolist()
    [[3, 2, 1, 0], [2, 3, 0, 1]]
    """
    return permutations_from(np.random.default_rng(seed), n_players, count)


def permutations_from(rng: np.random.Generator, n_players: int, count: int) -> np.ndarray:
    """`count` uniform random orders of `n_players` players, drawn from `rng`."""
    return np.argsort(rng.random((count, n_players)), axis=1, kind="stable")


def prefix_coalitions(order: np.ndarray) -> torch.Tensor:
    """The n+1 nested coalitions `bool [n+1, n]` along `order`: row k holds its first k players."""
    rank = torch.from_numpy(np.argsort(order, kind="stable"))
    return torch.arange(len(order) + 1)[:, None] > rank[None, :]


class RunningMoments:
    """Mean and sum of squared deviations of samples `[m, n, D]`, merged batch by batch (Chan)."""

    def __init__(self) -> None:
        self.count = 0
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None

    def add(self, batch: torch.Tensor) -> None:
        m = batch.shape[0]
        b_mean = batch.mean(0)
        b_m2 = ((batch - b_mean) ** 2).sum(0)
        if self.mean is None or self.m2 is None:
            self.count, self.mean, self.m2 = m, b_mean, b_m2
            return
        total = self.count + m
        delta = b_mean - self.mean
        self.mean = self.mean + delta * (m / total)
        self.m2 = self.m2 + b_m2 + delta**2 * (self.count * m / total)
        self.count = total

    def stderr(self) -> torch.Tensor:
        """Standard error of the mean, scaled so that ±1.96 stderr is a 95 % interval with
        `count - 1` degrees of freedom (`intervals.t_factor`); inf with fewer than two samples."""
        assert self.m2 is not None
        if self.count < 2:
            return torch.full_like(self.m2, float("inf"))
        return (self.m2 / (self.count - 1) / self.count).sqrt() * t_factor(self.count - 1)


class PermutationSampler:
    """Castro permutation sampling; `antithetic=True`: each sample is an order and its reverse."""

    def __init__(self, n_players: int, seed: int, antithetic: bool = False) -> None:
        self.n = n_players
        self.rng = np.random.default_rng(seed)
        self.antithetic = antithetic
        self.moments = RunningMoments()
        self._pending = np.zeros((0, n_players), dtype=np.int64)

    @property
    def n_samples(self) -> int:
        return self.moments.count

    def fixed(self) -> torch.Tensor:
        """Coalitions every sample shares: the empty and the full one."""
        return torch.stack(
            [torch.zeros(self.n, dtype=torch.bool), torch.ones(self.n, dtype=torch.bool)]
        )

    def set_fixed(self, values: torch.Tensor) -> None:
        """Nothing to precompute: the shared coalitions reappear inside every sample."""

    def draw(self, count: int) -> list[torch.Tensor]:
        """`count` samples, each a block of coalitions `bool [k, n]` to evaluate."""
        self._pending = permutations_from(self.rng, self.n, count)
        blocks = []
        for order in self._pending:
            block = prefix_coalitions(order)
            if self.antithetic:
                block = torch.cat([block, prefix_coalitions(order[::-1].copy())])
            blocks.append(block)
        return blocks

    def add(self, blocks: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        """Take the values `[k, D]` of the first `len(blocks)` drawn samples (drops the rest)."""
        if not blocks:
            return
        orders = self._pending[: len(blocks)]
        v = torch.stack(values)  # [m, k, D]
        n = self.n
        marginals = self._marginals(orders, v[:, : n + 1])
        if self.antithetic:
            reverse = self._marginals(orders[:, ::-1].copy(), v[:, n + 1 :])
            marginals = (marginals + reverse) / 2
        self.moments.add(marginals)

    @staticmethod
    def _marginals(orders: np.ndarray, prefix_values: torch.Tensor) -> torch.Tensor:
        """Per player marginal contributions `[m, n, D]` from values along each order."""
        diffs = prefix_values[:, 1:] - prefix_values[:, :-1]  # by position
        rank = torch.from_numpy(np.argsort(orders, axis=1, kind="stable"))
        index = rank[:, :, None].expand(-1, -1, diffs.shape[2])
        return diffs.gather(1, index)

    def estimate(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Current values and standard errors, both `[n, D]`."""
        assert self.moments.mean is not None
        return self.moments.mean, self.moments.stderr()
