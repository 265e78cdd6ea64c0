"""Row sampling: does valuing each coalition on k blocks per language (the others filled in from
the intact model, `LesionGame(rows_per_set=k)`) lower the error for the same wall time?

Games (per-language mean NLL on held-out text, 8 blocks of 32 tokens per language = 48 rows, one
torch thread):

* `moe-experts`: the demo's tiny MoE, its 32 experts (`reroute`);
* `dense-heads`: the 3-layer dense tiny transformer's 12 heads (`zero`).

The reference is exact enumeration for the 12 heads (4096 coalitions on every row, cached after
the first run) and `estimate(method="adjusted", budget=REF_BUDGET)` on every row for the 32
experts (seed 0, which no cell uses; its largest stderr is printed). First the seconds per
coalition with k rows per set and with every row are measured on the same 32 coalitions; then for
each budget B of the full-row game and each k, the row-sampled run gets the budget that costs the
same time (the 2n + 2 coalitions at the ends run on every row in both):
B_k = 2n + 2 + (B - 2n - 2) * t_full / t_k. Each cell: `estimate(method="auto")` over the seeds,
its wall time, RMSE against the reference, and the share of 95 % intervals that cover it.

    python evals/bench_rows.py                       # 4 seeds, about 25 minutes on 2 cores
    python evals/bench_rows.py --only moe-experts    # one game; the two side by side: 13 min
    python evals/bench_rows.py --quick               # 1 seed, the heads only, about 6 minutes

Writes evals/results/bench_rows[_quick].json.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from benchlib import heldout_targets, language_table, markdown, model_dir, rmse, save_results

from msa_edit.games import LesionGame, MeanNLL
from msa_edit.shapley import estimate
from msa_edit.tiny_moe import load_tiny_moe
from msa_edit.units import select

N_SEQ, SEQ_LEN = 8, 32
REF_BUDGET = 2048
KS = (1, 2)


@dataclass(frozen=True)
class Spec:
    name: str
    model: str
    units: str
    budgets: tuple[int, ...]


SPECS = (
    Spec("moe-experts", "moe", "layers.*.experts.*", (128, 256)),
    Spec("dense-heads", "dense", "layers.*.heads.*", (64, 128)),
)


def make_game(spec: Spec) -> tuple[Any, Any, list[int]]:
    folder = model_dir(spec.model)
    model, tokenizer, _ = load_tiny_moe(folder)
    targets = heldout_targets(folder, tokenizer, N_SEQ, SEQ_LEN)
    players = select(model, spec.units)
    lesion = "reroute" if players[0].kind == "experts" else "zero"

    def game(k: int | None, seed: int = 0) -> LesionGame:
        return LesionGame(model, players, targets, MeanNLL(), lesion, max_rows=8 * targets.n_rows,
                          rows_per_set=k, row_seed=seed)  # fmt: skip

    return game, targets, [u.layer for u in players]


def seconds_per_coalition(game: LesionGame, n: int) -> float:
    coalitions = torch.rand(32, n, generator=torch.Generator().manual_seed(7)) < 0.5
    game(coalitions[:2])  # warm up (and the intact pass of prefix reuse / row sampling)
    start = time.perf_counter()
    game(coalitions)
    return (time.perf_counter() - start) / 32


def reference(spec: Spec, make: Any, n: int, groups: list[int]) -> tuple[np.ndarray, float]:
    if n <= 12:
        table = language_table(spec.model, spec.units, N_SEQ, SEQ_LEN)
        return estimate(table, n, "exact", progress=False).values.numpy(), 0.0
    res = estimate(make(None), n, "adjusted", REF_BUDGET, seed=0, batch_size=32, progress=False,
                   groups=groups)  # fmt: skip
    return res.values.numpy(), float(res.stderr.max())


def bench(spec: Spec, seeds: range) -> dict[str, Any]:
    make, _, groups = make_game(spec)
    n = len(groups)
    ends = 2 * n + 2
    cost = {k: seconds_per_coalition(make(k), n) for k in (None, *KS)}
    shown = ", ".join(f"{'all' if k is None else k}: {t:.4f}" for k, t in cost.items())
    print(f"{spec.name}: seconds per coalition {shown}")
    ref, ref_se = reference(spec, make, n, groups)
    print(f"{spec.name}: reference ready (largest stderr {ref_se:.4f})")
    cells = []
    for budget in spec.budgets:
        for k in (None, *KS):
            b = budget if k is None else ends + round((budget - ends) * cost[None] / cost[k])
            errors, covered, walls, chosen = [], [], [], set()
            for seed in seeds:
                start = time.perf_counter()
                res = estimate(make(k, seed), n, "auto", b, seed=seed, batch_size=32,
                               progress=False, groups=groups)  # fmt: skip
                walls.append(time.perf_counter() - start)
                values, se = res.values.numpy(), res.stderr.numpy()
                errors.append(rmse(values, ref))
                covered.append(float((np.abs(values - ref) <= 1.96 * se).mean()))
                chosen.add(f"{res.method}/{res.surrogate}" if res.surrogate else res.method)
            cell = {"budget": budget, "rows_per_set": k, "coalitions": b,
                    "rmse": float(np.sqrt(np.mean(np.square(errors)))),
                    "coverage": float(np.mean(covered)), "wall_s": float(np.mean(walls)),
                    "chosen": sorted(chosen)}  # fmt: skip
            print(f"{spec.name} B={budget} k={k}: {cell}")
            cells.append(cell)
    return {"cost_s": {str(k): t for k, t in cost.items()}, "reference_max_stderr": ref_se,
            "cells": cells}  # fmt: skip


def table(name: str, result: dict[str, Any]) -> str:
    rows = []
    base = {c["budget"]: c for c in result["cells"] if c["rows_per_set"] is None}
    for c in result["cells"]:
        full = base[c["budget"]]
        rows.append([
            f"{name} B={c['budget']}", "all" if c["rows_per_set"] is None else c["rows_per_set"],
            c["coalitions"], f"{c['wall_s']:.1f}", f"{c['wall_s'] / full['wall_s']:.2f}",
            f"{c['rmse']:.4f}", f"{c['rmse'] / full['rmse']:.2f}", f"{c['coverage']:.2f}",
            ", ".join(c["chosen"]),
        ])  # fmt: skip
    header = ["game", "rows per set", "coalitions", "wall s", "wall ÷ all rows", "RMSE",
              "RMSE ÷ all rows", "95 % coverage", "estimator"]  # fmt: skip
    return markdown(header, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", choices=[s.name for s in SPECS])
    args = parser.parse_args()
    torch.set_num_threads(1)
    seeds = range(1, 2) if args.quick else range(1, 5)
    specs = [s for s in SPECS if (args.only or ("dense-heads" if args.quick else s.name)) == s.name]
    results = {spec.name: bench(spec, seeds) for spec in specs}
    for name, result in results.items():
        print(table(name, result))
    save_results(f"bench_rows{'_' + args.only if args.only else ''}", args.quick,
                 {"seeds": list(seeds), "n_seq_per_language": N_SEQ, "seq_len": SEQ_LEN,
                  "ref_budget": REF_BUDGET, "games": results})  # fmt: skip


if __name__ == "__main__":
    main()
