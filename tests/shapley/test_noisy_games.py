"""Games whose values are unbiased estimates except near the ends (`exact_ends`, e.g. a
row-sampled `LesionGame`): the estimators enumerate only the exact sizes, never claim exactness,
and their standard errors include the values' noise."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from msa_edit.errors import MsaEditError
from msa_edit.shapley import estimate
from msa_edit.shapley.kernel import KernelSampler
from msa_edit.shapley.toys import unanimity_game

N = 12
GROUPS = [i // 4 for i in range(N)]


class NoisyGame:
    """A closed-form game plus Gaussian noise of `sd` drawn from each coalition's bits and
    `seed` (the same coalition always gets the same noise), none within one unit of the ends."""

    def __init__(self, sd: float, seed: int, tell: bool = True) -> None:
        g = torch.Generator().manual_seed(1)
        carriers = [torch.randperm(N, generator=g)[: int(torch.randint(1, 5, (1,), generator=g))]
                    for _ in range(3 * N)]  # fmt: skip
        coef = torch.randn(len(carriers), generator=g, dtype=torch.float64)
        self.exact = torch.zeros(N, dtype=torch.float64)
        for members, a in zip(carriers, coef, strict=True):
            self.exact[members] += a / len(members)
        self.game = unanimity_game([c.tolist() for c in carriers], coef)
        self.sd, self.seed = sd, seed
        if tell:
            self.exact_ends = 1

    def __call__(self, coalitions: torch.Tensor) -> torch.Tensor:
        out = self.game(coalitions).clone()
        for b, row in enumerate(coalitions):
            size = int(row.sum())
            if min(size, N - size) > 1:
                key = np.packbits(row.numpy()).tobytes() + self.seed.to_bytes(2, "little")
                digest = hashlib.blake2b(key, digest_size=8).digest()
                rng = np.random.default_rng(int.from_bytes(digest, "little"))
                out[b] += self.sd * rng.standard_normal()
        return out


def coverage(tell: bool, budget: int = 800, seeds: int = 40) -> tuple[float, float]:
    runs = [estimate(NoisyGame(1.0, s, tell), N, "auto", budget, seed=s, progress=False,
                     groups=GROUPS) for s in range(seeds)]  # fmt: skip
    values = torch.stack([r.values for r in runs])
    stderr = torch.stack([r.stderr for r in runs])
    exact = NoisyGame(1.0, 0).exact
    covered = float(((values - exact).abs() <= 1.96 * stderr).double().mean())
    return covered, float((stderr.mean(0) / values.std(0)).median())


def test_noisy_values_get_calibrated_intervals() -> None:
    """95 % intervals cover 90-99 % over 40 seeds (noise and sampling both), stderr / spread
    within 0.7-1.4; a game that does not say it is noisy (enumerated sizes 2 and 10 then carry
    noise no stderr counts, and repeated pairs count as independent) covers less than 90 %."""
    covered, ratio = coverage(tell=True)
    assert 0.9 <= covered <= 0.99 and 0.7 <= ratio <= 1.4, (covered, ratio)
    blind, _ = coverage(tell=False)
    assert blind < 0.9, blind


def test_only_the_exact_sizes_are_enumerated() -> None:
    assert KernelSampler(N, 0, 800).enumerated == [1, 11, 2, 10]
    assert KernelSampler(N, 0, 800, exact_ends=1).enumerated == [1, 11]
    res = estimate(NoisyGame(1.0, 0), N, "auto", progress=False)  # no budget: never exact
    assert res.method == "adjusted" and bool((res.stderr > 0).all())


def test_only_adjusted_runs_and_a_full_budget_is_not_called_exact() -> None:
    with pytest.raises(MsaEditError, match="needs exact values but the game samples its rows"):
        estimate(NoisyGame(1.0, 0), N, "exact", progress=False)
    for method, budget in (("kernel", 100), ("permutation", 100), ("auto", 30)):
        with pytest.raises(MsaEditError, match="only the adjusted estimator counts the rows"):
            estimate(NoisyGame(1.0, 0), N, method, budget, progress=False)
    res = estimate(NoisyGame(1.0, 0), N, "auto", budget=1 << N, progress=False)
    assert res.method == "adjusted" and res.stopped == "exhausted"
    assert bool((res.stderr > 0).all())  # the noise is still there
    exact = estimate(NoisyGame(1.0, 0, tell=False), N, "auto", budget=1 << N, progress=False)
    assert exact.method == "exact" and bool((exact.stderr == 0).all())
