"""Compression by search: remove what the model needs least *at the operating point*.

Shapley values average a unit's contribution over coalitions of every size; compression asks
about coalitions near the full model. So the search measures there, with the game itself:

1. leave-one-out: the loss increase of every single removal (n + 1 coalitions);
2. greedy rounds: each round re-evaluates, on top of what is already removed, the few most
   promising units of every pool (the units a round takes plus `width`, by their latest
   measured cost) and takes the cheapest — so a unit that was cheap only because a redundant
   partner covered for it is seen once the partner is gone. `rounds` rounds take each pool's
   quota (one unit per pool and round when rounds = quota; several when fewer);
3. optional swap passes: measure what each removed unit costs given the others (adding it back),
   then exchange the costliest removed unit of a pool for its cheapest kept one while that lowers
   the search half's loss by more than its paired standard error and does not raise the check
   half's;
4. the choice: every candidate (the search's set and the priors — leave-one-out, REAP,
   routing frequency, Shapley least-useful, whatever the caller passes) is measured on the check
   half, which ranked nothing, and the lowest wins.

Every step ranks on the search half of the calibration blocks only (`measure.Blocks`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from msa_edit.errors import MsaEditError
from msa_edit.search.measure import Blocks, Removals, TargetMean
from msa_edit.search.quota import Quota
from msa_edit.search.result import Candidate, SearchResult

MAX_DEFAULT_ROUNDS = 8
"""Default rounds: one unit per pool and round up to this many, then several per round."""


@dataclass(frozen=True)
class SearchSettings:
    """Knobs of the greedy search (see the module docstring); the defaults are the measured
    choice of `evals/bench_pruning.py`.

    >>> SearchSettings().rounds_for(2), SearchSettings().rounds_for(64)
    (2, 8)
    """

    rounds: int | None = None
    width: int = 2
    swaps: int = 0

    def __post_init__(self) -> None:
        if self.rounds is not None and self.rounds < 1:
            raise MsaEditError(f"rounds must be >= 1, got {self.rounds}")
        if self.width < 0 or self.swaps < 0:
            raise MsaEditError(f"width and swaps must be >= 0, got {self.width}, {self.swaps}")

    def rounds_for(self, largest_need: int) -> int:
        limit = self.rounds if self.rounds is not None else MAX_DEFAULT_ROUNDS
        return max(1, min(limit, largest_need))


def leave_one_out(removals: Removals, n_players: int) -> torch.Tensor:
    """Loss increase per block of removing each player alone `[n, n_blocks]` (n + 1 coalitions)."""
    return removals([(i,) for i in range(n_players)])


def schedule(quota: Quota, rounds: int) -> list[list[int]]:
    """Units each pool takes in each round: `[round][pool]`, spread as evenly as possible.

    >>> from msa_edit.plan import Budget
    >>> from msa_edit.units import Unit
    >>> units = [Unit(la, "experts", e) for la in range(2) for e in range(8)]
    >>> schedule(Quota.from_budget(units, Budget(per_layer=3)), 2)
    [[2, 2], [1, 1]]
    """
    left = list(quota.need)
    out = []
    for r in range(rounds):
        take = [math.ceil(n / (rounds - r)) for n in left]
        left = [n - t for n, t in zip(left, take, strict=True)]
        out.append(take)
    return out


def search_cost(quota: Quota, settings: SearchSettings, n_priors: int) -> int:
    """Most distinct coalitions `search_compression` can use (fewer when sets repeat)."""
    rounds = settings.rounds_for(max(quota.need))
    cost = 1 + len(quota.units) + 1 + n_priors  # intact, leave-one-out, its set, the priors
    removed = [0] * len(quota.pools)
    for take in schedule(quota, rounds):
        for p, t in enumerate(take):
            if t:
                cost += min(t + settings.width, len(quota.pools[p]) - removed[p])
            removed[p] += t
        cost += 1
    return cost + settings.swaps * (quota.total + len(quota.pools))


def fit_width(quota: Quota, settings: SearchSettings, n_priors: int, budget: int | None) -> int:
    """The widest shortlist (at most `settings.width`) whose search fits `budget`."""
    if budget is None:
        return settings.width
    for width in range(settings.width, 0, -1):
        if search_cost(quota, _with_width(settings, width), n_priors) <= budget:
            return width
    need = search_cost(quota, _with_width(settings, 1), n_priors)
    raise MsaEditError(
        f"a removal search over {len(quota.units)} units taking {quota.total} needs up to {need} "
        f"coalitions (leave-one-out alone is {len(quota.units) + 1}); budget={budget} is too "
        f"small: raise it (plan.coalitions) to at least {need}, lower plan.rounds, or use "
        "method reap"
    )


def _with_width(settings: SearchSettings, width: int) -> SearchSettings:
    return SearchSettings(settings.rounds, width, settings.swaps)


def search_compression(
    removals: Removals,
    blocks: Blocks,
    quota: Quota,
    target: Sequence[str],
    priors: Mapping[str, Collection[int]] | None = None,
    settings: SearchSettings | None = None,
) -> SearchResult:
    """The removal set meeting `quota` with the least loss increase on `target`, by search.

    `removals` evaluates removal sets of `quota.units` (player i = `quota.units[i]`); `priors`
    are complete removal sets from other rankings, measured beside the search's own. Raises
    `MsaEditError` before evaluating anything if the search cannot fit `removals.budget`.
    """
    settings = settings or SearchSettings()
    given = {k: frozenset(v) for k, v in (priors or {}).items() if quota.complete(v)}
    width = fit_width(quota, settings, len(given), _left(removals))
    objective = TargetMean(blocks, target)
    n = len(quota.units)
    loo = leave_one_out(removals, n)
    estimate = objective(loo).tolist()  # latest measured cost of removing each unit
    sets: dict[str, frozenset[int]] = {"leave-one-out": quota.lowest(estimate), **given}
    removed: frozenset[int] = frozenset()
    current = torch.zeros(blocks.n_blocks, dtype=torch.float64)
    trace: list[dict[str, Any]] = []
    rounds = settings.rounds_for(max(quota.need))
    for r, take in enumerate(schedule(quota, rounds)):
        shortlists = []
        for p, t in enumerate(take):
            if t:
                ranked = sorted(quota.open_units(p, removed), key=lambda i: (estimate[i], i))
                shortlists.append((t, ranked[: t + width]))
        trials = [i for _, short in shortlists for i in short]
        deltas = removals([removed | {i} for i in trials])
        gains = (objective(deltas) - float(objective(current[None])[0])).tolist()
        for i, g in zip(trials, gains, strict=True):
            estimate[i] = g
        picked: set[int] = set()
        for t, short in shortlists:
            for i in sorted(short, key=lambda j: (estimate[j], j)):
                if sum(j in short for j in picked) == t:
                    break
                if quota.feasible(removed | picked | {i}):
                    picked.add(i)
        removed = removed | picked
        current = removals([removed])[0]
        trace.append({"round": r, "evaluated": len(trials), "removed": list(quota.name(picked)),
                      "objective": float(objective(current[None])[0])})  # fmt: skip
    sets = {"search": removed, **sets}
    if settings.swaps:
        swapped = _swaps(removals, objective, quota, sets, estimate, settings.swaps, trace)
        if swapped is not None:
            sets = {"search+swaps": swapped, **sets}
    return _choose(removals, objective, quota, sets, loo, trace)


def _left(removals: Removals) -> int | None:
    return None if removals.budget is None else removals.budget - removals.spent


def _swaps(
    removals: Removals,
    objective: TargetMean,
    quota: Quota,
    sets: Mapping[str, frozenset[int]],
    estimate: list[float],
    passes: int,
    trace: list[dict[str, Any]],
) -> frozenset[int] | None:
    """Swap passes from the candidate best on the search half; None if no swap was accepted."""
    names = list(sets)
    deltas = removals([sets[k] for k in names])
    best = names[int(objective(deltas).argmin())]
    base, base_delta = sets[best], deltas[names.index(best)]
    changed = False
    for s in range(passes):
        members = sorted(base)
        if not removals.affordable([base - {j} for j in members]):
            break
        back = removals([base - {j} for j in members])  # what each removed unit costs now
        level = float(objective(base_delta[None])[0])
        cost = dict(zip(members, (level - objective(back)).tolist(), strict=True))
        moves = []
        for pool in quota.pools:
            inside = [i for i in pool if i in base]
            outside = [i for i in pool if i not in base]
            if not inside or not outside:
                continue
            out = max(inside, key=lambda i: (cost[i], -i))
            inn = min(outside, key=lambda i: (estimate[i], i))
            move = (base - {out}) | {inn}
            if estimate[inn] < cost[out] and quota.feasible(move):
                moves.append(move)
        if not moves or not removals.affordable(moves):
            break
        trial = removals(moves)
        kept = []
        for move, delta in zip(moves, trial, strict=True):
            gain, se = objective.better_by(base_delta, delta, "search")
            check, _ = objective.better_by(base_delta, delta, "check")
            if gain > se and check >= 0:
                kept.append((gain, move, delta))
        trace.append({"swap_pass": s, "tried": len(moves), "accepted": len(kept)})
        if not kept:
            break
        gain, base, base_delta = max(kept, key=lambda m: m[0])
        changed = True
    return base if changed else None


def _choose(
    removals: Removals,
    objective: TargetMean,
    quota: Quota,
    sets: Mapping[str, frozenset[int]],
    loo: torch.Tensor,
    trace: list[dict[str, Any]],
) -> SearchResult:
    """Measure every candidate on both halves and take the lowest on the check half."""
    candidates = measure(removals, objective, quota, sets)
    chosen = min(candidates, key=lambda c: c.check).name  # ties: the first listed
    return result(removals, objective.blocks, quota, sets, candidates, chosen, loo, trace)


def measure(
    removals: Removals,
    objective: TargetMean,
    quota: Quota,
    sets: Mapping[str, frozenset[int]],
    feasible: Callable[[torch.Tensor], bool] | None = None,
) -> tuple[Candidate, ...]:
    """Every removal set of `sets` evaluated as a `Candidate` (with `feasible(delta)`, if given)."""
    deltas = removals(list(sets.values()))
    return tuple(
        objective.candidate(name, quota, sets[name], d, None if feasible is None else feasible(d))
        for name, d in zip(sets, deltas, strict=True)
    )


def result(
    removals: Removals,
    blocks: Blocks,
    quota: Quota,
    sets: Mapping[str, frozenset[int]],
    candidates: tuple[Candidate, ...],
    chosen: str | None,
    loo: torch.Tensor,
    trace: list[dict[str, Any]],
) -> SearchResult:
    """The `SearchResult` choosing `sets[chosen]` (nothing, named "none", when `chosen` is None)."""
    per_set, se = blocks.per_set(loo, "all")
    return SearchResult(
        units=() if chosen is None else tuple(sorted(quota.units[i] for i in sets[chosen])),
        chosen="none" if chosen is None else chosen,
        candidates=candidates,
        loo=per_set,
        loo_stderr=se,
        n_evaluations=removals.spent,
        rounds=tuple(trace),
    )
