"""Targeted removal by search: hurt the target sets most while every retained set stays within
its bound — verified by evaluating the removal itself, not only ranked by selectivity.

A retained set's bound is `retain_bound` nats, or (by default) `z` standard errors of that set's
own loss increase over its blocks: the removal may not raise it *detectably*. With
`min_selectivity` r, every retained set may also rise by at most the target's increase / r on each
half (both bounds hold when both are given). Steps:

1. leave-one-out (n + 1 coalitions) gives each unit's specificity: its target increase minus the
   largest retained increase;
2. greedy steps add one unit at a time: the `1 + width` most specific open units of every pool
   are evaluated on top of what is removed; the one that raises the target most while every
   retained set stays within its bound on the search half is taken, if that gain exceeds its
   paired standard error; otherwise the search stops;
3. the check half verifies: the search's candidate is its longest prefix within every bound on
   both halves, and it competes with the priors (e.g. the Shapley plan's units) on the check
   half's target increase among the candidates that respect every bound and whose check-half
   target increase is `z` standard errors above zero (else nothing is chosen).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any

import torch

from msa_edit.errors import MsaEditError
from msa_edit.search.compress import SearchSettings, leave_one_out, measure, result
from msa_edit.search.measure import Blocks, Half, Removals, TargetMean
from msa_edit.search.quota import Quota
from msa_edit.search.result import SearchResult


class _Bounds:
    """Whether removals keep every retained set within its bound, per half."""

    def __init__(
        self,
        gain: TargetMean,
        retain: Sequence[str],
        bound: float | None,
        z: float,
        ratio: float | None = None,
    ) -> None:
        self.blocks = gain.blocks
        self.gain = gain
        self.sets = self.blocks.columns(retain)
        self.bound = bound
        self.z = z
        self.ratio = ratio

    def worst(self, delta: torch.Tensor, half: Half) -> torch.Tensor:
        """The largest retained increase `[R]` (0 when nothing is retained)."""
        if not self.sets:
            return torch.zeros(delta.shape[0], dtype=torch.float64)
        mean, _ = self.blocks.per_set(delta, half)
        return mean[:, self.sets].max(1).values

    def within(self, delta: torch.Tensor, half: Half) -> torch.Tensor:
        """`bool [R]`: every retained set's increase is at most its bound."""
        if not self.sets:
            return torch.ones(delta.shape[0], dtype=torch.bool)
        mean, se = self.blocks.per_set(delta, half)
        mean = mean[:, self.sets]
        if self.bound is not None:
            ok = (mean <= self.bound).all(1)
        elif self.ratio is None:
            ok = (mean <= se[:, self.sets] * self.z).all(1)
        else:
            ok = torch.ones(delta.shape[0], dtype=torch.bool)
        if self.ratio is not None:
            ok &= (mean * self.ratio <= self.gain(delta, half)[:, None]).all(1)
        return ok

    def everywhere(self, delta: torch.Tensor) -> bool:
        return bool(self.within(delta[None], "search")[0] and self.within(delta[None], "check")[0])


def search_targeted(
    removals: Removals,
    blocks: Blocks,
    quota: Quota,
    target: Sequence[str],
    retain: Sequence[str],
    priors: Mapping[str, Collection[int]] | None = None,
    settings: SearchSettings | None = None,
    *,
    retain_bound: float | None = None,
    z: float = 2.0,
    min_selectivity: float | None = None,
) -> SearchResult:
    """At most `quota` units whose removal raises `target` most within the retained bounds.

    `quota.need` are maxima here (a targeted plan may take fewer). The result's `chosen` is
    "none" (and `units` empty) when no candidate respects every bound on both halves.
    """
    if retain_bound is not None and not retain_bound >= 0:
        raise MsaEditError(f"retain_bound must be a number >= 0 (nats), got {retain_bound}")
    if not z > 0:
        raise MsaEditError(f"the retain bound's z must be > 0, got {z}")
    if min_selectivity is not None and not min_selectivity > 0:
        raise MsaEditError(f"min_selectivity must be a number > 0, got {min_selectivity}")
    settings = settings or SearchSettings()
    gain = TargetMean(blocks, target)
    bounds = _Bounds(gain, retain, retain_bound, z, min_selectivity)
    loo = leave_one_out(removals, len(quota.units))
    estimate = (gain(loo) - bounds.worst(loo, "search")).tolist()
    removed: frozenset[int] = frozenset()
    current = torch.zeros(blocks.n_blocks, dtype=torch.float64)
    path: list[tuple[frozenset[int], torch.Tensor]] = []
    trace: list[dict[str, Any]] = []
    while True:
        trials = _shortlist(quota, removed, estimate, 1 + settings.width)
        if not trials or not removals.affordable([removed | {i} for i in trials]):
            break
        deltas = removals([removed | {i} for i in trials])
        step, step_se = blocks.mean_se(deltas - current, gain.sets, "search")
        ok = bounds.within(deltas, "search")
        for row, i in enumerate(trials):
            estimate[i] = float(step[row] - bounds.worst(deltas[row : row + 1], "search")[0])
        usable = [row for row in range(len(trials)) if ok[row] and step[row] > step_se[row]]
        trace.append({"step": len(path), "evaluated": len(trials), "usable": len(usable)})
        if not usable:
            break
        best = max(usable, key=lambda row: (float(step[row]), -trials[row]))
        removed, current = removed | {trials[best]}, deltas[best]
        path.append((removed, current))
        trace[-1]["removed"] = str(quota.units[trials[best]])
    sets: dict[str, frozenset[int]] = {}
    verified = [s for s, d in path if bounds.everywhere(d)]
    if verified:
        sets["search"] = verified[-1]
    for name, prior in (priors or {}).items():
        if prior and quota.feasible(prior) and frozenset(prior) not in sets.values():
            sets[name] = frozenset(prior)
    return _choose(removals, gain, bounds, quota, sets, loo, trace)


def _shortlist(
    quota: Quota, removed: frozenset[int], estimate: list[float], per_pool: int
) -> list[int]:
    """The most specific open units of every pool that can still lose one."""
    out = []
    for p, pool in enumerate(quota.pools):
        if sum(i in removed for i in pool) >= quota.need[p]:
            continue
        open_units = quota.open_units(p, removed)
        out += sorted(open_units, key=lambda i: (-estimate[i], i))[:per_pool]
    return out


def _choose(
    removals: Removals,
    gain: TargetMean,
    bounds: _Bounds,
    quota: Quota,
    sets: Mapping[str, frozenset[int]],
    loo: torch.Tensor,
    trace: list[dict[str, Any]],
) -> SearchResult:
    """Measure the candidates; the largest check-half target increase within every bound wins,
    if it is significant there (`z` standard errors over the check half's blocks)."""
    candidates = measure(removals, gain, quota, sets, bounds.everywhere)
    mean, se = gain.blocks.mean_se(removals(list(sets.values())), gain.sets, "check")
    confirmed = (mean > 0) & (mean > bounds.z * se)  # the cached coalitions: nothing new is spent
    fit = [c for c, ok in zip(candidates, confirmed.tolist(), strict=True) if c.feasible and ok]
    chosen = max(fit, key=lambda c: c.check).name if fit else None  # ties: the first listed
    return result(removals, gain.blocks, quota, sets, candidates, chosen, loo, trace)
