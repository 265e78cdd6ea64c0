"""What a removal set costs, measured with the lesion game on blocks of calibration text.

The game gives one loss per calibration block (e.g. `games.RowNLL`: mean next-token NLL of each
row). `Blocks` says which target set each block belongs to and splits every set into two halves:
the *search* half ranks moves, the *check* half never does — it confirms moves and picks among
finished candidates, so a choice fitted to the search half's noise shows up there. `Removals`
evaluates removal sets as coalitions (each distinct one once, through the coalition cache)
within a budget and returns each block's loss increase over the intact model.
"""

from __future__ import annotations

import math
import os
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from msa_edit.errors import MsaEditError
from msa_edit.fingerprint import Value
from msa_edit.search.quota import Quota
from msa_edit.search.result import Candidate
from msa_edit.shapley.cache import CoalitionCache, Game, pack_keys

Half = Literal["search", "check", "all"]
HALVES: tuple[Half, ...] = ("search", "check", "all")


@dataclass(frozen=True)
class Blocks:
    """Target set (`group[b]` indexes `names`) and half (`check[b]`) of each calibration block.

    >>> b = Blocks.split(("en", "fr"), torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]))
    >>> b.check.int().tolist()
    [0, 1, 0, 1, 0, 1, 0, 1]
    >>> delta = torch.tensor([[1.0, 3.0, 1.0, 3.0, 0.0, 0.0, 2.0, 2.0]])
    >>> b.mean_se(delta, [0, 1], "all")[0].tolist(), b.mean_se(delta, [0], "check")[0].tolist()
    ([1.5], [3.0])
    """

    names: tuple[str, ...]
    group: torch.Tensor
    check: torch.Tensor

    @classmethod
    def split(cls, names: Sequence[str], group: torch.Tensor) -> Blocks:
        """Alternate each set's blocks between the halves (1st search, 2nd check, ...); every
        set needs at least 4 blocks so each half has two (a standard error needs two)."""
        group = group.long()
        check = torch.zeros_like(group, dtype=torch.bool)
        for s, name in enumerate(names):
            rows = torch.nonzero(group == s).flatten()
            if rows.numel() < 4:
                raise MsaEditError(
                    f"target set {name!r} has {rows.numel()} blocks; a removal search needs at "
                    "least 4 per set (two to rank moves, two to check them): raise its n_seq"
                )
            check[rows[1::2]] = True
        return cls(tuple(names), group, check)

    @property
    def n_blocks(self) -> int:
        return int(self.group.numel())

    def columns(self, wanted: Sequence[str]) -> list[int]:
        """Indices of the named target sets."""
        missing = [w for w in wanted if w not in self.names]
        if missing:
            raise MsaEditError(f"target sets {missing} are not among {list(self.names)}")
        return [self.names.index(w) for w in wanted]

    def _mask(self, half: Half) -> torch.Tensor:
        if half == "all":
            return torch.ones_like(self.check)
        return self.check if half == "check" else ~self.check

    def per_set(self, delta: torch.Tensor, half: Half) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean increase per target set `[R, T]` over the half's blocks, and its stderr."""
        mask = self._mask(half)
        means, ses = [], []
        for s in range(len(self.names)):
            cols = delta[:, mask & (self.group == s)].double()
            means.append(cols.mean(1))
            ses.append(cols.std(1) / math.sqrt(cols.shape[1]))
        return torch.stack(means, 1), torch.stack(ses, 1)

    def mean_se(
        self, delta: torch.Tensor, sets: Sequence[int], half: Half
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Unweighted mean over `sets` of each set's mean increase `[R]`, and its stderr (sets
        are independent samples of blocks). Pass differences of two removal sets' increases for
        a paired comparison."""
        mean, se = self.per_set(delta, half)
        cols = list(sets)
        return mean[:, cols].mean(1), se[:, cols].pow(2).sum(1).sqrt() / len(cols)


class Removals:
    """Loss increase per block `[R, n_blocks]` of removal sets, within `budget` coalitions.

    A removal set is a collection of player indices; its coalition keeps every other player.
    Each distinct coalition is evaluated once (the intact one included) and counts once
    against `budget`; a call that would exceed it raises `MsaEditError` before evaluating.

    >>> costs = torch.tensor([[1.0, 2.0], [3.0, 4.0], [0.5, 0.5]], dtype=torch.float64)
    >>> game = lambda c: (~c).double() @ costs                          # additive loss
    >>> r = Removals(game, 3, budget=3, progress=False)
    >>> r([{0}, {0, 2}]).tolist(), r.spent
    ([[1.0, 2.0], [1.5, 2.5]], 3)
    """

    def __init__(
        self,
        game: Game,
        n_players: int,
        budget: int | None = None,
        batch_size: int = 8,
        *,
        checkpoint: str | os.PathLike[str] | None = None,
        progress: bool | None = None,
        fingerprint: Mapping[str, Value] | None = None,
    ) -> None:
        self.n_players = n_players
        self.budget = budget
        self.cache = CoalitionCache(
            game, n_players, batch_size, checkpoint, progress=progress, total=budget,
            fingerprint=fingerprint,
        )  # fmt: skip
        self._used: set[bytes] = set()
        self._full: torch.Tensor | None = None

    @property
    def spent(self) -> int:
        """Distinct coalitions this search has used (resumed ones included)."""
        return len(self._used)

    def coalitions(self, removals: Sequence[Collection[int]]) -> torch.Tensor:
        """Coalitions `bool [R, n]` keeping everything but each removal set."""
        out = torch.ones(len(removals), self.n_players, dtype=torch.bool)
        for row, removed in enumerate(removals):
            out[row, list(removed)] = False
        return out

    def cost(self, removals: Sequence[Collection[int]]) -> int:
        """How many of these removal sets would be new coalitions."""
        return len(set(pack_keys(self.coalitions(removals))) - self._used)

    def affordable(self, removals: Sequence[Collection[int]]) -> bool:
        return self.budget is None or self.spent + self.cost(removals) <= self.budget

    def values(self, removals: Sequence[Collection[int]]) -> torch.Tensor:
        """Raw game values `float64 [R, n_blocks]` of the removal sets."""
        coalitions = self.coalitions(removals)
        new = set(pack_keys(coalitions)) - self._used
        if self.budget is not None and self.spent + len(new) > self.budget:
            raise MsaEditError(
                f"the removal search needs more than its budget of {self.budget} coalitions; "
                "raise it (plan.coalitions) or lower plan.width / plan.rounds"
            )
        self._used |= new
        return self.cache.get(coalitions).reshape(len(removals), -1)

    def __call__(self, removals: Sequence[Collection[int]]) -> torch.Tensor:
        if self._full is None:
            self._full = self.values([()])[0]
        if not removals:
            return torch.zeros(0, self._full.numel(), dtype=torch.float64)
        return self.values(removals) - self._full

    def close(self) -> None:
        self.cache.close()


class TargetMean:
    """Mean loss increase over some target sets, per half, with paired comparisons."""

    def __init__(self, blocks: Blocks, target: Sequence[str]) -> None:
        self.blocks = blocks
        self.sets = blocks.columns(target)

    def __call__(self, delta: torch.Tensor, half: Half = "search") -> torch.Tensor:
        return self.blocks.mean_se(delta, self.sets, half)[0]

    def better_by(self, base: torch.Tensor, new: torch.Tensor, half: Half) -> tuple[float, float]:
        """How much lower `new` is than `base` on `half` (paired over blocks), and its stderr."""
        mean, se = self.blocks.mean_se((base - new)[None], self.sets, half)
        return float(mean[0]), float(se[0])

    def candidate(
        self,
        name: str,
        quota: Quota,
        removed: Collection[int],
        delta: torch.Tensor,
        feasible: bool | None = None,
    ) -> Candidate:
        """The removal set `removed` with its per-block increase `delta`, as a `Candidate`."""
        row = delta[None]
        per_set, _ = self.blocks.per_set(row, "all")
        _, se = self.blocks.mean_se(row, self.sets, "all")
        return Candidate(
            name=name,
            units=quota.name(removed),
            search=float(self(row, "search")[0]),
            check=float(self(row, "check")[0]),
            all=float(self(row, "all")[0]),
            stderr=float(se[0]),
            per_set={n: float(per_set[0, t]) for t, n in enumerate(self.blocks.names)},
            feasible=feasible,
        )
