"""Are the estimators' error bars honest? Coverage of "value ± 1.96 stderr" over seeds, from the
least budget each method accepts up to 20x it, for the methods `estimate(method="auto")` picks.

Games with exact values:

* `layered-200`: 200 players in 20 "layers" of 10; a unanimity game (closed-form Shapley values)
  with 600 random carriers of 1-3 players inside one layer each, random signed weights — strong
  interactions within a layer, none across, like a model's lesion game;
* `mlp`: the 10-hidden-unit MLP toy (`shapley.toys.mlp_game`), exact by enumeration;
* `moe-experts` / `dense-heads`: the 12-player model games of `bench_estimators.py` (per-language
  NLL modes of the tiny trained MoE's experts, `reroute`, and the dense model's heads, `zero`;
  every coalition evaluated once and cached, exact by enumeration). `--no-models` skips them.

For each method and budget, over `--seeds` seeds: **coverage** (share of entries, players x
outputs x seeds, with |error| <= 1.96 stderr; 95 % when the stderr is right, the goal 90-99 %),
**stderr / spread** (the median over entries of the mean reported stderr over the seed-to-seed
standard deviation of the estimate; the goal 0.7-1.4: a ratio far below 1 is overconfident) and
the RMSE. Every stderr is the method's own (`kernel`: a jackknife over sampled pairs;
`permutation`: over sampled orders; `adjusted`: the spread of its cross-fitted per-pair terms, or
the kernel's when it chose the kernel; all scaled by Student's t for their degrees of freedom).
For `adjusted` the last column counts which candidate it chose over the seeds.

    python evals/bench_calibration.py              # 30 seeds, about 10 minutes (+ model builds)
    python evals/bench_calibration.py --quick      # 8 seeds, two budgets, no model games

Writes evals/results/bench_calibration.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch
from benchlib import markdown, save_results

from msa_edit.shapley import Game, estimate
from msa_edit.shapley.estimate import min_budget
from msa_edit.shapley.toys import layered_game, mlp_game

METHODS = ("adjusted", "kernel", "permutation")
MULTIPLES = (1.0, 1.5, 2.0, 5.0, 20.0)
QUICK_MULTIPLES = (1.0, 5.0)
Z_95 = 1.96


def exact(game: Game, n: int) -> torch.Tensor:
    return estimate(game, n, method="exact", progress=False).values.double()


def games(with_models: bool) -> dict[str, tuple[Game, torch.Tensor, list[int]]]:
    """name -> (game, exact values, each player's layer)."""
    game, values = layered_game()
    out = {"layered-200": (game, values, [i // 10 for i in range(200)])}
    mlp = mlp_game(n_hidden=10, seed=0)
    out["mlp"] = (mlp, exact(mlp, 10), [0] * 10)
    if with_models:
        from bench_estimators import MODEL_GAMES, N_SEQ, SEQ_LEN
        from benchlib import language_table, unit_layers

        for name, model, units in MODEL_GAMES:
            table = language_table(model, units, N_SEQ, SEQ_LEN)
            out[name] = (table, exact(table, 12), unit_layers(model, units))
    return out


def cell(
    game: Game, exact: torch.Tensor, method: str, budget: int, seeds: int, groups: list[int]
) -> dict[str, Any]:
    """Coverage, stderr / spread and RMSE of `method` at `budget` over seeds 1..`seeds`, and
    for `adjusted` how often each candidate was chosen."""
    n = exact.shape[0]
    values, stderrs, chosen = [], [], []
    start = time.perf_counter()
    for seed in range(1, seeds + 1):
        res = estimate(game, n, method, budget, seed, groups=groups, progress=False)
        chosen.append(res.surrogate)
        values.append(res.values.double().reshape(n, -1))
        stderrs.append(res.stderr.double().reshape(n, -1))
    v, s = torch.stack(values), torch.stack(stderrs)
    error = v - exact.double().reshape(n, -1)
    spread = v.std(0)
    ratio = (s.mean(0) / spread)[spread > 1e-12]
    return {
        "budget": budget,
        "coverage": float((error.abs() <= Z_95 * s + 1e-12).double().mean()),
        "stderr_over_spread": float(ratio.median()) if ratio.numel() else None,
        "rmse": float(error.pow(2).mean().sqrt()),
        "infinite_stderr": float((~torch.isfinite(s)).double().mean()),
        "seconds_per_run": (time.perf_counter() - start) / seeds,
        "chosen": {c: chosen.count(c) for c in sorted(set(chosen)) if c},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--no-models", action="store_true", help="skip the model games")
    args = parser.parse_args()
    seeds = args.seeds or (8 if args.quick else 30)
    multiples = QUICK_MULTIPLES if args.quick else MULTIPLES
    results: dict[str, Any] = {"seeds": seeds, "games": {}}
    rows = []
    for name, (game, exact, groups) in games(not (args.quick or args.no_models)).items():
        n = exact.shape[0]
        results["games"][name] = {}
        for method in METHODS:
            least = min_budget(method, n)
            cells = []
            for k in multiples:
                budget = int(least * k)
                if budget >= 1 << min(n, 62):
                    continue
                c = cell(game, exact, method, budget, seeds, groups)
                cells.append(c)
                ratio = c["stderr_over_spread"]
                shown = "n/a" if ratio is None else f"{ratio:.2f}"
                coverage = f"{100 * c['coverage']:.1f}%"
                rmse = f"{c['rmse']:.4f}"
                picks = ", ".join(f"{k2} {v}" for k2, v in c["chosen"].items())
                rows.append([name, method, f"{budget} ({k:g}x)", coverage, shown, rmse, picks])
                print(" | ".join(map(str, rows[-1])), flush=True)
            results["games"][name][method] = cells
    save_results("bench_calibration", args.quick, results)
    header = ["game", "method", "budget (x least)", "95% coverage", "stderr / spread", "RMSE",
              "adjusted chose (seeds)"]  # fmt: skip
    print(f"\n# Error-bar calibration, {seeds} seeds\n")
    print(markdown(header, rows))


if __name__ == "__main__":
    main()
