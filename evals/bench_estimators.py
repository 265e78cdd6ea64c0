"""Benchmark the Shapley estimators of `msa_edit.shapley` against exact values and against msapy.

Games: `mlp_game(n_hidden=10, seed=0)` (scalar) and the same MLP with `per_class=True` (Shapley
modes, shape [3]); and two model games with per-language NLL modes (shape [6]) on held-out text:
the 12 experts of a 3-layer x 4-expert tiny MoE (`reroute`) and the 12 heads of a 3-layer dense
tiny transformer (`zero`), both trained on the bundled UD text (`benchlib.MODELS`). Every game is
small enough to enumerate (the model games' 4096 coalitions are evaluated once and cached, then
read from the table), so the exact values are the reference. For every game it measures, over
R seeds (seeds 1..R, the same for every cell):

* `estimate(method=m, budget=b)` for m in permutation, antithetic, kernel, auto and budgets b
  (distinct coalitions): RMSE vs exact (root of the mean squared error over players, output dims
  and seeds), mean `n_evaluations`, stderr calibration (share of entries with
  |error| <= 1.96 stderr + 1e-12; about 95% when the stderr is right) and wall time per run;
* msapy 1.7.3 `msa.interface` (lazy, serial) with 10, 25, 50, 100 permutations: RMSE, mean
  objective calls, mean distinct coalitions asked for, and wall time per run;
* the headline: the smallest budget at which `auto`'s RMSE is at most msapy's RMSE at 100
  permutations, found by bisection over integer budgets in [2n, 2^n - 1] (assumes the RMSE
  falls with the budget), and its ratio to msapy's objective calls and distinct coalitions
  (goal: <= 1/4);
* where shapiq is installed (`pip install shapiq lightgbm`, a benchmark extra, not a
  dependency): its Shapley-value approximators (KernelSHAP and kADD-SHAP with paired sampling,
  SVARM, stratified, permutation and Owen sampling, unbiased KernelSHAP, ProxySPEX) at the same
  budgets on the same games and seeds (a vector game is run once per output, with the same
  seed, so every output sees the same coalitions), and `auto`'s RMSE ÷ the best of them at
  each budget (goal: <= 0.5). ProxySPEX trains a LightGBM proxy per run (about 1-2 s), so it
  runs on the first `PROXYSPEX_SEEDS` seeds only.

Results are printed as Markdown tables and written to `evals/results/bench_estimators.json`.
Same seeds give the same numbers (wall times aside). Run from the repository root:

    python evals/bench_estimators.py            # full run, R = 30 (about 8 minutes on 2 cores)
    python evals/bench_estimators.py --quick    # smoke run, R = 5, fewer budgets
    python evals/bench_estimators.py --seeds 10

The first run also trains the two models (about 3 minutes each) and enumerates their games.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import torch
from benchlib import CountingGame, language_table, run_msapy, unit_layers

from msa_edit.atomic import write_json
from msa_edit.shapley import Game, estimate
from msa_edit.shapley.estimate import min_budget
from msa_edit.shapley.toys import mlp_game

MLP_PLAYERS = 10
METHODS = ("permutation", "antithetic", "kernel", "auto")
BUDGETS = (48, 64, 96, 128, 192, 256, 384, 512, 768)
QUICK_BUDGETS = (48, 128, 512)
PERMUTATIONS = (10, 25, 50, 100, 1000)
QUICK_PERMUTATIONS = (10, 100)
REFERENCE_PERMUTATIONS = 100
MLP_GAMES = ("scalar", "modes")
MODEL_GAMES = (
    ("moe-experts", "moe-small", "layers.*.experts.*"),
    ("dense-heads", "dense", "layers.*.heads.*"),
)
"""Games of trained tiny models (`benchlib.MODELS`) with 12 players each, so exact is feasible
(msapy at 10..100 permutations only: at 1000 it would keep a 10-minute run from finishing)."""
N_SEQ, SEQ_LEN = 2, 32
CHECK_BELOW = 8
"""Budgets just below the bisection's answer that are probed too, since bisection assumes the RMSE
falls with the budget and auto's RMSE is far from monotone at tiny budgets."""
GOAL_RATIO = 0.25
SHAPIQ = {
    "KernelSHAP": {"pairing_trick": True},
    "kADDSHAP": {"pairing_trick": True},
    "SVARM": {},
    "StratifiedSamplingSV": {},
    "PermutationSamplingSV": {},
    "UnbiasedKernelSHAP": {"pairing_trick": True},
    "OwenSamplingSV": {},
    "ProxySPEX": {"index": "SV"},
}
"""shapiq's Shapley-value approximators and their settings (paired sampling where offered)."""
SHAPIQ_BUDGETS = (64, 128, 256, 512)
QUICK_SHAPIQ_BUDGETS = (128, 512)
PROXYSPEX_SEEDS = 5
PEER_GOAL = 0.5
Z_95 = 1.96
RESULTS_PATH = Path(__file__).resolve().parent / "results" / "bench_estimators.json"


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
        prefix = "shapiq " if self.estimator == "shapiq" else ""
        return f"{prefix}{self.method}@{self.size}{unit}"


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


def run_ours(
    game: Game, exact: np.ndarray, method: str, budget: int, seed: int, groups: list[int]
) -> Run:
    """One `estimate` run of `method` at `budget` (players in `groups`: their layers)."""
    counter = CountingGame(game)
    start = time.perf_counter()
    res = estimate(counter, exact.shape[0], method, budget, seed, groups=groups, progress=False)
    seconds = time.perf_counter() - start
    return Run(
        error=res.values.numpy() - exact,
        stderr=res.stderr.numpy(),
        evaluations=res.n_evaluations,
        calls=counter.calls,
        distinct=len(counter.seen),
        seconds=seconds,
    )


def run_theirs(game: Game, exact: np.ndarray, n_permutations: int, seed: int) -> Run:
    """One msapy run (lazy, serial, progress bars silenced); `seed` must be >= 1 for msapy."""
    values, counter, seconds = run_msapy(
        game, exact.shape[0], tuple(exact.shape[1:]), n_permutations, seed
    )
    return Run(
        error=values - exact,
        stderr=None,
        evaluations=len(counter.seen),
        calls=counter.calls,
        distinct=len(counter.seen),
        seconds=seconds,
    )


def run_shapiq(game: Game, exact: np.ndarray, name: str, budget: int, seed: int) -> Run:
    """One shapiq run of approximator `name` at `budget`, one scalar game per output entry."""
    import shapiq.approximator

    n, width = exact.shape[0], int(np.prod(exact.shape[1:]))
    counter = CountingGame(game)
    cache: dict[bytes, np.ndarray] = {}

    def values(coalitions: np.ndarray) -> np.ndarray:
        rows = np.atleast_2d(np.asarray(coalitions, dtype=bool))
        keys = [r.tobytes() for r in rows]
        new = [i for i, k in enumerate(keys) if k not in cache]
        if new:
            out = counter(torch.from_numpy(rows[new])).double().numpy().reshape(len(new), -1)
            cache.update((keys[i], o) for i, o in zip(new, out, strict=True))
        return np.stack([cache[k] for k in keys])

    start = time.perf_counter()
    estimates = []
    for d in range(width):
        approximator = getattr(shapiq.approximator, name)(n=n, random_state=seed, **SHAPIQ[name])
        result = approximator.approximate(budget, lambda c, d=d: values(c)[:, d])
        estimates.append(np.asarray(result.get_n_order_values(1), dtype=np.float64))
    seconds = time.perf_counter() - start
    error = np.stack(estimates, 1).reshape(exact.shape) - exact
    distinct = len(counter.seen)
    return Run(error, None, distinct, counter.calls, distinct, seconds)


def shapiq_cell(game: Game, exact: np.ndarray, name: str, budget: int, seeds: range) -> Cell:
    if name == "ProxySPEX":
        seeds = seeds[:PROXYSPEX_SEEDS]
    runs = [run_shapiq(game, exact, name, budget, s) for s in seeds]
    return summarize("shapiq", name, budget, runs)


def shapiq_available() -> bool:
    try:
        import lightgbm  # noqa: F401 - ProxySPEX's proxy
        import shapiq  # noqa: F401
    except ImportError:
        return False
    return True


def peer_comparison(cells: Sequence[Cell]) -> list[dict[str, Any]]:
    """Per shapiq budget: auto's RMSE, the best shapiq approximator's, and their ratio."""
    rows = []
    for budget in sorted({c.size for c in cells if c.estimator == "shapiq"}):
        auto = next(c for c in cells if c.estimator == "msa_edit" and c.method == "auto"
                    and c.size == budget)  # fmt: skip
        best = min((c for c in cells if c.estimator == "shapiq" and c.size == budget),
                   key=lambda c: c.rmse)  # fmt: skip
        rows.append({"budget": budget, "auto_rmse": auto.rmse, "best": best.method,
                     "best_rmse": best.rmse, "ratio": auto.rmse / best.rmse})  # fmt: skip
    return rows


def peer_table(rows: Sequence[dict[str, Any]]) -> str:
    lines = ["| budget | auto RMSE | best shapiq | its RMSE | auto ÷ best |",
             "|---:|---:|---|---:|---:|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['budget']} | {r['auto_rmse']:.4g} | {r['best']} "
                     f"| {r['best_rmse']:.4g} | {r['ratio']:.2f} |")  # fmt: skip
    return "\n".join(lines)


def ours_cell(
    game: Game, exact: np.ndarray, method: str, budget: int, seeds: range, groups: list[int]
) -> Cell:
    runs = [run_ours(game, exact, method, budget, s, groups) for s in seeds]
    return summarize("msa_edit", method, budget, runs)


def msapy_cell(game: Game, exact: np.ndarray, n_permutations: int, seeds: range) -> Cell:
    runs = [run_theirs(game, exact, n_permutations, s) for s in seeds]
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


def headline(
    game: Game, exact: np.ndarray, reference: Cell, seeds: range, groups: list[int]
) -> dict[str, Any]:
    """Where `auto` first matches msapy's RMSE at the reference permutations, and the ratios."""
    probes: dict[int, float] = {}

    def rmse_at(budget: int) -> float:
        if budget not in probes:
            probes[budget] = ours_cell(game, exact, "auto", budget, seeds, groups).rmse
        return probes[budget]

    lo, hi = search_range(exact.shape[0])
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


def search_range(n_players: int) -> tuple[int, int]:
    """From the smallest budget `auto` accepts to one below exact enumeration."""
    return min_budget("permutation", n_players), (1 << n_players) - 1


def bench_game(
    game: Game,
    n_players: int,
    budgets: Sequence[int],
    permutations: Sequence[int],
    seeds: range,
    groups: list[int],
    peer_budgets: Sequence[int] = (),
) -> dict[str, Any]:
    """Exact reference, every estimator cell and the headline for one game."""
    exact = estimate(game, n_players, method="exact", progress=False).values.numpy()
    ours = [ours_cell(game, exact, m, b, seeds, groups) for m in METHODS for b in budgets]
    theirs = [msapy_cell(game, exact, p, seeds) for p in permutations]
    peers = [shapiq_cell(game, exact, a, b, seeds) for a in SHAPIQ for b in peer_budgets]
    matches = [headline(game, exact, c, seeds, groups) for c in theirs]
    return {
        "exact": exact.tolist(),
        "cells": ours + theirs + peers,
        "vs_shapiq": peer_comparison(ours + peers),
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
        return [f"- {name}: auto does not reach {ref} within the budgets searched."]

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


def games(quick: bool) -> dict[str, tuple[Game, int, str, list[int]]]:
    """The benchmarked games: name -> (game, players, description, each player's layer)."""
    one_layer = [0] * MLP_PLAYERS
    out: dict[str, tuple[Game, int, str, list[int]]] = {
        "scalar": (mlp_game(MLP_PLAYERS, seed=0), MLP_PLAYERS,
                   f"mlp_game({MLP_PLAYERS}), scalar", one_layer),
        "modes": (mlp_game(MLP_PLAYERS, seed=0, per_class=True), MLP_PLAYERS,
                  f"mlp_game({MLP_PLAYERS}, per_class=True), modes [3]", one_layer),
    }  # fmt: skip
    for name, model, units in MODEL_GAMES:
        table = language_table(model, units, N_SEQ, SEQ_LEN)
        what = f"benchlib model {model!r}, {units}, per-language NLL modes [6] (table lookup)"
        out[name] = (table, table.n_players, what, unit_layers(model, units))
    return out


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    budgets = QUICK_BUDGETS if args.quick else BUDGETS
    peer_budgets = () if not shapiq_available() else (
        QUICK_SHAPIQ_BUDGETS if args.quick else SHAPIQ_BUDGETS
    )  # fmt: skip
    if not peer_budgets:
        print("shapiq (or lightgbm) is not installed: no shapiq rows (pip install shapiq lightgbm)")
    permutations = QUICK_PERMUTATIONS if args.quick else PERMUTATIONS
    seeds = range(1, args.seeds + 1)  # msapy treats seed 0 as "no seed"
    # The games are tiny: intra-op threads only add synchronisation, which on a loaded 2-core
    # machine made single-coalition calls ~70x slower and the wall times meaningless.
    torch.set_num_threads(1)
    start = time.perf_counter()
    played = games(args.quick)
    setup = time.perf_counter() - start
    results = {
        name: bench_game(
            game,
            n,
            budgets,
            permutations if name in MLP_GAMES else permutations[:4],
            seeds,
            groups,
            peer_budgets,
        )
        for name, (game, n, _, groups) in played.items()
    }
    total = time.perf_counter() - start
    print(f"# Shapley estimators vs exact values, {args.seeds} seeds\n")
    for name, res in results.items():
        print(f"## {name}: {played[name][2]}\n\n{markdown_table(res['cells'])}\n")
        table = equal_accuracy_table(res["equal_accuracy"])
        print(f"### {name}: auto budget to match msapy\n\n{table}\n")
        if res["vs_shapiq"]:
            print(f"### {name}: auto vs the best shapiq approximator\n")
            print(peer_table(res["vs_shapiq"]) + "\n")
    print("## Headline\n")
    for name, res in results.items():
        print("\n".join(headline_lines(name, res["headline"])))
        for r in res["vs_shapiq"]:
            verdict = "meets" if r["ratio"] <= PEER_GOAL else "misses"
            print(f"  - vs shapiq at budget {r['budget']}: auto RMSE ÷ {r['best']}'s = "
                  f"{r['ratio']:.2f} ({verdict} the <= {PEER_GOAL} goal)")  # fmt: skip
    print(f"\nTotal time: {total:.1f} s ({setup:.1f} s enumerating the model games)")
    payload = {
        "config": {
            "games": {name: what for name, (_, _, what, _) in played.items()},
            "seeds": list(seeds),
            "budgets": list(budgets),
            "msapy_permutations": list(permutations),
            "quick": args.quick,
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "msapy": version("msapy"),
            "shapiq": version("shapiq") if peer_budgets else None,
            "shapiq_budgets": list(peer_budgets),
        },
        "games": {
            name: {**res, "cells": [asdict(c) for c in res["cells"]]}
            for name, res in results.items()
        },
        "total_seconds": total,
    }
    write_json(args.out, payload)
    print(f"Wrote {args.out}")
    return payload


if __name__ == "__main__":
    main()
