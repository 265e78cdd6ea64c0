"""Surrogate games whose Shapley values are exact: coalition features built from player groups.

A surrogate is a linear combination f(S) = c_0 + sum_j c_j x_j(S) of features x_j of the coalition;
each feature is itself a game with known Shapley values, so phi(f) = `Basis.shapley` @ c exactly.
The features follow the structure of lesion games, where players are grouped by layer and a layer
with most of its units lesioned behaves unlike the sum of its units:

* `products`: x_T(S) = 1 if every player of T is in S (the unanimity game of T; each member of T
  gets 1/|T|), for T a single player or 2-3 players of one group;
* `counts`: x(S) = 1 if exactly a players of group A are in S (and b of group B), a function of how
  many units of a layer (or of two adjacent layers) are intact. Its Shapley value for a member of A
  is P_A(a - 1, b) - P_A(a, b), where P_A(x, y) is the chance that, in a random order, a member of
  A finds x others of A and y of B before it: 1/(m + 1) * C(wA - 1, x) C(wB, y) / C(m, x + y) with
  m = wA - 1 + wB (the other players do not matter to this feature).

`ladder(groups)` builds the nested bases the adjusted estimator chooses from.

>>> basis = ladder([0, 0, 0, 1, 1, 1])[1]
>>> basis.name, basis.n_features
('counts', 10)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations
from math import comb

import torch

MAX_PRODUCT_GROUP = 12
"""Groups larger than this get no 2- and 3-player products (C(w, 3) features would swamp a fit)."""


@dataclass(frozen=True)
class Basis:
    """Features of a coalition and their exact Shapley values.

    `products[k]` holds the (k + 2)-player sets `long [P_k, k + 2]`; `counts` holds per count
    feature the groups and how many of their players are in S; `shapley` is `[n, 1 + n_features]`
    (the constant first: its Shapley values are zero).
    """

    name: str
    n_players: int
    membership: torch.Tensor  # float64 [n, L]: player i in group l
    products: tuple[torch.Tensor, ...]
    count_groups: torch.Tensor  # long [C, 2]: group A, group B (-1: none)
    count_values: torch.Tensor  # long [C, 2]: a, b
    shapley: torch.Tensor

    @property
    def n_features(self) -> int:
        return int(self.shapley.shape[1]) - 1

    def design(self, coalitions: torch.Tensor) -> torch.Tensor:
        """Feature matrix `float64 [B, 1 + n_features]` of coalitions `bool [B, n]`."""
        z = coalitions.double()
        columns = [torch.ones(len(z), 1, dtype=torch.float64), z]
        for sets in self.products:
            columns.append(z[:, sets].prod(-1))
        if len(self.count_groups):
            counts = torch.cat([z @ self.membership, torch.zeros(len(z), 1, dtype=z.dtype)], 1)
            groups = self.count_groups.clone()
            groups[groups < 0] = counts.shape[1] - 1  # the zero column: "none" has 0 players in S
            hit = counts[:, groups] == self.count_values.double()  # [B, C, 2]
            columns.append(hit.all(-1).double())
        return torch.cat(columns, 1)


def _pair_chances(w_a: int, w_b: int) -> torch.Tensor:
    """P_A(x, y) `[w_a + 1, w_b + 2]`, zero where x = w_a or y = w_b + 1 (padding for a - 1, a)."""
    m = w_a - 1 + w_b
    p = torch.zeros(w_a + 1, w_b + 2, dtype=torch.float64)
    for x in range(w_a):
        for y in range(w_b + 1):
            p[x, y] = comb(w_a - 1, x) * comb(w_b, y) / comb(m, x + y) / (m + 1)
    return p


def _count_shapley(
    members: list[torch.Tensor],
    groups: list[tuple[int, int]],
    values: list[tuple[int, int]],
    n: int,
) -> torch.Tensor:
    """Shapley values `[n, C]` of count features (groups[j] = A, B or -1; values[j] = a, b)."""
    out = torch.zeros(n, len(groups), dtype=torch.float64)
    cache: dict[tuple[int, int], torch.Tensor] = {}
    for j, ((ga, gb), (a, b)) in enumerate(zip(groups, values, strict=True)):
        for own, other, x, y in ((ga, gb, a, b), (gb, ga, b, a)):
            if own < 0:
                continue
            w_own = len(members[own])
            w_other = len(members[other]) if other >= 0 else 0
            key = (w_own, w_other)
            if key not in cache:
                cache[key] = _pair_chances(w_own, w_other)
            p = cache[key]
            below = p[x - 1, y] if x >= 1 else 0.0
            out[members[own], j] = float(below - p[x, y])
    return out


def _basis(
    name: str,
    n: int,
    members: list[torch.Tensor],
    counts: bool,
    product_sizes: Sequence[int],
    pairs: Sequence[tuple[int, int]],
) -> Basis:
    """The basis: singletons, the products of `product_sizes` players inside small groups, the
    count features of every group (`counts`) and of the group pairs `pairs`."""
    products: list[torch.Tensor] = []
    for size in product_sizes:
        chosen = [s for g in members if len(g) <= MAX_PRODUCT_GROUP
                  for s in combinations(g.tolist(), size)]  # fmt: skip
        if chosen:
            products.append(torch.tensor(chosen, dtype=torch.long))
    groups: list[tuple[int, int]] = []
    values: list[tuple[int, int]] = []
    for g, players in enumerate(members if counts else []):
        for a in range(len(players) - 1):  # a = w - 1, w: spanned by the constant and singletons
            groups.append((g, -1))
            values.append((a, 0))
    for ga, gb in pairs:
        for a in range(len(members[ga]) - 1):
            for b in range(len(members[gb]) - 1):
                groups.append((ga, gb))
                values.append((a, b))
    membership = torch.zeros(n, len(members), dtype=torch.float64)
    for g, players in enumerate(members):
        membership[players, g] = 1.0
    shapley = [torch.zeros(n, 1, dtype=torch.float64), torch.eye(n, dtype=torch.float64)]
    for product in products:
        block = torch.zeros(n, len(product), dtype=torch.float64)
        block.scatter_(0, product.T, 1.0 / product.shape[1])
        shapley.append(block)
    shapley.append(_count_shapley(members, groups, values, n))
    return Basis(
        name=name,
        n_players=n,
        membership=membership,
        products=tuple(products),
        count_groups=torch.tensor(groups, dtype=torch.long).reshape(-1, 2),
        count_values=torch.tensor(values, dtype=torch.long).reshape(-1, 2),
        shapley=torch.cat(shapley, 1),
    )


def _n_features(
    members: list[torch.Tensor],
    with_counts: bool,
    product_sizes: Sequence[int],
    pairs: Sequence[tuple[int, int]],
) -> int:
    n = sum(len(g) for g in members)
    products = sum(comb(len(g), k) for g in members if len(g) <= MAX_PRODUCT_GROUP
                   for k in product_sizes)  # fmt: skip
    counts = sum(max(0, len(g) - 1) for g in members) if with_counts else 0
    across = sum(max(0, len(members[a]) - 1) * max(0, len(members[b]) - 1) for a, b in pairs)
    return n + products + counts + across


Rung = tuple[str, bool, tuple[int, ...], tuple[tuple[int, int], ...], int]
"""A rung of the ladder: name, whether it has per-group counts, product sizes, group pairs with
count features, feature count."""


def _rungs(groups: Sequence[int]) -> tuple[list[torch.Tensor], list[Rung]]:
    n = len(groups)
    labels = sorted(set(groups))
    members = [torch.tensor([i for i in range(n) if groups[i] == lab]) for lab in labels]
    adjacent = tuple((g, g + 1) for g in range(len(members) - 1))
    rungs: list[Rung] = []
    for name, counts, sizes, pairs in (("linear", False, (), ()), ("counts", True, (), ()),
                                       ("within", True, (2, 3), ()),
                                       ("across", True, (2, 3), adjacent)):  # fmt: skip
        count = _n_features(members, counts, sizes, pairs)
        if not rungs or count > rungs[-1][4]:
            rungs.append((name, counts, sizes, pairs, count))
    return members, rungs


def rung_sizes(groups: Sequence[int]) -> list[int]:
    """Feature count of each rung of `ladder(groups)`, without building them.

    >>> rung_sizes([0, 0, 0, 1, 1, 1]), rung_sizes(list(range(4)))
    ([6, 10, 18, 22], [4])
    """
    return [r[4] for r in _rungs(groups)[1]]


def ladder(groups: Sequence[int], max_features: int | None = None) -> list[Basis]:
    """The nested bases for players with group labels `groups` (e.g. each unit's layer):
    `linear` (singletons: the yardstick the others must beat), `counts` (+ per-group count
    features), `within` (+ 2- and 3-player products inside each group) and `across` (+ count
    features of adjacent groups, by label order). A rung that adds no feature to the one below
    is left out, and so is every rung with more than `max_features` features.

    >>> [b.name for b in ladder([0, 0, 0, 1, 1, 1])], [b.name for b in ladder([0, 1, 2])]
    (['linear', 'counts', 'within', 'across'], ['linear'])
    """
    members, rungs = _rungs(groups)
    return [_basis(name, len(groups), members, counts, sizes, pairs)
            for name, counts, sizes, pairs, count in rungs
            if max_features is None or count <= max_features]  # fmt: skip
