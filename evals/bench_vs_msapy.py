"""msa_edit vs msapy on the same model games: wall time and model evaluations at equal accuracy.

Two lesion games, both valued by the per-language mean next-token NLL (a Shapley mode of shape
[6]: en, de, fr, es, ru, zh) on held-out text (`reroute` lesions for experts, `zero` for heads):

* `moe-experts`: the demo's tiny multilingual MoE (4 layers x 8 experts, top-2), its 32 experts;
* `dense-heads`: a dense 3-layer tiny transformer trained on the same text, its 12 heads.

The reference is exact enumeration where it fits (12 heads: 4096 coalitions) and otherwise
`estimate(method="adjusted")` at a high budget, seed 0, which no cell uses (its largest stderr is
printed: its error adds to every cell's RMSE alike). Then, over the same seeds, with the same
game object and torch threads:

* msapy 1.7.3 `msa.interface` (lazy, serial: one coalition per call) with P permutations;
* `estimate(method="auto", budget=b, batch_size=8)`;
* `auto` on the same game with row sampling (`LesionGame(rows_per_set=1)`: each coalition on
  one of the two blocks per language, the other from the intact model; values of the same
  all-row game, so the same reference), at its own budgets;
* where shapiq is installed (`pip install -e '.[bench]'`), shapiq's paired KernelSHAP — the best
  shapiq approximator in `bench_estimators.py` — at the same budgets (it hands the game all its
  coalitions in one call; a vector game is run once per output, the later outputs read a cache);

each cell's wall time, distinct coalitions evaluated and RMSE vs the reference (over players,
languages and seeds). The equal-accuracy table pairs every msapy cell with the cheapest `auto`
budget whose RMSE is at most msapy's, and prints the wall-time and evaluation ratios
(goal: >= 10x less wall time), and the same against shapiq. If msapy's error times sqrt(P)
stays flat, msapy converges to the
same reference, so the reference is not biased towards our estimator.

Writes evals/results/bench_vs_msapy[_quick|_thorough].json. Run from the repository root (models
are trained and cached on the first run, a few minutes more):

    python evals/bench_vs_msapy.py              # 2 seeds, about 9 minutes on 2 cores
    python evals/bench_vs_msapy.py --quick      # 1 seed, fewer cells, under 2 minutes
    python evals/bench_vs_msapy.py --thorough   # 3 seeds, msapy up to 100 permutations of the
                                                # MoE too, reference at 8192: about 18 minutes
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from importlib.metadata import version
from typing import Any

import numpy as np
import torch
from bench_estimators import run_shapiq, shapiq_available
from benchlib import language_game, language_table, markdown, rmse, run_msapy, save_results

from msa_edit.games import LesionGame
from msa_edit.shapley import estimate


@dataclass(frozen=True)
class GameSpec:
    """One benchmark game and the cells measured on it."""

    name: str
    model: str
    units: str
    permutations: tuple[int, ...]
    budgets: tuple[int, ...]
    reference_budget: int | None
    """None: exact enumeration."""
    row_budgets: tuple[int, ...] = ()
    """Budgets of `auto` on the row-sampled game (`ROWS_PER_SET`)."""


MOE_BUDGETS = (66, 96, 128, 192, 256, 384, 512, 1024)
MOE_ROW_BUDGETS = (128, 192, 256, 384, 512, 1024)
DENSE = GameSpec(
    "dense-heads", "dense", "layers.*.heads.*", (10, 25, 50, 100), (26, 40, 64, 128, 256, 512),
    None, (64, 128, 256, 512),
)  # fmt: skip
FULL = (
    GameSpec(
        "moe-experts", "moe", "layers.*.experts.*", (10, 25, 50), MOE_BUDGETS, 4096, MOE_ROW_BUDGETS
    ),
    DENSE,
)
THOROUGH = (
    GameSpec(
        "moe-experts",
        "moe",
        "layers.*.experts.*",
        (10, 25, 50, 100),
        MOE_BUDGETS,
        8192,
        MOE_ROW_BUDGETS,
    ),
    DENSE,
)
QUICK = (
    GameSpec("moe-experts", "moe", "layers.*.experts.*", (10, 25), (66, 128, 256), 1024),
    GameSpec("dense-heads", "dense", "layers.*.heads.*", (10, 25), (26, 64, 128), None),
)
BLOCKS8 = (
    GameSpec("moe-experts", "moe", "layers.*.experts.*", (10, 25), (256, 512, 1024), 4096,
             (512, 1024, 2048, 4096)),
    GameSpec("dense-heads", "dense", "layers.*.heads.*", (10, 25, 50), (64, 128, 256), None,
             (128, 256, 512, 1024)),
)  # fmt: skip
"""`--blocks 8`: 8 blocks per language (48 rows), closer to a recipe's 24 per set."""
SEQ_LEN = 32
N_SEQ = 2
"""Blocks per language (`--blocks` changes it)."""
BATCH = 8
ROWS_PER_SET = 1
"""Blocks per language per coalition in the row-sampled cells (of N_SEQ)."""
GOAL = 10.0


@dataclass(frozen=True)
class Cell:
    """One estimator setting averaged over the seeds."""

    estimator: str
    size: int
    seconds: float
    distinct: float
    calls: float
    rmse: float


def reference(spec: GameSpec, game: LesionGame) -> tuple[np.ndarray, float, float]:
    """Reference values, the largest stderr and the seconds it took."""
    start = time.perf_counter()
    if spec.reference_budget is None:  # exact, from the (cached) table of all coalitions
        n_seq = game.targets.n_rows // len(game.targets.names)
        table = language_table(spec.model, spec.units, n_seq, SEQ_LEN)
        res = estimate(table, game.n_players, method="exact", progress=False)
    else:
        res = estimate(
            game, game.n_players, "adjusted", spec.reference_budget, 0, BATCH, progress=True,
            groups=[u.layer for u in game.units],
        )  # fmt: skip
    return res.values.numpy(), float(res.stderr.max()), time.perf_counter() - start


def ours(
    game: LesionGame, ref: np.ndarray, budget: int, seeds: range, rows_per_set: int | None = None
) -> Cell:
    """`auto` at `budget` over the seeds; with `rows_per_set`, on the same game valued from that
    many blocks per language per coalition (`LesionGame(rows_per_set=, row_seed=seed)`)."""
    runs = []
    for seed in seeds:
        played = game if rows_per_set is None else sampled_rows(game, rows_per_set, seed)
        start = time.perf_counter()
        res = estimate(played, game.n_players, "auto", budget, seed, BATCH, progress=False,
                       groups=[u.layer for u in game.units])  # fmt: skip
        runs.append((time.perf_counter() - start, res.n_evaluations, res.values.numpy()))
    return Cell(
        estimator="auto" if rows_per_set is None else f"auto, {rows_per_set} row per set",
        size=budget,
        seconds=float(np.mean([r[0] for r in runs])),
        distinct=float(np.mean([r[1] for r in runs])),
        calls=float(np.mean([r[1] for r in runs])),
        rmse=rmse(np.stack([r[2] for r in runs]), ref[None]),
    )


def sampled_rows(game: LesionGame, rows_per_set: int, seed: int) -> LesionGame:
    """The same game (model, units, targets, lesion) with row sampling."""
    return LesionGame(game.model, game.units, game.targets, game.objective, game.lesion.kind,
                      max_rows=game.max_rows, rows_per_set=rows_per_set, row_seed=seed)  # fmt: skip


def theirs(game: LesionGame, ref: np.ndarray, n_permutations: int, seeds: range) -> Cell:
    runs = [run_msapy(game, game.n_players, tuple(ref.shape[1:]), n_permutations, s) for s in seeds]
    return Cell(
        estimator="msapy",
        size=n_permutations,
        seconds=float(np.mean([r[2] for r in runs])),
        distinct=float(np.mean([len(r[1].seen) for r in runs])),
        calls=float(np.mean([r[1].calls for r in runs])),
        rmse=rmse(np.stack([r[0] for r in runs]), ref[None]),
    )


def peer(game: LesionGame, ref: np.ndarray, budget: int, seeds: range) -> Cell:
    """shapiq's paired KernelSHAP at `budget` (see `bench_estimators.run_shapiq`)."""
    runs = [run_shapiq(game, ref, "KernelSHAP", budget, seed) for seed in seeds]
    return Cell(
        estimator="shapiq KernelSHAP",
        size=budget,
        seconds=float(np.mean([r.seconds for r in runs])),
        distinct=float(np.mean([r.distinct for r in runs])),
        calls=float(np.mean([r.calls for r in runs])),
        rmse=float(np.sqrt(np.mean(np.stack([r.error for r in runs]) ** 2))),
    )


def equal_accuracy(
    msapy_cells: Sequence[Cell], auto_cells: Sequence[Cell], peer: str = "msapy"
) -> list[dict[str, Any]]:
    """For each cell of the peer (msapy, or shapiq), the cheapest `auto` cell at most as wrong,
    and the ratios (keys `{peer}_size`, `{peer}_rmse`, ... where msapy's size is permutations)."""
    out = []
    for m in msapy_cells:
        match = next(
            (a for a in sorted(auto_cells, key=lambda c: c.size) if a.rmse <= m.rmse), None
        )
        out.append(
            {
                f"{peer}_permutations" if peer == "msapy" else f"{peer}_budget": m.size,
                f"{peer}_rmse": m.rmse,
                f"{peer}_seconds": m.seconds,
                f"{peer}_distinct": m.distinct,
                "auto_budget": None if match is None else match.size,
                "auto_rmse": None if match is None else match.rmse,
                "auto_seconds": None if match is None else match.seconds,
                "wall_ratio": None if match is None else m.seconds / match.seconds,
                "evaluation_ratio": None if match is None else m.distinct / match.distinct,
            }
        )
    return out


def bench(spec: GameSpec, seeds: range, n_seq: int) -> dict[str, Any]:
    game, _ = language_game(spec.model, spec.units, n_seq, SEQ_LEN)
    ref, ref_se, ref_seconds = reference(spec, game)
    msapy_cells = [theirs(game, ref, p, seeds) for p in spec.permutations]
    auto_cells = [ours(game, ref, b, seeds) for b in spec.budgets]
    row_cells = [ours(game, ref, b, seeds, ROWS_PER_SET) for b in spec.row_budgets]
    peer_cells = [peer(game, ref, b, seeds) for b in spec.budgets] if shapiq_available() else []
    return {
        "game": asdict(spec),
        "players": game.n_players,
        "rows": game.targets.n_rows,
        "reference": {"max_stderr": ref_se, "seconds": ref_seconds, "values": ref.tolist()},
        "msapy": [asdict(c) for c in msapy_cells],
        "auto": [asdict(c) for c in auto_cells],
        "equal_accuracy": equal_accuracy(msapy_cells, auto_cells),
        "auto_rows": [asdict(c) for c in row_cells],
        "equal_accuracy_rows": equal_accuracy(msapy_cells, row_cells),
        "shapiq": [asdict(c) for c in peer_cells],
        "vs_shapiq": equal_accuracy(peer_cells, auto_cells, "shapiq"),
    }


def cells_table(result: dict[str, Any]) -> str:
    rows = []
    for c in result["msapy"]:
        scaled = c["rmse"] * c["size"] ** 0.5
        rows.append(
            [f"msapy, {c['size']} perms", f"{c['calls']:.0f}", f"{c['distinct']:.0f}",
             f"{c['rmse']:.4f}", f"{scaled:.3f}", f"{c['seconds']:.2f}"]
        )  # fmt: skip
    for c in result["auto"]:
        rows.append(
            [f"auto, budget {c['size']}", f"{c['calls']:.0f}", f"{c['distinct']:.0f}",
             f"{c['rmse']:.4f}", "", f"{c['seconds']:.2f}"]
        )  # fmt: skip
    for c in result["auto_rows"]:
        rows.append(
            [f"{c['estimator']}, budget {c['size']}", f"{c['calls']:.0f}", f"{c['distinct']:.0f}",
             f"{c['rmse']:.4f}", "", f"{c['seconds']:.2f}"]
        )  # fmt: skip
    for c in result["shapiq"]:
        rows.append(
            [f"shapiq KernelSHAP, budget {c['size']}", f"{c['calls']:.0f}",
             f"{c['distinct']:.0f}", f"{c['rmse']:.4f}", "", f"{c['seconds']:.2f}"]
        )  # fmt: skip
    header = ["estimator", "game calls", "distinct coalitions", "RMSE", "RMSE·√P", "wall s"]
    return markdown(header, rows)


def ratio_table(result: dict[str, Any], key: str = "equal_accuracy", peer: str = "msapy") -> str:
    rows = []
    size_key = "msapy_permutations" if peer == "msapy" else "shapiq_budget"
    for h in result[key]:
        h = {k.replace("shapiq_", "msapy_"): v for k, v in h.items()} | {"size": h[size_key]}
        if h["auto_budget"] is None:
            rows.append([h["size"], f"{h['msapy_rmse']:.4f}", "not reached", "", "", ""])
            continue
        rows.append(
            [h["size"], f"{h['msapy_rmse']:.4f}",
             f"{h['auto_budget']} ({h['auto_rmse']:.4f})",
             f"{h['msapy_seconds']:.2f} / {h['auto_seconds']:.2f}",
             f"**{h['wall_ratio']:.1f}x**", f"{h['evaluation_ratio']:.1f}x"]
        )  # fmt: skip
    size = "perms" if peer == "msapy" else "budget"
    header = [f"{peer} {size}", f"{peer} RMSE", "auto budget (RMSE)", f"wall s {peer} / auto",
              "less wall time", "fewer evaluations"]  # fmt: skip
    return markdown(header, rows)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, fewer cells (< 2 min)")
    parser.add_argument(
        "--thorough", action="store_true", help="3 seeds, msapy at 100 permutations (~18 min)"
    )
    parser.add_argument("--seeds", type=int, default=None, help="seeds per cell (default 2)")
    parser.add_argument("--blocks", type=int, choices=(2, 8), default=N_SEQ,
                        help="blocks per language: 8 runs the BLOCKS8 cells (~25 min)")  # fmt: skip
    args = parser.parse_args(argv)
    default_seeds = 1 if args.quick else 3 if args.thorough else 2
    seeds = range(1, (args.seeds or default_seeds) + 1)  # msapy: seed 0 = unseeded
    torch.set_num_threads(1)  # tiny models: extra threads only add synchronisation
    specs = QUICK if args.quick else THOROUGH if args.thorough else FULL
    if args.blocks == 8:
        specs = BLOCKS8
    start = time.perf_counter()
    results = {spec.name: bench(spec, seeds, args.blocks) for spec in specs}
    total = time.perf_counter() - start
    for name, res in results.items():
        ref = res["reference"]
        how = "exact" if res["game"]["reference_budget"] is None else (
            f"adjusted @ {res['game']['reference_budget']}"
        )  # fmt: skip
        print(f"\n## {name}: {res['players']} players, {res['rows']} rows x {SEQ_LEN} tokens, "
              f"reference {how} (max stderr {ref['max_stderr']:.4f}, "
              f"{ref['seconds']:.0f} s)\n")  # fmt: skip
        print(cells_table(res) + "\n")
        print(ratio_table(res))
        if res["auto_rows"]:
            print(f"\nwith row sampling ({ROWS_PER_SET} block per language per coalition):\n")
            print(ratio_table(res, "equal_accuracy_rows"))
        if res["shapiq"]:
            print("\n" + ratio_table(res, "vs_shapiq", "shapiq KernelSHAP"))
    best = [
        h["wall_ratio"]
        for r in results.values()
        for h in r["equal_accuracy"]
        if h["wall_ratio"] is not None
    ]
    print(f"\nwall-time ratio at equal accuracy: {min(best):.1f}x to {max(best):.1f}x "
          f"(goal >= {GOAL:.0f}x); total {total:.0f} s, seeds {list(seeds)}")  # fmt: skip
    with_rows = [
        max(a["wall_ratio"] or 0.0, b["wall_ratio"] or 0.0)
        for r in results.values()
        for a, b in zip(r["equal_accuracy"], r["equal_accuracy_rows"], strict=True)
    ]
    print(f"with row sampling where it is faster: {min(with_rows):.1f}x to {max(with_rows):.1f}x")
    vs_peer = [h["wall_ratio"] for r in results.values() for h in r["vs_shapiq"]
               if h["wall_ratio"] is not None]  # fmt: skip
    if vs_peer:
        print(f"wall-time ratio to shapiq KernelSHAP at equal accuracy: {min(vs_peer):.2f}x to "
              f"{max(vs_peer):.2f}x")  # fmt: skip
    payload = {
        "config": {
            "quick": args.quick,
            "thorough": args.thorough,
            "seeds": list(seeds),
            "n_seq_per_language": args.blocks,
            "seq_len": SEQ_LEN,
            "batch_size": BATCH,
            "torch_threads": torch.get_num_threads(),
            "msapy": version("msapy"),
            "shapiq": version("shapiq") if shapiq_available() else None,
            "torch": torch.__version__,
        },
        "games": results,
        "total_seconds": total,
    }
    name = "bench_vs_msapy_thorough" if args.thorough else "bench_vs_msapy"
    name += "_blocks8" if args.blocks == 8 else ""
    save_results(name, args.quick, payload)
    return payload


if __name__ == "__main__":
    main()
