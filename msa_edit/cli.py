"""The `msa-edit` command line.

    msa-edit [-v|-q] [--log-file FILE] COMMAND ...
    msa-edit demo --out DIR [--set key=value ...]
    msa-edit run RECIPE.yaml --out DIR [--set key=value ...] [--dry-run]
    msa-edit validate RECIPE.yaml [--set key=value ...]
    msa-edit {analyze,plan,edit,evaluate,export} RECIPE.yaml --out DIR [--set key=value ...]
    msa-edit units MODEL [--kind experts|heads|neurons|layer] [--names]
    msa-edit tiny-moe --text LANG=FILE [--text LANG=FILE ...] --out DIR [--steps N] [--seed N]
                                              [--family mixtral|olmoe]
    msa-edit example [--players 10] [--budget 200] [--method auto] [--seed 0]

`run` carries out a recipe end to end into a run directory (shapley.json, plan.json, eval.json,
model/, report.md); `demo` runs the bundled demo recipe (a tiny multilingual Mixtral, its
Chinese experts removed). The stage commands run one stage each from the run directory's files,
so an analysis can be resumed and a plan edited by hand before `edit`. `validate` checks a recipe
without loading a model; `run --dry-run` and `analyze --dry-run` load the model and print what
the run would cost, writing nothing; `plan --show` prints an existing plan. `units` lists a
model's lesionable units and the globs that select them.

`example` estimates the Shapley values of a small trained MLP's hidden units (lesion = unit output
zeroed, value = mean log-likelihood of the true class) within a budget and checks them against exact
enumeration. `tiny-moe` trains a small Mixtral-architecture model (OLMoE with `--family olmoe`) on
text files (one sentence a line, one file per language) into a Hugging Face model directory,
bit-identical for the same files, steps and seed. Errors print one line and exit with status 2.

Only light modules are imported at the top so that `--help` and `--version` answer at once; torch,
transformers and the pipeline are imported by the command that needs them.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO, cast

from msa_edit.errors import MsaEditError, short

if TYPE_CHECKING:
    from torch import nn

    from msa_edit.recipes import Recipe

log = logging.getLogger("msa_edit")

# Mirrors of constants whose modules import torch (tests/test_cli.py checks that they agree).
# msa_edit.shapley.METHODS:
METHODS = ("auto", "exact", "permutation", "antithetic", "kernel", "adjusted")
EXACT_MAX_PLAYERS = 20  # msa_edit.shapley.exact.EXACT_MAX_PLAYERS
FAMILIES = ("mixtral", "olmoe")  # msa_edit.tiny_moe.FAMILIES
DEFAULT_FAMILY = "mixtral"  # msa_edit.tiny_moe.DEFAULT_FAMILY
DEFAULT_STEPS = 800  # msa_edit.tiny_moe.TinyMoeConfig.steps
KINDS = ("experts", "heads", "neurons", "shared_experts", "layer")  # msa_edit.units.KINDS

DEMO_RECIPE = Path(__file__).parent / "data" / "recipes" / "demo.yaml"
STAGES = {
    "analyze": "Shapley modes of the recipe's units -> shapley.json (resumes a killed run)",
    "plan": "choose units (from shapley.json, or by search/loo/reap/frequency) -> plan.json",
    "edit": "apply plan.json to the base model -> model/, edit.json",
    "evaluate": "base vs model/ on the recipe's metrics -> eval.json",
    "export": "model card with eval.json, optional Hub push, report.md",
}

DESCRIPTION = """\
Find which units of a language model produce a behaviour, and edit them.

msa-edit lesions units of a Hugging Face causal LM (MoE experts, attention heads, MLP neurons or
whole layers), estimates each unit's contribution to per-target objectives (e.g. the loss on one
language) with multi-perturbation Shapley analysis, chooses units to remove, prune or scale, edits
the model so that it loads with plain transformers, and evaluates it before and after. One YAML
recipe describes one run; every stage reads and writes one run directory (--out DIR).

pipeline:  analyze -> plan -> edit -> evaluate -> export        (`run` does all five)
run dir:   recipe.yaml, shapley.json, plan.json, model/, eval.json, report.md

commands:  demo, run, validate         a whole recipe, or checking one without a model
           analyze, plan, edit,        one stage each, from the run directory's files
           evaluate, export
           units                       a model's lesionable units and the globs that select them
           tiny-moe, example           a tiny MoE to try things on; Shapley values of a toy MLP"""

EPILOG = """\
examples:
  msa-edit demo --out runs/demo                      # bundled recipe, CPU, minutes
  msa-edit validate recipes/mixtral_remove_language.yaml
  msa-edit run recipes/mixtral_remove_language.yaml --out runs/no-fr --dry-run
  msa-edit run recipes/mixtral_remove_language.yaml --out runs/no-fr
  msa-edit run recipes/mixtral_compress.yaml --out runs/6x7b --set plan.per_layer=1
  msa-edit units mistralai/Mixtral-8x7B-v0.1 --kind experts
  msa-edit -v --log-file runs/no-fr.log run recipes/mixtral_remove_language.yaml --out runs/no-fr
  msa-edit example --players 8 --budget 120

Every command has its own --help with examples. Errors print one line and exit with status 2."""

_RECIPE = "recipes/mixtral_remove_language.yaml"
EXAMPLES: dict[str, list[str]] = {
    "demo": [
        "msa-edit demo --out runs/demo",
        "msa-edit demo --out runs/demo --set plan.per_layer=2",
    ],
    "run": [
        f"msa-edit run {_RECIPE} --out runs/no-fr --dry-run   # cost, writes nothing",
        f"msa-edit run {_RECIPE} --out runs/no-fr",
        f"msa-edit run {_RECIPE} --out runs/t --set model.path=./local-mixtral",
    ],
    "validate": [
        f"msa-edit validate {_RECIPE}",
        f"msa-edit validate {_RECIPE} --set estimator.budget=800",
    ],
    "analyze": [
        f"msa-edit analyze {_RECIPE} --out runs/no-fr --dry-run",
        f"msa-edit analyze {_RECIPE} --out runs/no-fr   # rerun to resume a killed analysis",
        f"msa-edit analyze {_RECIPE} --out runs/no-fr --set estimator.budget=800",
    ],
    "plan": [
        f"msa-edit plan {_RECIPE} --out runs/no-fr",
        f"msa-edit plan {_RECIPE} --out runs/no-fr --show   # prints plan.json",
        f"msa-edit plan {_RECIPE} --out runs/no-fr --set plan.per_layer=2",
    ],
    "edit": [f"msa-edit edit {_RECIPE} --out runs/no-fr   # after editing plan.json by hand"],
    "evaluate": [f"msa-edit evaluate {_RECIPE} --out runs/no-fr"],
    "export": [
        f"msa-edit export {_RECIPE} --out runs/no-fr",
        f"msa-edit export {_RECIPE} --out runs/no-fr --set export.push=true "
        "--set export.repo_id=you/mixtral-no-fr",
    ],
    "units": [
        "msa-edit units ./runs/demo/model",
        "msa-edit units mistralai/Mixtral-8x7B-v0.1 --kind experts",
        "msa-edit units meta-llama/Llama-3.2-1B --kind heads --names",
    ],
    "tiny-moe": [
        "msa-edit tiny-moe --text en=en.txt --text fr=fr.txt --out models/tiny",
        "msa-edit tiny-moe --text en=en.txt --text zh=zh.txt --out models/tiny-olmoe "
        "--family olmoe --steps 400",
    ],
    "example": [
        "msa-edit example",
        "msa-edit example --players 8 --budget 120 --method permutation --seed 1",
    ],
}


def version() -> str:
    """The installed msa-edit's version (from its metadata: importing the `msa_edit` package
    itself from here would tie the command line to everything the package exposes)."""
    try:
        return importlib.metadata.version("msa-edit")
    except importlib.metadata.PackageNotFoundError:
        return "(not installed)"


def _parser() -> argparse.ArgumentParser:
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="msa-edit", description=DESCRIPTION, epilog=EPILOG, formatter_class=raw
    )
    parser.add_argument("--version", action="version", version=f"msa-edit {version()}")
    loudness = parser.add_mutually_exclusive_group()
    loudness.add_argument(
        "-v", "--verbose", action="store_true", help="also log progress details (level INFO)"
    )
    loudness.add_argument("-q", "--quiet", action="store_true", help="log errors only")
    parser.add_argument(
        "--log-file", metavar="FILE",
        help="append timestamped log records and everything printed to FILE",
    )  # fmt: skip
    commands = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", help="one of (each has its own --help):"
    )

    def command(name: str, text: str, about: str = "") -> argparse.ArgumentParser:
        examples = "examples:\n" + "\n".join(f"  {line}" for line in EXAMPLES[name])
        about = f"{text[0].upper()}{text[1:]}.\n\n{about}".strip()
        return commands.add_parser(
            name, help=text, description=about, epilog=examples, formatter_class=raw
        )

    demo = command(
        "demo", "the bundled demo: remove a tiny multilingual MoE's Chinese experts",
        "Trains (once, then cached) a tiny Mixtral on the bundled text and runs the bundled\n"
        f"recipe {DEMO_RECIPE.name} end to end into --out, on the CPU in minutes.",
    )  # fmt: skip
    _run_arguments(demo, recipe=False)
    run = command(
        "run", "carry out a recipe end to end into a run directory",
        "analyze -> plan -> edit -> evaluate -> export; finished stages are kept, so rerunning\n"
        "the same command resumes.",
    )  # fmt: skip
    _run_arguments(run)
    _dry_run_argument(run)
    validate = command(
        "validate", "check a recipe without loading a model",
        "Prints a one-line summary of a valid recipe, or one error line naming the key path.",
    )  # fmt: skip
    validate.add_argument("recipe", metavar="RECIPE", help="recipe YAML file")
    _set_argument(validate)
    for stage, text in STAGES.items():
        sub = command(stage, text, "Reads and writes the run directory --out.")
        _run_arguments(sub)
        if stage == "analyze":
            _dry_run_argument(sub)
        if stage == "plan":
            sub.add_argument(
                "--show", action="store_true",
                help="print the run directory's plan instead of planning (changes nothing)",
            )  # fmt: skip
    units = command(
        "units", "list a model's lesionable units and the globs that select them",
        "Reads the model's config (a local folder or a Hub id) and builds it without weights;\n"
        "prints per unit kind the count, the layers, the count per layer and a glob for recipes.",
    )  # fmt: skip
    units.add_argument("model", metavar="MODEL", help="model folder or Hugging Face Hub id")
    units.add_argument(
        "--kind", action="append", choices=KINDS, default=None,
        help="only this unit kind (repeatable; default: all)",
    )  # fmt: skip
    units.add_argument("--names", action="store_true", help="also print every unit's name")
    tiny = command(
        "tiny-moe", "train a tiny MoE (Mixtral or OLMoE) on text files (reproducible)",
        "Writes a Hugging Face model directory with its tokenizer; the same files, steps and\n"
        "seed give a bit-identical model (a finished one is reused).",
    )  # fmt: skip
    tiny.add_argument(
        "--text", action="append", default=[], metavar="LANG=FILE",
        help="a language and its text file, one sentence a line (repeat per language)",
    )  # fmt: skip
    tiny.add_argument("--out", required=True, metavar="DIR", help="model directory to write")
    tiny.add_argument(
        "--steps", type=int, default=None, help=f"training steps (default {DEFAULT_STEPS})"
    )
    tiny.add_argument("--seed", type=int, default=0, help="training seed (default 0)")
    tiny.add_argument(
        "--family", choices=FAMILIES, default=DEFAULT_FAMILY,
        help=f"model family (default {DEFAULT_FAMILY})",
    )  # fmt: skip
    example = command(
        "example", "Shapley values of a small MLP's hidden units, checked against exact",
        "Lesion = a hidden unit's output zeroed; value = mean log-likelihood of the true class.",
    )  # fmt: skip
    example.add_argument(
        "--players", type=int, default=10,
        help=f"hidden units, 2 to {EXACT_MAX_PLAYERS} (default 10)",
    )  # fmt: skip
    example.add_argument("--budget", type=int, default=200, help="distinct coalitions (200)")
    example.add_argument(
        "--method", choices=METHODS, default="auto", help="Shapley estimator (default auto)"
    )
    example.add_argument("--seed", type=int, default=0, help="seed of the MLP and the estimator")
    return parser


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


def _dry_run_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dry-run", action="store_true",
        help="load the model and print what the run would cost; write nothing",
    )  # fmt: skip


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
    from msa_edit.recipes import runner

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


def run_dry(recipe: Recipe) -> None:
    """Print what running `recipe` would cost (the model is loaded; nothing is written)."""
    from msa_edit.recipes import runner

    quiet_libraries()
    print(runner.dry_run(recipe))


def run_show_plan(out: str) -> None:
    """Print the plan in run directory `out` (nothing is planned or written)."""
    from msa_edit.recipes import runner

    print(runner.show_plan(Path(out)))


def run_validate(path: str, overrides: Sequence[str]) -> None:
    """Print a one-paragraph summary of a valid recipe."""
    from msa_edit import optional
    from msa_edit.recipes import load_recipe

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
    if recipe.screen is not None:
        how = f"{' + '.join(recipe.screen.method)} (keep {recipe.screen.keep})"
        analysis = f"screen {how} for {recipe.screen_target}, {analysis}"
    print(
        f"{path}: valid; model {recipe.model.name}, units {', '.join(recipe.units)}, "
        f"targets {', '.join(recipe.targets.sets)}, {analysis}, stages {', '.join(stages)}"
    )
    if recipe.model.bits is not None and not optional.available("bitsandbytes"):
        need = optional.missing("bitsandbytes", f"{recipe.model.bits}-bit loading")
        print(f"{path}: to run it here: {need}")


def model_skeleton(model: str) -> nn.Module:
    """Model `model` (folder, GGUF file or Hub id) built from its config on the meta device: its
    modules and shapes without weights. Loads the weights only if a meta build fails."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from msa_edit.gguf import plain_path

    model = plain_path(model)
    local = Path(model).expanduser()
    if model.startswith(("/", ".", "~")) and not local.is_dir():
        raise MsaEditError(f"model folder {local} does not exist; give a model folder or Hub id")
    try:
        config = AutoConfig.from_pretrained(model, trust_remote_code=False)
        try:
            with torch.device("meta"):
                return cast("nn.Module", AutoModelForCausalLM.from_config(config))
        except (RuntimeError, NotImplementedError, TypeError) as exc:
            log.info("building %s on the meta device failed (%s); loading its weights", model, exc)
            loaded = AutoModelForCausalLM.from_pretrained(model, trust_remote_code=False)
            return cast("nn.Module", loaded)
    except (OSError, ValueError, KeyError) as exc:
        reason = (str(exc).strip().splitlines() or [exc.__class__.__name__])[0]
        raise MsaEditError(
            f"cannot load model {short(model)} ({reason}); give a local model folder with "
            "config.json, or a Hub id you can reach"
        ) from None


def _spans(numbers: Sequence[int]) -> str:
    """'0-3, 5, 7-9' for [0, 1, 2, 3, 5, 7, 8, 9].

    >>> _spans([0, 1, 2, 3, 5, 7, 8, 9]), _spans([4])
    ('0-3, 5, 7-9', '4')
    """
    runs: list[list[int]] = []
    for n in sorted(numbers):
        if runs and n == runs[-1][-1] + 1:
            runs[-1].append(n)
        else:
            runs.append([n])
    return ", ".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs)


def run_units(model: str, kinds: Sequence[str] | None, names: bool) -> None:
    """Print per unit kind of `model`: count, layers, count per layer, a glob; names if asked."""
    from msa_edit.units import Unit, discover

    quiet_libraries()
    skeleton = model_skeleton(model)
    wanted = list(dict.fromkeys(kinds)) if kinds else list(KINDS)
    found = discover(skeleton, wanted)  # type: ignore[arg-type]
    model_type = getattr(getattr(skeleton, "config", None), "model_type", "?")
    n_layers = len({u.layer for u in discover(skeleton, ["layer"])})
    print(f"units of {model} ({model_type}, {n_layers} layers)")
    by_kind: dict[str, list[Unit]] = {}
    for u in found:
        by_kind.setdefault(u.kind, []).append(u)
    for kind in wanted:
        of_kind = by_kind.get(kind, [])
        if not of_kind:
            print(f"{kind:<8} {0:>7}  none in this model")
            continue
        per_layer: dict[int, int] = {}
        for u in of_kind:
            per_layer[u.layer] = per_layer.get(u.layer, 0) + 1
        counts = set(per_layer.values())
        each = (
            f"{counts.pop()} per layer"
            if len(counts) == 1
            else "per layer " + ", ".join(f"{k}:{v}" for k, v in sorted(per_layer.items()))
        )
        glob = str(Unit(0, kind, 0)).replace("0", "*")  # type: ignore[arg-type]
        print(f"{kind:<8} {len(of_kind):>7}  layers {_spans(list(per_layer))}  {each}  glob {glob}")
        if names:
            for u in of_kind:
                print(f"  {u}")


def run_tiny_moe(
    texts: Sequence[str], out: str, steps: int | None, seed: int, family: str = DEFAULT_FAMILY
) -> Path:
    """Train (or reuse) a tiny MoE of `family` into `out` and print what it learned."""
    import torch

    from msa_edit.tiny_moe import (
        TinyMoeConfig,
        build_tiny_moe,
        parse_text_args,
        read_meta,
        routing_summary,
    )

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
    from msa_edit.shapley import estimate
    from msa_edit.shapley.exact import EXACT_MAX_PLAYERS
    from msa_edit.shapley.toys import mlp_game

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


class _Tee:
    """A text stream that writes to `stream` and hands each finished line to `line`; of a line
    redrawn with carriage returns (a progress bar) only the last state, as a terminal shows it."""

    def __init__(self, stream: TextIO, line: Callable[[str], None]) -> None:
        self.stream, self._line, self._pending = stream, line, ""

    def write(self, text: str) -> int:
        written = self.stream.write(text)
        *lines, rest = (self._pending + text).split("\n")
        for done in lines:
            self._line(done.rsplit("\r", 1)[-1])
        self._pending = rest.rsplit("\r", 1)[-1]
        return written

    def flush(self) -> None:
        self.stream.flush()

    def finish(self) -> None:
        """Hand over an unfinished last line."""
        if self._pending:
            self._line(self._pending)
            self._pending = ""

    def __getattr__(self, name: str) -> Any:  # isatty, fileno, encoding, ...: the real stream's
        return getattr(self.stream, name)


@contextmanager
def logging_to(level: int, log_file: str | None) -> Iterator[None]:
    """Set the `msa_edit` logger's level and, with `log_file`, append timestamped log records and
    every line printed to stdout/stderr to that file; everything is restored afterwards."""
    old_level = log.level
    added: list[logging.Handler] = []
    log.setLevel(level)
    if level < logging.WARNING or log_file:  # logging's last resort shows WARNING+ only, alone
        console = logging.StreamHandler(sys.stderr)
        console.setFormatter(logging.Formatter("%(message)s"))
        added.append(console)
    tees: list[tuple[str, _Tee]] = []
    if log_file:
        try:
            file = logging.FileHandler(log_file, encoding="utf-8")
        except OSError as exc:
            log.setLevel(old_level)
            raise MsaEditError(
                f"cannot open --log-file {short(log_file)} ({exc.strerror})"
            ) from None
        file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        added.append(file)

        def line(text: str) -> None:
            file.acquire()
            try:
                stream = file.stream
                assert stream is not None
                stream.write(text + "\n")
                stream.flush()
            finally:
                file.release()

        for name in ("stdout", "stderr"):
            tee = _Tee(getattr(sys, name), line)
            tees.append((name, tee))
            setattr(sys, name, cast(TextIO, tee))
    for handler in added:
        log.addHandler(handler)
    try:
        yield
    finally:
        for name, tee in tees:
            tee.finish()
            setattr(sys, name, tee.stream)
        for handler in added:
            log.removeHandler(handler)
            handler.close()
        log.setLevel(old_level)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `msa-edit`; returns the exit status."""
    args = _parser().parse_args(argv)
    level = logging.INFO if args.verbose else logging.ERROR if args.quiet else logging.WARNING
    try:
        with logging_to(level, args.log_file):
            return _command(args)
    except MsaEditError as exc:  # only --log-file itself fails here
        print(f"msa-edit: error: {exc}", file=sys.stderr)
        return 2


def _command(args: argparse.Namespace) -> int:
    """Carry out the parsed command; bad input and machine failures are one line and status 2."""
    try:
        if args.command in ("run", "demo", *STAGES):
            if getattr(args, "show", False):
                run_show_plan(args.out)
                return 0
            from msa_edit.recipes import load_recipe

            path = DEMO_RECIPE if args.command == "demo" else args.recipe
            if args.command in STAGES:  # a stage keeps what earlier stages were told
                from msa_edit.recipes.runner import stage_recipe

                recipe = stage_recipe(path, Path(args.out), args.overrides)
            else:
                recipe = load_recipe(path, args.overrides)
            if getattr(args, "dry_run", False):
                run_dry(recipe)
                return 0
            start = time.perf_counter()
            result = run_recipe("run" if args.command == "demo" else args.command,
                                recipe, Path(args.out))  # fmt: skip
            where = result or Path(args.out)
            print(
                f"msa-edit {args.command}: done in {time.perf_counter() - start:.0f} s -> {where}"
            )
        elif args.command == "validate":
            run_validate(args.recipe, args.overrides)
        elif args.command == "units":
            run_units(args.model, args.kind, args.names)
        elif args.command == "example":
            run_example(args.players, args.budget, args.method, args.seed)
        elif args.command == "tiny-moe":
            run_tiny_moe(args.text, args.out, args.steps, args.seed, args.family)
    except MsaEditError as exc:
        print(f"msa-edit: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (`msa-edit units M | head`): stop quietly
        _silence_stdout()
        return 141  # 128 + SIGPIPE, as Unix tools exit
    except Exception as exc:
        reason = system_failure(exc)
        if reason is None:
            raise
        print(f"msa-edit: error: {reason}", file=sys.stderr)
        return 2
    return 0


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's final flush cannot fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # no real file descriptor (e.g. captured)
        pass


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
