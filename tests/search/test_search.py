"""Removal search on planted games whose best removal set is known by enumeration."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import pytest
import torch

from msa_edit.errors import MsaEditError
from msa_edit.plan import Budget, make_plan
from msa_edit.search import (
    Blocks,
    Quota,
    Removals,
    SearchSettings,
    leave_one_out,
    search_compression,
    search_cost,
    search_targeted,
)
from msa_edit.shapley import estimate
from msa_edit.units import Unit

UNITS = [Unit(layer, "experts", e) for layer in range(2) for e in range(6)]
A, B, X = 1, 2, 4  # layer 0: redundant pair (a, b); x is needed only in small coalitions
COST = torch.tensor(
    [0.30, 0.02, 0.03, 0.10, 0.04, 0.20, 0.50, 0.01, 0.02, 0.30, 0.40, 0.03], dtype=torch.float64
)
N_BLOCKS = 16
NAMES = ("en", "fr")
GROUP = torch.arange(N_BLOCKS) % 2
SCALE = 0.8 + 0.4 * torch.rand(N_BLOCKS, generator=torch.Generator().manual_seed(0)).double()


def planted(coalitions: torch.Tensor) -> torch.Tensor:
    """Per-block loss: additive costs, +0.5 when a and b are both gone, +5 when x is gone with
    three or more of its layer (near the full model x is cheap; in small coalitions it is not)."""
    gone = (~coalitions).double()
    loss = gone @ COST
    loss = loss + 0.5 * gone[:, A] * gone[:, B]
    loss = loss + 5.0 * gone[:, X] * (gone[:, :6].sum(1) >= 4).double()
    return 3.0 + loss[:, None] * SCALE[None]


def total(removed: set[int]) -> float:
    keep = torch.ones(1, len(UNITS), dtype=torch.bool)
    keep[0, list(removed)] = False
    return float(planted(keep).mean())


def best_by_enumeration(k: int) -> frozenset[int]:
    layers = [range(6), range(6, 12)]
    best = min(
        itertools.product(*(itertools.combinations(r, k) for r in layers)),
        key=lambda sets: total({i for s in sets for i in s}),
    )
    return frozenset(i for s in best for i in s)


class Counting:
    """The planted game, counting the distinct coalitions it was asked for."""

    def __init__(self) -> None:
        self.seen: set[bytes] = set()

    def __call__(self, coalitions: torch.Tensor) -> torch.Tensor:
        self.seen |= {bytes(row.tolist()) for row in coalitions}
        return planted(coalitions)


def run(k: int = 2, budget: int | None = None, **settings):
    blocks = Blocks.split(NAMES, GROUP)
    game = Counting()
    removals = Removals(game, len(UNITS), budget=budget, progress=False)
    quota = Quota.from_budget(UNITS, Budget(per_layer=k, min_keep_per_layer=2))
    result = search_compression(removals, blocks, quota, NAMES, settings=SearchSettings(**settings))
    return result, game


def test_search_finds_the_best_set_where_loo_and_shapley_do_not() -> None:
    best = best_by_enumeration(2)
    result, _ = run()
    assert {UNITS.index(u) for u in result.units} == best
    assert result.chosen == "search"
    loo = set(result.candidate("leave-one-out").units)
    assert (
        loo != {str(UNITS[i]) for i in best} and {"layers.0.experts.1", "layers.0.experts.2"} <= loo
    )
    exact = estimate(lambda c: planted(c).mean(1), len(UNITS), method="exact", progress=False)
    shapley = make_plan(
        exact.values[:, None],
        exact.stderr[:, None],
        UNITS,
        ["all"],
        target=["all"],
        mode="least_useful",
        budget=Budget(per_layer=2),
    )
    assert {UNITS.index(u) for u in shapley.unit_list} != best
    assert UNITS[X] not in shapley.unit_list  # Shapley keeps x: it matters in small coalitions
    assert total(best) < min(
        total({UNITS.index(u) for u in shapley.unit_list}),
        total({UNITS.index(Unit.parse(n)) for n in loo}),
    )


def test_candidates_report_both_halves_and_loo_matches_direct_evaluation() -> None:
    result, _ = run()
    blocks = Blocks.split(NAMES, GROUP)
    for c in result.candidates:
        removed = {UNITS.index(Unit.parse(n)) for n in c.units}
        keep = torch.ones(1, len(UNITS), dtype=torch.bool)
        keep[0, list(removed)] = False
        delta = planted(keep) - planted(torch.ones(1, len(UNITS), dtype=torch.bool))
        assert c.all == pytest.approx(float(blocks.mean_se(delta, [0, 1], "all")[0]), abs=1e-12)
        assert c.check == pytest.approx(float(delta[0, blocks.check].mean()), abs=1e-12)
    singles = ~torch.eye(len(UNITS), dtype=torch.bool)
    direct = planted(singles) - planted(torch.ones(1, len(UNITS), dtype=torch.bool))
    for t in range(2):
        cols = direct[:, t == GROUP]
        assert torch.allclose(result.loo[:, t], cols.mean(1))
        assert torch.allclose(result.loo_stderr[:, t], cols.std(1) / cols.shape[1] ** 0.5)


def test_the_budget_is_never_exceeded_and_the_shortlist_shrinks_to_fit() -> None:
    quota = Quota.from_budget(UNITS, Budget(per_layer=2, min_keep_per_layer=2))
    full_cost = search_cost(quota, SearchSettings(), n_priors=0)
    for budget in (full_cost, full_cost - 4, search_cost(quota, SearchSettings(width=1), 0)):
        result, game = run(budget=budget)
        assert len(game.seen) <= budget and result.n_evaluations == len(game.seen)
    with pytest.raises(MsaEditError, match=r"raise it \(plan.coalitions\) to at least \d+"):
        run(budget=len(UNITS) + 2)


def test_several_removals_per_round_when_rounds_are_fewer_than_the_quota() -> None:
    result, game = run(k=4, rounds=2)
    assert len(result.units) == 8 and result.n_evaluations == len(game.seen)
    assert [len(r["removed"]) for r in result.rounds] == [4, 4]  # 2 per layer and round


def test_swap_passes_repair_a_bad_start() -> None:
    """From leave-one-out's set (a and b together) a swap trades b for x."""
    blocks = Blocks.split(NAMES, GROUP)
    removals = Removals(planted, len(UNITS), progress=False)
    quota = Quota.from_budget(UNITS, Budget(per_layer=2))
    result = search_compression(
        removals, blocks, quota, NAMES, settings=SearchSettings(rounds=1, width=0, swaps=2)
    )
    names = [c.name for c in result.candidates]
    assert "search+swaps" in names
    assert result.candidate("search+swaps").all < result.candidate("leave-one-out").all


def test_same_inputs_same_choice() -> None:
    first, _ = run()
    second, _ = run()
    assert first.units == second.units and first.candidates == second.candidates
    assert torch.equal(first.loo, second.loo) and first.rounds == second.rounds


# ---------------------------------------------------------------------------------------------
# Targeted removal

TARGET_COST = torch.tensor([0.50, 0.40, 0.30, 0.05, 0.00, 0.00], dtype=torch.float64)
RETAIN_COST = torch.tensor([0.40, 0.01, 0.01, 0.00, 0.00, 0.00], dtype=torch.float64)
TARGET_UNITS = [Unit(0, "experts", e) for e in range(3)] + [Unit(1, "experts", e) for e in range(3)]


def targeted(coalitions: torch.Tensor) -> torch.Tensor:
    """Blocks 0-7 are the target set, 8-15 the retained one. Units 1 and 2 are each harmless to
    the retained set alone but redundant for it: removing both costs it 0.3."""
    gone = (~coalitions).double()
    target = gone @ TARGET_COST
    retain = gone @ RETAIN_COST + 0.3 * gone[:, 1] * gone[:, 2]
    noise = 0.005 * torch.sin(torch.arange(16, dtype=torch.float64))
    return torch.cat([target[:, None].expand(-1, 8), retain[:, None].expand(-1, 8)], 1) + noise


def test_targeted_search_respects_the_retain_bound_that_shapley_plans_break() -> None:
    blocks = Blocks.split(("t", "r"), torch.arange(16) // 8)
    quota = Quota.from_budget(TARGET_UNITS, Budget(per_layer=2))
    removals = Removals(targeted, 6, progress=False)
    exact = estimate(lambda c: torch.stack([targeted(c)[:, :8].mean(1),
                                            targeted(c)[:, 8:].mean(1)], 1),
                     6, method="exact", progress=False)  # fmt: skip
    shapley = make_plan(exact.values, exact.stderr, TARGET_UNITS, ["t", "r"], target=["t"],
                        retain=["r"], budget=Budget(per_layer=2))  # fmt: skip
    prior = {TARGET_UNITS.index(u) for u in shapley.unit_list}
    assert {1, 2} <= prior  # Shapley's selectivity takes the redundant pair
    result = search_targeted(removals, blocks, quota, ["t"], ["r"], {"shapley": prior},
                             retain_bound=0.05)  # fmt: skip
    chosen = {TARGET_UNITS.index(u) for u in result.units}
    assert not {1, 2} <= chosen and 0 not in chosen  # unit 0 hurts the retained set directly
    assert result.candidate("shapley").feasible is False
    assert result.candidate(result.chosen).feasible
    # the best feasible set by enumeration: at most 2 per layer, retained increase <= 0.05
    best = max(
        (
            s
            for n in range(1, 5)
            for s in itertools.combinations(range(6), n)
            if sum(i < 3 for i in s) <= 2
            and sum(i >= 3 for i in s) <= 2
            and float(RETAIN_COST[list(s)].sum()) + 0.3 * (1 in s and 2 in s) <= 0.05
        ),
        key=lambda s: float(TARGET_COST[list(s)].sum()),
    )
    assert float(TARGET_COST[list(chosen)].sum()) == pytest.approx(
        float(TARGET_COST[list(best)].sum())
    )


@pytest.mark.parametrize("ratio", [5.0, 10.0, 30.0, 50.0])
def test_a_selectivity_bound_keeps_the_best_set_of_at_least_that_selectivity(ratio: float) -> None:
    blocks = Blocks.split(("t", "r"), torch.arange(16) // 8)
    quota = Quota.from_budget(TARGET_UNITS, Budget(per_layer=2))
    removals = Removals(targeted, 6, progress=False)
    result = search_targeted(removals, blocks, quota, ["t"], ["r"], min_selectivity=ratio)
    chosen = [TARGET_UNITS.index(u) for u in result.units]

    def cost(s: Sequence[int]) -> tuple[float, float]:
        return float(TARGET_COST[list(s)].sum()), float(RETAIN_COST[list(s)].sum()) + 0.3 * (
            1 in s and 2 in s
        )

    feasible = [
        s
        for n in range(1, 5)
        for s in itertools.combinations(range(6), n)
        if sum(i < 3 for i in s) <= 2 and sum(i >= 3 for i in s) <= 2
        and cost(s)[1] * ratio <= cost(s)[0]
    ]  # fmt: skip
    best = max(cost(s)[0] for s in feasible)
    target, retained = cost(chosen)
    assert target == pytest.approx(best) and retained * ratio <= target
    assert best == (0.45 if ratio <= 45 else 0.05)  # {1, 3} is 45x selective, {3} infinitely


def test_targeted_search_says_none_when_nothing_fits() -> None:
    blocks = Blocks.split(("t", "r"), torch.arange(16) // 8)
    quota = Quota.from_budget(TARGET_UNITS[:1], Budget(per_layer=1))
    removals = Removals(lambda c: targeted(torch.cat([c, torch.ones(len(c), 5, dtype=torch.bool)],
                                                     1)), 1, progress=False)  # fmt: skip
    result = search_targeted(removals, blocks, quota, ["t"], ["r"], retain_bound=0.05)
    assert result.chosen == "none" and result.units == ()


def test_blocks_need_two_per_half() -> None:
    with pytest.raises(MsaEditError, match="at least 4 per set"):
        Blocks.split(("en",), torch.zeros(3, dtype=torch.long))


def test_leave_one_out_costs_n_plus_one() -> None:
    game = Counting()
    removals = Removals(game, len(UNITS), progress=False)
    leave_one_out(removals, len(UNITS))
    assert removals.spent == len(UNITS) + 1 == len(game.seen)
