"""How many units a removal search takes, and from where: a plan `Budget` over a unit list."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

from msa_edit.errors import MsaEditError
from msa_edit.plan import Budget
from msa_edit.units import Unit

Group = tuple[int, str]
"""A (layer, kind) pair: the units one layer has of one kind."""


@dataclass(frozen=True)
class Quota:
    """`pools[p]` (player indices) must lose `need[p]` units; group g may lose at most `cap[g]`.

    A per-layer budget makes one pool per (layer, kind) that loses exactly k (fewer only where
    `min_keep_per_layer` forbids); a fraction makes one pool of all units with per-group caps.

    >>> units = [Unit(la, "experts", e) for la in range(2) for e in range(4)]
    >>> q = Quota.from_budget(units, Budget(per_layer=2, min_keep_per_layer=2))
    >>> q.pools, q.need, q.total
    (((0, 1, 2, 3), (4, 5, 6, 7)), (2, 2), 4)
    >>> Quota.from_budget(units, Budget(fraction=0.5, min_keep_per_layer=3)).need
    (2,)
    """

    units: tuple[Unit, ...]
    pools: tuple[tuple[int, ...], ...]
    need: tuple[int, ...]
    cap: Mapping[Group, int]

    @classmethod
    def from_budget(
        cls,
        units: Sequence[Unit],
        budget: Budget,
        layer_sizes: Mapping[Group, int] | None = None,
    ) -> Quota:
        units = tuple(units)
        groups: dict[Group, list[int]] = {}
        for i, u in enumerate(units):
            groups.setdefault((u.layer, u.kind), []).append(i)
        sizes = layer_sizes or {g: len(members) for g, members in groups.items()}
        cap = {}
        for g, members in groups.items():
            room = max(0, min(len(members), sizes.get(g, len(members)) - budget.min_keep_per_layer))
            cap[g] = room if budget.per_layer is None else min(room, budget.per_layer)
        if budget.per_layer is not None:
            pools = tuple(tuple(groups[g]) for g in sorted(groups))
            need = tuple(cap[g] for g in sorted(groups))
            if budget.fraction is not None:
                need = _trim(need, int(budget.fraction * len(units)))
        else:
            assert budget.fraction is not None
            pools = (tuple(range(len(units))),)
            need = (min(int(budget.fraction * len(units)), sum(cap.values())),)
        if sum(need) == 0:
            raise MsaEditError(
                "the budget leaves nothing to remove (min_keep_per_layer keeps every unit, or "
                "fraction x units < 1); raise per_layer/fraction or lower min_keep_per_layer"
            )
        return cls(units, pools, need, cap)

    @property
    def total(self) -> int:
        return sum(self.need)

    def group(self, i: int) -> Group:
        return (self.units[i].layer, self.units[i].kind)

    def open_units(self, pool: int, removed: Collection[int]) -> list[int]:
        """Units of `pool` not yet removed whose group can still lose one."""
        taken: dict[Group, int] = {}
        for j in removed:
            taken[self.group(j)] = taken.get(self.group(j), 0) + 1
        return [
            i
            for i in self.pools[pool]
            if i not in removed and taken.get(self.group(i), 0) < self.cap[self.group(i)]
        ]

    def feasible(self, removed: Collection[int]) -> bool:
        """Whether a removal set respects every group's cap."""
        taken: dict[Group, int] = {}
        for j in removed:
            taken[self.group(j)] = taken.get(self.group(j), 0) + 1
        return all(n <= self.cap[g] for g, n in taken.items())

    def complete(self, removed: Collection[int]) -> bool:
        """Whether a removal set takes exactly what every pool needs (and respects the caps)."""
        per_pool = [sum(i in removed for i in pool) for pool in self.pools]
        return self.feasible(removed) and per_pool == list(self.need)

    def lowest(self, score: Sequence[float]) -> frozenset[int]:
        """Each pool's `need` units with the lowest score (ties: lower index), caps respected.

        >>> units = [Unit(0, "experts", e) for e in range(4)]
        >>> sorted(Quota.from_budget(units, Budget(per_layer=2)).lowest([3.0, 1.0, 2.0, 0.5]))
        [1, 3]
        """
        chosen: set[int] = set()
        taken: dict[Group, int] = {}
        for pool, need in zip(self.pools, self.need, strict=True):
            got = 0
            for i in sorted(pool, key=lambda j: (score[j], j)):
                if got == need:
                    break
                if taken.get(self.group(i), 0) < self.cap[self.group(i)]:
                    chosen.add(i)
                    taken[self.group(i)] = taken.get(self.group(i), 0) + 1
                    got += 1
        return frozenset(chosen)

    def name(self, removed: Collection[int]) -> tuple[str, ...]:
        return tuple(str(u) for u in sorted(self.units[i] for i in removed))


def _trim(need: tuple[int, ...], limit: int) -> tuple[int, ...]:
    """Lower per-pool needs (last pools first) until they sum to at most `limit`."""
    out = list(need)
    for p in reversed(range(len(out))):
        excess = sum(out) - limit
        if excess <= 0:
            break
        out[p] -= min(out[p], excess)
    return tuple(out)
