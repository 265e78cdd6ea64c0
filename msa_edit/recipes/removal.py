"""Plans chosen without Shapley values: by the game (`loo`, `search`) or by the router (`reap`,
`frequency`), with every candidate the choice was made from recorded in plan.json.

The runner builds the game (one loss per calibration block, `games.RowNLL`) and the routing
statistics; this module turns them, the recipe's plan stage and (when the run directory has one)
the Shapley analysis into a `Plan`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from typing import Any

from msa_edit.errors import MsaEditError
from msa_edit.fingerprint import Value
from msa_edit.games import Targets
from msa_edit.plan import Plan, make_plan, scores
from msa_edit.recipes.schema import PlanStage
from msa_edit.routing import RoutingStats
from msa_edit.search import (
    Blocks,
    Quota,
    Removals,
    SearchResult,
    TargetMean,
    fit_width,
    leave_one_out,
    search_compression,
    search_targeted,
)
from msa_edit.shapley.cache import Game
from msa_edit.tensorjson import decode
from msa_edit.units import Unit

Say = Callable[[str], None]


def choose_removals(
    stage: PlanStage,
    units: Sequence[Unit],
    targets: Targets,
    target: Sequence[str],
    retain: Sequence[str],
    *,
    game: Game | None,
    routing: RoutingStats | None,
    shapley: Mapping[str, Any] | None = None,
    layer_sizes: Mapping[tuple[int, str], int] | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    fingerprint: Mapping[str, Value] | None = None,
    batch_size: int = 8,
    base_model: str = "",
    ranked: Sequence[Unit] | None = None,
    say: Say = print,
) -> Plan:
    """The plan stage for `stage.method` in loo, search, reap, frequency (see `PlanStage`).

    `game(coalitions)` gives one loss per row of `targets` (needed for loo and search);
    `routing` the router statistics of the units (reap, frequency, and the search's priors);
    `shapley` the run's shapley.json record, whose plan becomes one more prior when it covers
    the same units and targets; `ranked` the screen's candidates, most specific first, whose top
    units become another prior. `checkpoint` stores the evaluated coalitions with the game's
    `fingerprint` (see `estimate`).
    """
    units = list(units)
    quota = Quota.from_budget(units, stage.budget(), layer_sizes)
    common: dict[str, Any] = {
        "action": stage.action, "target": list(target), "retain": list(retain),
        "mode": stage.mode, "base_model": base_model, "method": stage.method,
        "budget": {k: v for k, v in asdict(stage.budget()).items() if v is not None},
    }  # fmt: skip
    if stage.method in ("reap", "frequency"):
        if routing is None:
            raise MsaEditError(f"method {stage.method} needs router statistics of experts")
        score = routing.score(stage.method, units)
        chosen = quota.lowest(score.tolist())
        say(f"plan: {stage.method} from one pass over {targets.n_rows} calibration rows")
        return Plan(
            units=tuple(str(units[i]) for i in sorted(chosen)),
            scores={str(u): -float(s) for u, s in zip(units, score, strict=True)},
            **common,
        )
    if game is None:
        raise MsaEditError(f"method {stage.method} needs the lesion game")
    blocks = Blocks.split(targets.names, targets.group)
    removals = Removals(
        game, len(units), stage.coalitions, batch_size, checkpoint=checkpoint,
        fingerprint=fingerprint,
    )  # fmt: skip
    try:
        priors = _priors(stage, units, quota, target, retain, routing, shapley, layer_sizes)
        if ranked:
            rank = {u: r for r, u in enumerate(ranked)}
            priors["screen"] = quota.lowest([float(rank.get(u, math.inf)) for u in units])
        if stage.method == "loo":
            result = _by_loo(stage, removals, blocks, units, quota, target, retain, layer_sizes)
        elif stage.mode == "least_useful":
            result = search_compression(
                removals, blocks, quota, target, priors, stage.search_settings()
            )
        else:
            result = search_targeted(
                removals, blocks, quota, target, retain, priors, stage.search_settings(),
                retain_bound=stage.retain_bound, z=stage.retain_z,
                min_selectivity=stage.min_selectivity,
            )  # fmt: skip
    finally:
        removals.close()
    for line in candidate_lines(result, stage.mode):
        say(line)
    if not result.units:
        raise MsaEditError(
            f"plan: no removal raises {', '.join(target)} significantly while every retained set "
            "stays within its bound on both halves of the calibration text; add calibration text "
            "(n_seq), "
            "raise plan.retain_bound or retain_z, lower plan.min_selectivity, or allow more units "
            "per layer"
        )
    values = -result.loo.double()  # a loss increase when removed = how much the unit helps
    score, se = scores(values, result.loo_stderr, targets.names, target, retain, stage.mode)
    return Plan(
        units=tuple(str(u) for u in result.units),
        scores={str(u): round(float(s), 6) for u, s in zip(units, score, strict=True)},
        stderr={str(u): round(float(s), 6) for u, s in zip(units, se, strict=True)},
        search=result.summary() | {
            "coalitions": stage.coalitions, "settings": asdict(stage.search_settings()),
            "blocks": {"search": int((~blocks.check).sum()), "check": int(blocks.check.sum())},
        },
        **common,
    )  # fmt: skip


def check_feasible(
    stage: PlanStage,
    units: Sequence[Unit],
    layer_sizes: Mapping[tuple[int, str], int] | None,
    with_shapley: bool,
) -> None:
    """Raise before anything is written if the plan's budget or coalitions cannot work."""
    quota = Quota.from_budget(list(units), stage.budget(), layer_sizes)
    if stage.method == "search" and stage.mode == "least_useful" and stage.coalitions:
        experts = all(u.spec.routed for u in units)
        fit_width(quota, stage.search_settings(), 2 * experts + with_shapley, stage.coalitions)
    if stage.method in ("loo", "search") and stage.coalitions:
        least = len(units) + 2
        if stage.coalitions < least:
            raise MsaEditError(
                f"plan.coalitions={stage.coalitions} is too small: leave-one-out over "
                f"{len(units)} units alone needs {least}; raise it (plan.coalitions) to at least "
                f"{least}"
            )


def _by_loo(
    stage: PlanStage,
    removals: Removals,
    blocks: Blocks,
    units: list[Unit],
    quota: Quota,
    target: Sequence[str],
    retain: Sequence[str],
    layer_sizes: Mapping[tuple[int, str], int] | None,
) -> SearchResult:
    """Rank by leave-one-out (all blocks) and measure the chosen set as the one candidate."""
    loo = leave_one_out(removals, len(units))
    per_set, se = blocks.per_set(loo, "all")
    plan = make_plan(
        -per_set, se, units, blocks.names, target=target, retain=retain, mode=stage.mode,
        budget=stage.budget(), layer_sizes=dict(layer_sizes) if layer_sizes else None,
    )  # fmt: skip
    chosen = frozenset(units.index(u) for u in plan.unit_list)
    mean = TargetMean(blocks, target)
    candidate = mean.candidate("leave-one-out", quota, chosen, removals([chosen])[0])
    return SearchResult(
        units=tuple(sorted(plan.unit_list)),
        chosen="leave-one-out",
        candidates=(candidate,),
        loo=per_set,
        loo_stderr=se,
        n_evaluations=removals.spent,
    )


def _priors(
    stage: PlanStage,
    units: list[Unit],
    quota: Quota,
    target: Sequence[str],
    retain: Sequence[str],
    routing: RoutingStats | None,
    shapley: Mapping[str, Any] | None,
    layer_sizes: Mapping[tuple[int, str], int] | None,
) -> dict[str, frozenset[int]]:
    """Removal sets of the cheap rankings, measured beside the search's own."""
    out: dict[str, frozenset[int]] = {}
    if routing is not None and stage.mode == "least_useful":
        for name in ("reap", "frequency"):
            out[name] = quota.lowest(routing.score(name, units).tolist())
    if shapley is not None and [str(u) for u in units] == list(shapley.get("units", [])):
        names = list(shapley["targets"])
        if all(t in names for t in [*target, *retain]):
            values = decode(shapley["values"])
            plan = make_plan(
                values, decode(shapley["stderr"]), units, names, target=target,
                retain=retain, mode=stage.mode, budget=stage.budget(),
                layer_sizes=dict(layer_sizes) if layer_sizes else None,
                lower_is_better=bool(shapley.get("lower_is_better", True)),
            )  # fmt: skip
            out["shapley"] = frozenset(units.index(u) for u in plan.unit_list)
    return out


def candidate_lines(result: SearchResult, mode: str) -> list[str]:
    """One progress line per candidate, then the choice and the cost."""
    what = "target increase" if mode == "specific" else "mean loss increase"
    lines = []
    for c in result.candidates:
        fit = "" if c.feasible is None else ("; within bounds" if c.feasible else "; out of bounds")
        lines.append(
            f"plan: candidate {c.name}: {what} {c.check:+.4f} (check half), {c.search:+.4f} "
            f"(search half), {len(c.units)} units{fit}"
        )
    lines.append(f"plan: chose {result.chosen} after {result.n_evaluations} coalitions")
    return lines
