"""The `msa-edit` command line.

    msa-edit demo --out DIR [--set key=value ...]
    msa-edit run RECIPE.yaml --out DIR [--set key=value ...]
    msa-edit validate RECIPE.yaml [--set key=value ...]
    msa-edit {analyze,plan,edit,evaluate,export} RECIPE.yaml --out DIR [--set key=value ...]
    msa-edit tiny-moe --text LANG=FILE [--text LANG=FILE ...] --out DIR [--steps N] [--seed N]
                                              [--family mixtral|olmoe]
    msa-edit example [--players 10] [--budget 200] [--method auto] [--seed 0]

`run` carries out a recipe end to end into a run directory (shapley.json, plan.json, eval.json,
model/, report.md); `demo` runs the bundled demo recipe (a tiny multilingual Mixtral, its
Chinese experts removed). The stage commands run one stage each from the run directory's files,
so an analysis can be resumed and a plan edited by hand before `edit`. `validate` checks a recipe
without loading a model.

`example` estimates the Shapley values of a small trained MLP's hidden units (lesion = unit output
zeroed, value = mean log-likelihood of the true class) within a budget and checks them against exact
enumeration. `tiny-moe` trains a small Mixtral-architecture model (OLMoE with `--family olmoe`) on
text files (one sentence a line, one file per language) into a Hugging Face model directory,
bit-identical for the same files, steps and seed. Errors print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from msa_edit.errors import MsaEditError, short
from msa_edit.recipes import Recipe, load_recipe, runner
from msa_edit.shapley import METHODS, estimate
from msa_edit.shapley.exact import EXACT_MAX_PLAYERS
from msa_edit.shapley.toys import mlp_game
from msa_edit.tiny_moe import (
    DEFAULT_FAMILY,
    FAMILIES,
    TinyMoeConfig,
    build_tiny_moe,
    parse_text_args,
    read_meta,
    routing_summary,
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="msa-edit", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo", help="the bundled demo: remove a tiny multilingual MoE's Chinese experts"
    )
    _run_arguments(demo, recipe=False)
    run = commands.add_parser("run", help="carry out a recipe end to end into a run directory")
    _run_arguments(run)
    validate = commands.add_parser("validate", help="check a recipe without loading a model")
    validate.add_argument("recipe", metavar="RECIPE", help="recipe YAML file")
    _set_argument(validate)
    for stage, text in STAGES.items():
        _run_arguments(commands.add_parser(stage, help=text))
    example = commands.add_parser(
        "example", help="Shapley values of a small MLP's hidden units, checked against exact"
    )
    example.add_argument("--players", type=int, default=10, help="hidden units (default 10)")
    example.add_argument("--budget", type=int, default=200, help="distinct coalitions (200)")
    example.add_argument("--method", choices=METHODS, default="auto")
    example.add_argument("--seed", type=int, default=0)
    tiny = commands.add_parser(
        "tiny-moe", help="train a tiny MoE (Mixtral or OLMoE) on text files (reproducible)"
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
    tiny.add_argument(
        "--family", choices=FAMILIES, default=DEFAULT_FAMILY,
        help=f"model family (default {DEFAULT_FAMILY})",
    )  # fmt: skip
    return parser


DEMO_RECIPE = Path(__file__).parent / "data" / "recipes" / "demo.yaml"
STAGES = {
    "analyze": "Shapley modes of the recipe's units -> shapley.json (resumes a killed run)",
    "plan": "choose units (from shapley.json, or by search/loo/reap/frequency) -> plan.json",
    "edit": "apply plan.json to the base model -> model/, edit.json",
    "evaluate": "base vs model/ on the recipe's metrics -> eval.json",
    "export": "model card with eval.json, optional Hub push, report.md",
}


def _set_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
        help="override a recipe field, e.g. --set estimator.budget=800 (repeatable)",
    )  # fmt: skip


def _run_arguments(parser: argparse.ArgumentParser, recipe: bool = True) -> None:
    if recipe:
        parser.add_argument("recipe", metavar="RECIPE", help="recipe YAML file")
    parser.add_argument("--out", required=True, metavar="DIR", help="run directory")
    _set_argument(parser)


def quiet_libraries() -> None:
    """Turn off transformers' and datasets' own progress bars and info logs; ours stay."""
    import datasets
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()


def run_recipe(command: str, recipe: Recipe, out: Path) -> Path | None:
    """Run a whole recipe (`run`) or one stage of it against the run directory `out`."""
    quiet_libraries()
    if command == "run":
        return runner.run(recipe, out)
    if command == "analyze":
        loaded = runner.load_model(recipe.model)
        runner.load_targets(recipe, loaded.tokenizer)
        runner.analyze(recipe, out, loaded)
        return out / runner.SHAPLEY_JSON
    starts = command == "plan" and recipe.plan is not None and recipe.plan.method != "shapley"
    if not out.is_dir() and not starts:
        first = "analyze" if recipe.estimator is not None else "plan"
        raise MsaEditError(f"run directory {out} does not exist; start with `msa-edit {first}`")
    stages: dict[str, Callable[[Recipe, Path], object]] = {
        "plan": runner.plan,
        "edit": runner.edit,
        "evaluate": runner.evaluate,
        "export": runner.export,
    }
    stages[command](recipe, out)
    return None


def run_validate(path: str, overrides: Sequence[str]) -> None:
    """Print a one-paragraph summary of a valid recipe."""
    recipe = load_recipe(path, overrides)
    stages = [s for s in ("plan", "edit", "evaluate", "export") if getattr(recipe, s) is not None]
    est = recipe.estimator
    analysis = (
        f"estimator {est.method} (budget {est.budget or 'default'})"
        if est is not None
        else "no Shapley analysis"
    )
    if recipe.plan is not None and recipe.plan.method != "shapley":
        analysis += f", plan by {recipe.plan.method}"
    print(
        f"{path}: valid; model {recipe.model.name}, units {', '.join(recipe.units)}, "
        f"targets {', '.join(recipe.targets.sets)}, {analysis}, stages {', '.join(stages)}"
    )


def run_tiny_moe(
    texts: Sequence[str], out: str, steps: int | None, seed: int, family: str = DEFAULT_FAMILY
) -> Path:
    """Train (or reuse) a tiny MoE of `family` into `out` and print what it learned."""
    start = time.perf_counter()
    config = TinyMoeConfig(family=family)
    path = build_tiny_moe(parse_text_args(texts), Path(out), steps=steps, seed=seed, config=config)
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
        if args.command in ("run", "demo", *STAGES):
            path = DEMO_RECIPE if args.command == "demo" else args.recipe
            recipe = load_recipe(path, args.overrides)
            start = time.perf_counter()
            result = run_recipe("run" if args.command == "demo" else args.command,
                                recipe, Path(args.out))  # fmt: skip
            where = result or Path(args.out)
            print(
                f"msa-edit {args.command}: done in {time.perf_counter() - start:.0f} s -> {where}"
            )
        elif args.command == "validate":
            run_validate(args.recipe, args.overrides)
        elif args.command == "example":
            run_example(args.players, args.budget, args.method, args.seed)
        elif args.command == "tiny-moe":
            run_tiny_moe(args.text, args.out, args.steps, args.seed, args.family)
    except MsaEditError as exc:
        print(f"msa-edit: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        reason = system_failure(exc)
        if reason is None:
            raise
        print(f"msa-edit: error: {reason}", file=sys.stderr)
        return 2
    return 0


def system_failure(exc: BaseException) -> str | None:
    """One line for a failure of the machine rather than of msa-edit (a full disk, a read-only or
    vanished file, a failed safetensors write); None for anything else (a bug: traceback).

    >>> system_failure(OSError(28, "No space left on device", "run/model")).split(";")[0]
    "No space left on device: 'run/model'"
    """
    if isinstance(exc, OSError):
        where = f": {short(exc.filename)}" if exc.filename else ""
        what = exc.strerror or exc.__class__.__name__
    elif type(exc).__name__ == "SafetensorError":
        what, where = f"safetensors could not write ({str(exc).splitlines()[0][:200]})", ""
    else:
        return None
    return (
        f"{what}{where}; free space or choose another --out, then rerun (finished stages are kept)"
    )


if __name__ == "__main__":
    sys.exit(main())
