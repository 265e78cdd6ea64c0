"""Benchmark the Shapley estimators of `msa_edit.shapley` against exact values and against msapy.

Games: `mlp_game(n_hidden=10, seed=0)` (scalar) and the same MLP with `per_class=True` (Shapley
modes, shape [3]). With 10 players all 1024 coalitions can be enumerated, so the exact values are
the reference. For every game it measures, over R seeds (seeds 1..R, the same for every cell):

* `estimate(method=m, budget=b)` for m in permutation, antithetic, kernel, auto and budgets b
  (distinct coalitions): RMSE vs exact (root of the mean squared error over players, output dims
  and seeds), mean `n_evaluations`, stderr calibration (share of entries with
  |error| <= 1.96 stderr + 1e-12; about 95% when the stderr is right) and wall time per run;
* msapy 1.7.3 `msa.interface` (lazy, serial) with 10, 25, 50, 100 permutations: RMSE, mean
  objective calls, mean distinct coalitions asked for, and wall time per run;
* the headline: the smallest budget at which `auto`'s RMSE is at most msapy's RMSE at 100
  permutations, found by bisection over integer budgets in [20, 1023] (assumes the RMSE falls with
  the budget), and its ratio to msapy's objective calls and distinct coalitions (goal: <= 1/4).

Results are printed as Markdown tables and written to `evals/results/bench_estimators.json`.
Same seeds give the same numbers (wall times aside). Run from the repository root:

    python evals/bench_estimators.py            # full run, R = 30 (a few minutes on 2 cores)
    python evals/bench_estimators.py --quick    # smoke run, R = 5, fewer budgets
    python -m evals.bench_estimators --seeds 10
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import torch
from msapy import msa

from msa_edit.shapley import Game, estimate
from msa_edit.shapley.estimate import min_budget
from msa_edit.shapley.toys import mlp_game

N_PLAYERS = 10
METHODS = ("permutation", "antithetic", "kernel", "auto")
BUDGETS = (48, 64, 96, 128, 192, 256, 384, 512, 768)
QUICK_BUDGETS = (48, 128, 512)
PERMUTATIONS = (10, 25, 50, 100, 1000)
QUICK_PERMUTATIONS = (10, 100)
REFERENCE_PERMUTATIONS = 100
SEARCH_RANGE = (min_budget("permutation", N_PLAYERS), (1 << N_PLAYERS) - 1)
"""From the smallest budget `auto` accepts to one below exact enumeration."""
CHECK_BELOW = 8
"""Budgets just below the bisection's answer that are probed too, since bisection assumes the RMSE
falls with the budget and auto's RMSE is far from monotone at tiny budgets."""
GOAL_RATIO = 0.25
Z_95 = 1.96
RESULTS_PATH = Path(__file__).resolve().parent / "results" / "bench_estimators.json"


class CountingGame:
    """Wraps a game and counts the coalitions (rows) it is asked for, and how many are distinct."""

    def __init__(self, game: Game) -> None:
        self.game = game
        self.calls = 0
        self.seen: set[bytes] = set()

    def __call__(self, coalitions: torch.Tensor) -> torch.Tensor:
        self.calls += coalitions.shape[0]
        self.seen.update(row.tobytes() for row in np.packbits(coalitions.numpy(), axis=1))
        return self.game(coalitions)


@dataclass(frozen=True)
class Run:
    """One estimator run: its error vs exact, its stderr (if any) and what it cost."""

    error: np.ndarray
    stderr: np.ndarray | None
    evaluations: int
    calls: int
    distinct: int
    seconds: float


@dataclass(frozen=True)
class Cell:
    """One row of a table: a (estimator, method, size) cell aggregated over the seeds."""

    estimator: str
    method: str
    size: int
    evaluations: float
    calls: float
    distinct: float
    rmse: float
    calibration: float | None
    ms_per_run: float

    @property
    def label(self) -> str:
        unit = "perms" if self.estimator == "msapy" else ""
        return f"{self.method}@{self.size}{unit}"


def summarize(estimator: str, method: str, size: int, runs: Sequence[Run]) -> Cell:
    """Aggregate the runs of one cell over the seeds."""
    errors = np.stack([r.error for r in runs])
    stderrs = [r.stderr for r in runs if r.stderr is not None]
    calibration = None
    if len(stderrs) == len(runs):
        calibration = float(np.mean(np.abs(errors) <= Z_95 * np.stack(stderrs) + 1e-12))
    return Cell(
        estimator=estimator,
        method=method,
        size=size,
        evaluations=float(np.mean([r.evaluations for r in runs])),
        calls=float(np.mean([r.calls for r in runs])),
        distinct=float(np.mean([r.distinct for r in runs])),
        rmse=float(np.sqrt(np.mean(errors**2))),
        calibration=calibration,
        ms_per_run=1e3 * float(np.mean([r.seconds for r in runs])),
    )


def run_ours(game: Game, exact: np.ndarray, method: str, budget: int, seed: int) -> Run:
    """One `estimate` run of `method` at `budget`."""
    counter = CountingGame(game)
    start = time.perf_counter()
    res = estimate(counter, N_PLAYERS, method=method, budget=budget, seed=seed, progress=False)
    seconds = time.perf_counter() - start
    return Run(
        error=res.values.numpy() - exact,
        stderr=res.stderr.numpy(),
        evaluations=res.n_evaluations,
        calls=counter.calls,
        distinct=len(counter.seen),
        seconds=seconds,
    )


def msapy_objective(game: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[tuple], Any]:
    """msapy's objective: the tuple of lesioned elements -> float (scalar game) or ndarray."""

    def objective(lesioned: tuple) -> Any:
        mask = torch.ones(N_PLAYERS, dtype=torch.bool)
        mask[list(lesioned)] = False
        out = game(mask[None])[0]
        return float(out) if out.dim() == 0 else out.numpy()

    return objective


def msapy_values(table: Any, output_shape: tuple[int, ...]) -> np.ndarray:
    """Shapley values `[n, *output_shape]` from msapy's result, players in order 0..n-1.

    Scalar games give a ShapleyTable (one row per permutation, one column per element): the values
    are its column means. Vector games give a ShapleyModeND whose column e holds the (already
    averaged) mode of element e, flattened.
    """
    if not output_shape:
        return table.mean()[list(range(N_PLAYERS))].to_numpy(dtype=np.float64)
    modes = [table[e].to_numpy(dtype=np.float64).reshape(output_shape) for e in range(N_PLAYERS)]
    return np.stack(modes)


def run_msapy(game: Game, exact: np.ndarray, n_permutations: int, seed: int) -> Run:
    """One msapy run (lazy, serial, progress bars silenced); `seed` must be >= 1 for msapy."""
    counter = CountingGame(game)
    quiet = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
        table = msa.interface(
            n_permutations=n_permutations,
            elements=list(range(N_PLAYERS)),
            objective_function=msapy_objective(counter),
            random_seed=seed,
            n_parallel_games=1,
            dual_progress_bars=False,
        )
    seconds = time.perf_counter() - start
    return Run(
        error=msapy_values(table, exact.shape[1:]) - exact,
        stderr=None,
        evaluations=len(counter.seen),
        calls=counter.calls,
        distinct=len(counter.seen),
        seconds=seconds,
    )


def ours_cell(game: Game, exact: np.ndarray, method: str, budget: int, seeds: range) -> Cell:
    runs = [run_ours(game, exact, method, budget, s) for s in seeds]
    return summarize("msa_edit", method, budget, runs)


def msapy_cell(game: Game, exact: np.ndarray, n_permutations: int, seeds: range) -> Cell:
    runs = [run_msapy(game, exact, n_permutations, s) for s in seeds]
    return summarize("msapy", "msapy", n_permutations, runs)


def bisect_budget(
    rmse_at: Callable[[int], float], target: float, lo: int, hi: int
) -> tuple[int | None, str]:
    """Smallest budget in [lo, hi] with rmse_at(budget) <= target, assuming the RMSE falls with
    the budget; None if even `hi` misses. The note says whether an end of the range was hit."""
    if rmse_at(lo) <= target:
        return lo, "lower end of the search range"
    if rmse_at(hi) > target:
        return None, "not reached within the search range"
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if rmse_at(mid) <= target:
            hi = mid
        else:
            lo = mid
    return hi, "bisection"


def headline(game: Game, exact: np.ndarray, reference: Cell, seeds: range) -> dict[str, Any]:
    """Where `auto` first matches msapy's RMSE at the reference permutations, and the ratios."""
    probes: dict[int, float] = {}

    def rmse_at(budget: int) -> float:
        if budget not in probes:
            probes[budget] = ours_cell(game, exact, "auto", budget, seeds).rmse
        return probes[budget]

    lo, hi = SEARCH_RANGE
    budget, note = bisect_budget(rmse_at, reference.rmse, lo, hi)
    below = range(0) if budget is None else range(max(lo, budget - CHECK_BELOW), budget)
    if below:
        hits = [b for b in below if rmse_at(b) <= reference.rmse]
        note += f"; budgets {below.start}..{below.stop - 1} checked too: " + (
            f"{hits} also meet the target (RMSE not monotone)" if hits else "all miss the target"
        )
    return {
        "target_rmse": reference.rmse,
        "msapy_permutations": reference.size,
        "msapy_calls": reference.calls,
        "msapy_distinct": reference.distinct,
        "budget": budget,
        "note": note,
        "auto_rmse": None if budget is None else probes[budget],
        "ratio_to_calls": None if budget is None else budget / reference.calls,
        "ratio_to_distinct": None if budget is None else budget / reference.distinct,
        "probes": {str(b): r for b, r in sorted(probes.items())},
    }


def bench_game(
    game: Game, budgets: Sequence[int], permutations: Sequence[int], seeds: range
) -> dict[str, Any]:
    """Exact reference, every estimator cell and the headline for one game."""
    exact = estimate(game, N_PLAYERS, method="exact", progress=False).values.numpy()
    ours = [ours_cell(game, exact, m, b, seeds) for m in METHODS for b in budgets]
    theirs = [msapy_cell(game, exact, p, seeds) for p in permutations]
    matches = [headline(game, exact, c, seeds) for c in theirs]
    return {
        "exact": exact.tolist(),
        "cells": ours + theirs,
        "equal_accuracy": matches,
        "headline": next(h for h in matches if h["msapy_permutations"] == REFERENCE_PERMUTATIONS),
    }


def equal_accuracy_table(matches: Sequence[dict[str, Any]]) -> str:
    """Per msapy cell: the smallest `auto` budget with at most its RMSE, and the ratios."""
    lines = [
        "| msapy perms | msapy calls | msapy distinct | msapy RMSE | auto budget | auto RMSE "
        "| budget / calls | budget / distinct |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for h in matches:
        budget = "n/a" if h["budget"] is None else str(h["budget"])
        lines.append(
            f"| {h['msapy_permutations']} | {h['msapy_calls']:.0f} | {h['msapy_distinct']:.1f} "
            f"| {h['target_rmse']:.4g} | {budget} | {fmt(h['auto_rmse'], '.4g')} "
            f"| {fmt(h['ratio_to_calls'], '.3f')} | {fmt(h['ratio_to_distinct'], '.3f')} |"
        )
    return "\n".join(lines)


def fmt(x: float | None, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def markdown_table(cells: Sequence[Cell]) -> str:
    """Rows = method@budget or msapy@perms; evaluations = distinct coalitions (msapy: calls too)."""
    lines = [
        "| estimator | evaluations | RMSE | calibration | ms/run |",
        "|---|---:|---:|---:|---:|",
    ]
    for c in cells:
        evals = f"{c.distinct:.1f}"
        if c.estimator == "msapy":
            evals = f"{c.calls:.0f} calls / {c.distinct:.1f} distinct"
        calib = fmt(None if c.calibration is None else 100 * c.calibration, ".1f")
        calib = calib if c.calibration is None else calib + "%"
        lines.append(f"| {c.label} | {evals} | {c.rmse:.4g} | {calib} | {c.ms_per_run:.1f} |")
    return "\n".join(lines)


def headline_lines(name: str, h: dict[str, Any]) -> list[str]:
    ref = f"msapy@{h['msapy_permutations']}perms RMSE {h['target_rmse']:.4g}"
    if h["budget"] is None:
        return [f"- {name}: auto does not reach {ref} below budget {SEARCH_RANGE[1] + 1}."]

    def verdict(ratio: float) -> str:
        return "meets" if ratio <= GOAL_RATIO else "misses"

    return [
        f"- {name}: auto reaches {ref} at budget {h['budget']} "
        f"(auto RMSE {h['auto_rmse']:.4g}; {h['note']}).",
        f"  - budget / msapy objective calls = {h['budget']} / {h['msapy_calls']:.1f} = "
        f"{h['ratio_to_calls']:.4f} ({verdict(h['ratio_to_calls'])} the <= 1/4 goal)",
        f"  - budget / msapy distinct coalitions = {h['budget']} / {h['msapy_distinct']:.1f} = "
        f"{h['ratio_to_distinct']:.4f} ({verdict(h['ratio_to_distinct'])} the <= 1/4 goal)",
        "  - auto RMSE at the probed budgets: "
        + ", ".join(f"{b}: {r:.3g}" for b, r in h["probes"].items()),
    ]


def write_json(payload: dict[str, Any], path: Path) -> None:
    """Write atomically: a temp file beside `path`, then os.replace."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, allow_nan=False) + "\n")
    os.replace(tmp, path)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=None, help="seeds per cell (default 30)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 5 seeds, fewer budgets")
    parser.add_argument("--out", type=Path, default=RESULTS_PATH, help="JSON output path")
    args = parser.parse_args(argv)
    if args.seeds is None:
        args.seeds = 5 if args.quick else 30
    if args.seeds < 2:
        parser.error("--seeds must be >= 2")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    budgets = QUICK_BUDGETS if args.quick else BUDGETS
    permutations = QUICK_PERMUTATIONS if args.quick else PERMUTATIONS
    seeds = range(1, args.seeds + 1)  # msapy treats seed 0 as "no seed"
    # The games are tiny: intra-op threads only add synchronisation, which on a loaded 2-core
    # machine made single-coalition calls ~70x slower and the wall times meaningless.
    torch.set_num_threads(1)
    games = {
        "scalar": mlp_game(n_hidden=N_PLAYERS, seed=0),
        "modes": mlp_game(n_hidden=N_PLAYERS, seed=0, per_class=True),
    }
    start = time.perf_counter()
    results = {name: bench_game(g, budgets, permutations, seeds) for name, g in games.items()}
    total = time.perf_counter() - start
    print(f"# Shapley estimators on mlp_game(n_hidden={N_PLAYERS}, seed=0), {args.seeds} seeds\n")
    for name, res in results.items():
        print(f"## {name}\n\n{markdown_table(res['cells'])}\n")
        table = equal_accuracy_table(res["equal_accuracy"])
        print(f"### {name}: auto budget to match msapy\n\n{table}\n")
    print("## Headline\n")
    for name, res in results.items():
        print("\n".join(headline_lines(name, res["headline"])))
    print(f"\nTotal time: {total:.1f} s")
    payload = {
        "config": {
            "game": f"mlp_game(n_hidden={N_PLAYERS}, seed=0)",
            "seeds": list(seeds),
            "budgets": list(budgets),
            "msapy_permutations": list(permutations),
            "search_range": list(SEARCH_RANGE),
            "quick": args.quick,
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "msapy": version("msapy"),
        },
        "games": {
            name: {**res, "cells": [asdict(c) for c in res["cells"]]}
            for name, res in results.items()
        },
        "total_seconds": total,
    }
    write_json(payload, args.out)
    print(f"Wrote {args.out}")
    return payload


if __name__ == "__main__":
    main()
