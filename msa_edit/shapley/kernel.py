"""Paired KernelSHAP: Shapley values as the game's best additive fit under the Shapley kernel.

The Shapley values solve exactly
    min_phi  sum_{0<|S|<n} mu(S) (v(S) - v(0) - sum_{i in S} phi_i)^2
    s.t.     sum_i phi_i = v(N) - v(0)
with mu(S) = (n-1) / (C(n,|S|) |S| (n-|S|)) (Lundberg & Lee 2017; Charnes et al. 1988). The kernel
puts most weight on the smallest and largest coalitions, so every size whose whole stratum fits the
budget is enumerated exactly; the remaining sizes are sampled in complementary pairs (S, N minus S),
which cancels the odd-order part of the error (Covert & Lee 2021). Standard errors come from the
delta method over the sampled pairs. Every coalition's evaluation informs every player, which is
why this needs far fewer coalitions than permutation sampling on games that are close to additive.
"""

from __future__ import annotations

from itertools import combinations
from math import comb

import numpy as np
import torch

from msa_edit.shapley.intervals import t_factor


def size_weights(n_players: int) -> torch.Tensor:
    """Total kernel weight W[s] = (n-1)/(s(n-s)) of each coalition size s (0 for s = 0, n)."""
    n = n_players
    w = torch.zeros(n + 1, dtype=torch.float64)
    for s in range(1, n):
        w[s] = (n - 1) / (s * (n - s))
    return w


def plan_strata(n_players: int, budget: int, exact_ends: int | None = None) -> list[int]:
    """Coalition sizes to enumerate in full: sizes 1 and n-1 whenever they fit (they make the fit
    well-posed: with only a few sampled pairs it is near-singular), then further sizes from the
    outside in while their share of the budget covers every coalition of that size. With
    `exact_ends` (a game whose values are exact only that close to either end), no size beyond.

    >>> plan_strata(10, 21), plan_strata(10, 22), plan_strata(10, 300), plan_strata(10, 300, 1)
    ([], [1, 9], [1, 9, 2, 8], [1, 9])
    """
    n = n_players
    w = size_weights(n)
    remaining = budget - 2
    open_weight = float(w.sum())
    enumerated: list[int] = []
    for s in range(1, (n // 2 if exact_ends is None else min(n // 2, exact_ends)) + 1):
        sizes = [s] if 2 * s == n else [s, n - s]
        count = sum(comb(n, t) for t in sizes)
        weight = float(sum(w[t] for t in sizes))
        share_covers = remaining * weight / open_weight >= count - 1e-9
        if count > remaining or not (share_covers or s == 1):
            break
        enumerated += sizes
        remaining -= count
        open_weight -= weight
    return enumerated


def _subsets(n: int, size: int) -> torch.Tensor:
    rows = torch.zeros((comb(n, size), n), dtype=torch.bool)
    for r, members in enumerate(combinations(range(n), size)):
        rows[r, list(members)] = True
    return rows


def constrained_solve(
    a: torch.Tensor, b: torch.Tensor, total: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Solve min phi'A phi - 2 b'phi s.t. 1'phi = total, per output column.

    Returns phi `[n, D]` and C `[n, n]`, the map from perturbations of (b - A phi) to phi.
    """
    n = a.shape[0]
    inv, info = torch.linalg.inv_ex(a)
    if int(info) != 0 or not bool(torch.isfinite(inv).all()):
        inv = torch.linalg.pinv(a, hermitian=True)
    ones = torch.ones(n, dtype=a.dtype)
    inv_1 = inv @ ones
    inv_b = inv @ b
    scale = (inv_b.sum(0) - total) / inv_1.sum()
    phi = inv_b - inv_1[:, None] * scale[None, :]
    c = inv - torch.outer(inv_1, inv_1) / inv_1.sum()
    return phi, c


def min_pairs(n_players: int) -> int:
    """Sampled pairs before the kernel's stderr is finite: ceil(n / 2), at least 2. With fewer,
    the error is mostly the regression's bias at few samples, which no stderr of the samples
    shows (measured in `evals/bench_calibration.py`: 95 % intervals covered 29-48 % with two
    pairs on 60- and 200-player games, 92-96 % from n / 2).

    >>> min_pairs(10), min_pairs(3)
    (5, 2)
    """
    return max(2, (n_players + 1) // 2)


class KernelSampler:
    """Paired KernelSHAP, extreme sizes enumerated; one sample = one pair (S, N minus S)."""

    def __init__(
        self, n_players: int, seed: int, budget: int, exact_ends: int | None = None
    ) -> None:
        self.n = n_players
        self.rng = np.random.default_rng(seed)
        weights = size_weights(n_players)
        self.enumerated = plan_strata(n_players, budget, exact_ends)
        open_sizes = [s for s in range(1, n_players) if s not in self.enumerated]
        self.open_sizes = np.array(open_sizes, dtype=np.int64)
        self.open_weight = float(weights[open_sizes].sum()) if open_sizes else 0.0
        self.probs = (weights[open_sizes] / self.open_weight).numpy() if open_sizes else None
        self._fixed = torch.cat(
            [
                torch.zeros((1, n_players), dtype=torch.bool),
                torch.ones((1, n_players), dtype=torch.bool),
                *(_subsets(n_players, s) for s in self.enumerated),
            ]
        )
        mu = torch.tensor(
            [weights[s] / comb(n_players, s) for s in self._fixed[2:].sum(1).tolist()],
            dtype=torch.float64,
        )
        self._mu_fixed = mu
        self._z: list[torch.Tensor] = []
        self._y: list[torch.Tensor] = []
        self.a_fixed = torch.zeros((n_players, n_players), dtype=torch.float64)
        self.b_fixed: torch.Tensor | None = None

    @property
    def n_samples(self) -> int:
        return sum(len(z) for z in self._z)

    def fixed(self) -> torch.Tensor:
        """The empty and full coalition, then every coalition of the enumerated sizes."""
        return self._fixed

    def set_fixed(self, values: torch.Tensor) -> None:
        self.v_empty = values[0]
        self.v_full = values[1]
        z = self._fixed[2:].double()
        weighted = z * self._mu_fixed[:, None]
        self.a_fixed = weighted.T @ z
        self.b_fixed = weighted.T @ (values[2:] - self.v_empty)

    def draw(self, count: int) -> list[torch.Tensor]:
        if self.probs is None:
            return []
        sizes = self.rng.choice(self.open_sizes, size=count, p=self.probs)
        rank = np.argsort(
            np.argsort(self.rng.random((count, self.n)), axis=1, kind="stable"), axis=1
        )
        inside = torch.from_numpy(rank < sizes[:, None])
        return [torch.stack([row, ~row]) for row in inside]

    def add(self, blocks: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        if not blocks:
            return
        self._z.append(torch.stack([b[0] for b in blocks]))
        self._y.append(torch.stack(values) - self.v_empty)  # [m, 2, D]

    def estimate(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Current values and delta-method standard errors, both `[n, D]`."""
        assert self.b_fixed is not None
        a, b = self.a_fixed.clone(), self.b_fixed.clone()
        m = self.n_samples
        if m:
            z = torch.cat(self._z).double()
            y = torch.cat(self._y)
            zc = 1.0 - z
            scale = self.open_weight / (2 * m)
            a += scale * (z.T @ z + zc.T @ zc)
            b += scale * (z.T @ y[:, 0] + zc.T @ y[:, 1])
        phi, c = constrained_solve(a, b, self.v_full - self.v_empty)
        if self.probs is None:
            return phi, torch.zeros_like(phi)  # every coalition size enumerated: exact
        if m < min_pairs(self.n):
            return phi, torch.full_like(phi, float("inf"))
        return phi, self._stderr(phi, c, z, y)

    def _stderr(
        self, phi: torch.Tensor, c: torch.Tensor, z: torch.Tensor, y: torch.Tensor
    ) -> torch.Tensor:
        """Jackknife over the sampled pairs: phi without pair i is exact by the Woodbury identity
        (the pair adds w/2m (z z' + z^c z^c') to A), phi_(-i) - phi = -w/2m C U (I - H_i)^-1 r_i
        with U = [z, z^c], H_i = w/2m U'CU and r_i its residuals. Dividing by I - H_i is what the
        plain delta method leaves out: when a few pairs decide many players' values, their
        residuals are small only because the fit passes through them. A pair the fit cannot do
        without (H_i singular) makes every stderr infinite: the values are not estimable yet.
        Scaled by `t_factor(m - 1)` so that ±1.96 stderr is a 95 % interval with m pairs."""
        m = z.shape[0]
        zc = 1.0 - z
        r = y[:, 0] - z @ phi  # [m, D] residual of S
        rc = y[:, 1] - zc @ phi  # residual of the complement
        cz, czc = z @ c, zc @ c  # [m, n] (C symmetric)
        s = self.open_weight / (2 * m)
        h11, h12, h22 = s * (cz * z).sum(1), s * (cz * zc).sum(1), s * (czc * zc).sum(1)
        det = (1 - h11) * (1 - h22) - h12 * h12
        if not bool((det > 1e-9).all()):
            return torch.full_like(phi, float("inf"))
        r_out = (((1 - h22) / det)[:, None] * r + (h12 / det)[:, None] * rc) * s
        rc_out = ((h12 / det)[:, None] * r + ((1 - h11) / det)[:, None] * rc) * s

        def change(rows: slice) -> torch.Tensor:  # [k, n, D]: phi - phi_(-i)
            return (
                cz[rows, :, None] * r_out[rows, None, :]
                + czc[rows, :, None] * rc_out[rows, None, :]
            )

        chunk = max(1, (1 << 22) // max(1, phi.numel()))
        mean = sum(change(slice(i, i + chunk)).sum(0) for i in range(0, m, chunk)) / m
        sq = sum(((change(slice(i, i + chunk)) - mean) ** 2).sum(0) for i in range(0, m, chunk))
        return (torch.as_tensor(sq) * (m - 1) / m).sqrt() * t_factor(m - 1)
