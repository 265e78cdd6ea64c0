"""The `msa-edit` command line.

    msa-edit example [--players 10] [--budget 200] [--method auto] [--seed 0]
    msa-edit tiny-moe --text LANG=FILE [--text LANG=FILE ...] --out DIR [--steps N] [--seed N]

`example` estimates the Shapley values of a small trained MLP's hidden units (lesion = unit output
zeroed, value = mean log-likelihood of the true class) within a budget and checks them against exact
enumeration. `tiny-moe` trains a small Mixtral-architecture model on text files (one sentence a
line, one file per language) into a Hugging Face model directory, bit-identical for the same files,
steps and seed. Errors print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from msa_edit.errors import MsaEditError
from msa_edit.shapley import METHODS, estimate
from msa_edit.shapley.exact import EXACT_MAX_PLAYERS
from msa_edit.shapley.toys import mlp_game
from msa_edit.tiny_moe import (
    TinyMoeConfig,
    build_tiny_moe,
    parse_text_args,
    read_meta,
    routing_summary,
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="msa-edit", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    example = commands.add_parser(
        "example", help="Shapley values of a small MLP's hidden units, checked against exact"
    )
    example.add_argument("--players", type=int, default=10, help="hidden units (default 10)")
    example.add_argument("--budget", type=int, default=200, help="distinct coalitions (200)")
    example.add_argument("--method", choices=METHODS, default="auto")
    example.add_argument("--seed", type=int, default=0)
    tiny = commands.add_parser(
        "tiny-moe", help="train a tiny Mixtral-architecture model on text files (reproducible)"
    )
    tiny.add_argument(
        "--text", action="append", default=[], metavar="LANG=FILE",
        help="a language and its text file, one sentence a line (repeat per language)",
    )  # fmt: skip
    tiny.add_argument("--out", required=True, metavar="DIR", help="model directory to write")
    tiny.add_argument(
        "--steps", type=int, default=None,
        help=f"training steps (default {TinyMoeConfig.steps})",
    )  # fmt: skip
    tiny.add_argument("--seed", type=int, default=0)
    return parser


def run_tiny_moe(texts: Sequence[str], out: str, steps: int | None, seed: int) -> Path:
    """Train (or reuse) a tiny Mixtral into `out` and print what it learned."""
    start = time.perf_counter()
    path = build_tiny_moe(parse_text_args(texts), Path(out), steps=steps, seed=seed)
    meta = read_meta(path)
    assert meta is not None
    seconds = time.perf_counter() - start
    print(
        f"tiny-moe: {meta['n_parameters']:,} parameters, {meta['steps']} steps, seed "
        f"{meta['seed']} -> {path} ({seconds:.1f} s)"
    )
    print(
        f"train loss {meta['first_train_loss']:.3f} -> {meta['final_train_loss']:.3f}; "
        "held-out NLL " + json.dumps({k: round(v, 3) for k, v in meta["heldout_nll"].items()})
    )
    routing = torch.tensor(meta["routing_heldout"])
    print(routing_summary(routing, meta["languages"], meta["config"]["top_k"]))
    return path


def run_example(players: int, budget: int, method: str, seed: int) -> None:
    """Print estimated vs exact Shapley values of an MLP's hidden units."""
    if not 2 <= players <= EXACT_MAX_PLAYERS:
        raise MsaEditError(
            f"--players must be between 2 and {EXACT_MAX_PLAYERS} so the exact check can run, "
            f"got {players}"
        )
    game = mlp_game(n_hidden=players, seed=seed)
    start = time.perf_counter()
    res = estimate(game, players, method=method, budget=budget, seed=seed)
    seconds = time.perf_counter() - start
    truth = estimate(game, players, method="exact", progress=False)
    print(
        f"{res.method} estimate of {players} hidden units with {res.n_evaluations} of "
        f"{1 << players} coalitions in {seconds:.2f} s"
    )
    print(f"{'unit':>4}  {'estimate':>9}  {'stderr':>7}  {'exact':>9}  {'|error|':>8}")
    for i in res.ranking():
        est, se, ex = float(res.values[i]), float(res.stderr[i]), float(truth.values[i])
        print(f"{i:>4}  {est:>9.4f}  {se:>7.4f}  {ex:>9.4f}  {abs(est - ex):>8.4f}")
    total = float(res.values.sum())
    print(f"sum of values {total:.6f} = v(N) - v(empty) = {float(res.v_full - res.v_empty):.6f}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `msa-edit`; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "example":
            run_example(args.players, args.budget, args.method, args.seed)
        elif args.command == "tiny-moe":
            run_tiny_moe(args.text, args.out, args.steps, args.seed)
    except MsaEditError as exc:
        print(f"msa-edit: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
