"""The `msa-edit` entry point: the example runs, and bad input gives one line and exit 2."""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path

import pytest

from msa_edit import cli
from msa_edit.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_example_prints_estimate_against_exact(capsys) -> None:
    assert main(["example", "--players", "8", "--budget", "120"]) == 0
    out = capsys.readouterr().out
    assert "adjusted estimate of 8 hidden units with 120 of 256 coalitions" in out
    number = r"\s+(-?\d+\.\d+)"
    rows = re.findall(r"^\s+\d+" + number * 4 + "$", out, re.M)
    assert len(rows) == 8
    errors = [float(r[3]) for r in rows]
    stderrs = [float(r[1]) for r in rows]
    assert max(errors) < 4 * max(stderrs)
    left, right = re.search(r"sum of values (\S+) = .* = (\S+)", out).groups()
    assert left == right


def test_bad_budget_is_one_line_and_exit_2(capsys) -> None:
    assert main(["example", "--budget", "5", "--method", "permutation"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("msa-edit: error: budget=5 is too small")


def test_a_safetensors_write_failure_is_one_line(tmp_path, monkeypatch, capsys) -> None:
    from safetensors import SafetensorError

    from msa_edit import cli

    def failing(*args, **kwargs) -> None:
        raise SafetensorError("Error while serializing: IoError(StorageFull)\ndetails")

    monkeypatch.setattr(cli, "run_example", failing)
    assert main(["example"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "safetensors could not write (Error while serializing" in err[0]
    assert "free space or choose another --out" in err[0]


def test_a_bug_still_shows_its_traceback(monkeypatch) -> None:
    import pytest

    from msa_edit import cli

    def buggy(*args, **kwargs) -> None:
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(cli, "run_example", buggy)
    with pytest.raises(ZeroDivisionError):
        main(["example"])


LIGHT_ARGVS = [["--help"], ["--version"]] + [
    [command, "--help"]
    for command in (
        "demo", "run", "validate", "analyze", "plan", "edit", "evaluate", "export", "units",
        "tiny-moe", "example",
    )
]  # fmt: skip


def test_help_and_version_import_neither_torch_nor_transformers() -> None:
    import subprocess
    import sys

    script = (
        "import contextlib, io, sys\n"
        "from msa_edit import cli\n"
        f"for argv in {LIGHT_ARGVS!r}:\n"
        "    with contextlib.redirect_stdout(io.StringIO()) as out:\n"
        "        try:\n"
        "            cli.main(argv)\n"
        "        except SystemExit as exc:\n"
        "            assert exc.code == 0, (argv, exc.code)\n"
        "    assert out.getvalue().strip(), argv\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'datasets') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("recipe", sorted(p.name for p in (ROOT / "recipes").glob("*.yaml")))
def test_validate_imports_no_model_library(recipe: str) -> None:
    """`validate` reads and checks a recipe without transformers, peft, lm-eval or bitsandbytes
    (their imports took 3.4 s of its 5 s); measured 1.5-1.6 s for each shipped recipe."""
    import subprocess

    script = (
        "import contextlib, io, sys\n"
        "from msa_edit import cli\n"
        "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
        f"    assert cli.main(['validate', {str(ROOT / 'recipes' / recipe)!r}]) == 0\n"
        "assert ': valid;' in out.getvalue(), out.getvalue()\n"
        "libraries = ('transformers', 'peft', 'lm_eval', 'bitsandbytes', 'accelerate')\n"
        "heavy = sorted(m for m in libraries if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_version_prints_name_and_version(capsys) -> None:
    import pytest

    import msa_edit

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out == f"msa-edit {msa_edit.__version__}\n"


def test_every_help_explains_itself_with_examples() -> None:
    import argparse

    from msa_edit import cli

    parser = cli._parser()
    assert len(parser.description.splitlines()) > 5
    assert "analyze -> plan -> edit -> evaluate -> export" in parser.description
    assert parser.epilog.startswith("examples:")
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert set(commands.choices) == {*cli.EXAMPLES}
    for name, sub in [("msa-edit", parser), *commands.choices.items()]:
        assert sub.formatter_class is argparse.RawDescriptionHelpFormatter, name
        assert "examples:\n  msa-edit " in sub.epilog, name
        for action in sub._actions:
            assert action.help and action.help != argparse.SUPPRESS, (name, action.dest)
    for name in commands.choices:
        assert all(line.startswith(f"msa-edit {name}") for line in cli.EXAMPLES[name]), name


def test_mirrored_constants_match_their_modules() -> None:
    from msa_edit import cli, shapley, tiny_moe, units
    from msa_edit.shapley.exact import EXACT_MAX_PLAYERS

    assert cli.METHODS == shapley.METHODS
    assert cli.EXACT_MAX_PLAYERS == EXACT_MAX_PLAYERS
    assert cli.FAMILIES == tiny_moe.FAMILIES
    assert cli.DEFAULT_FAMILY == tiny_moe.DEFAULT_FAMILY
    assert tiny_moe.TinyMoeConfig.steps == cli.DEFAULT_STEPS
    assert cli.KINDS == units.KINDS


def _unit_counts(out: str) -> dict[str, int]:
    rows = re.findall(r"^(experts|heads|neurons|shared_experts|layer)\s+(\d+)\s", out, re.M)
    return {kind: int(count) for kind, count in rows}


@pytest.mark.parametrize("family", ["mixtral", "llama", "deepseek_v3"])
def test_units_counts_match_discover(family, tmp_path, capsys) -> None:
    from tiny_models import build

    from msa_edit.units import KINDS, discover

    model = build(family)
    model.save_pretrained(tmp_path / family)
    capsys.readouterr()
    assert main(["units", str(tmp_path / family)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == f"units of {tmp_path / family} ({family}, 2 layers)"
    assert _unit_counts(out) == {kind: len(discover(model, [kind])) for kind in KINDS}
    kind, glob = {
        "llama": ("neurons", "mlp.neurons.*"),
        "deepseek_v3": ("shared_experts", "shared_experts.*"),
    }.get(family, ("experts", "experts.*"))
    per_layer = len(discover(model, [kind])) // 2
    assert f"layers 0-1  {per_layer} per layer  glob layers.*.{glob}" in out


def test_units_names_lists_every_unit_of_the_kind(tmp_path, capsys) -> None:
    from tiny_models import build

    from msa_edit.units import discover, select

    model = build("mixtral")
    model.save_pretrained(tmp_path)
    capsys.readouterr()
    assert main(["units", str(tmp_path), "--kind", "experts", "--names"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split()[:2] == ["experts", "12"]
    assert "layers 0-1  6 per layer  glob layers.*.experts.*" in lines[1]
    names = [line.strip() for line in lines[2:]]
    assert names == [str(u) for u in discover(model, ["experts"])]
    assert names == [str(u) for u in select(model, "layers.*.experts.*")]


def test_units_of_a_missing_folder_is_one_line(tmp_path, capsys) -> None:
    assert main(["units", str(tmp_path / "absent")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("msa-edit: error: model folder")


@pytest.mark.parametrize("command", ["run", "analyze"])
def test_dry_run_prints_the_estimate_and_writes_nothing(command, tmp_path, monkeypatch, capsys):
    from msa_edit.cli import DEMO_RECIPE
    from msa_edit.recipes import Recipe, runner

    seen: list[Recipe] = []

    def fake_dry_run(recipe: Recipe) -> str:
        seen.append(recipe)
        return "would load: tiny MoE\nforwards: 512 coalitions"

    def must_not_run(*args, **kwargs):
        raise AssertionError("a dry run ran a stage")

    monkeypatch.setattr(runner, "dry_run", fake_dry_run, raising=False)
    for stage in ("run", "analyze", "load_model"):
        monkeypatch.setattr(runner, stage, must_not_run)
    out = tmp_path / "run"
    budget = ["--set", "estimator.budget=64"]
    assert main([command, str(DEMO_RECIPE), "--out", str(out), "--dry-run", *budget]) == 0
    assert capsys.readouterr().out == "would load: tiny MoE\nforwards: 512 coalitions\n"
    assert len(seen) == 1 and seen[0].estimator.budget == 64
    assert not out.exists()


def test_plan_show_prints_the_plan_instead_of_planning(tmp_path, monkeypatch, capsys) -> None:
    from msa_edit.cli import DEMO_RECIPE
    from msa_edit.recipes import runner

    def fake_show_plan(out: Path) -> str:
        assert out == tmp_path
        return "remove 2 units: layers.0.experts.3, layers.1.experts.5"

    def must_not_plan(*args, **kwargs):
        raise AssertionError("--show planned")

    monkeypatch.setattr(runner, "show_plan", fake_show_plan, raising=False)
    monkeypatch.setattr(runner, "plan", must_not_plan)
    assert main(["plan", str(DEMO_RECIPE), "--out", str(tmp_path), "--show"]) == 0
    assert capsys.readouterr().out == "remove 2 units: layers.0.experts.3, layers.1.experts.5\n"


def test_log_file_gets_every_printed_line(tmp_path, capsys) -> None:
    import sys

    log = tmp_path / "msa-edit.log"
    stdout, stderr = sys.stdout, sys.stderr
    assert main(["--log-file", str(log), "example", "--players", "4", "--budget", "20"]) == 0
    assert (sys.stdout, sys.stderr) == (stdout, stderr)
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 7
    written = log.read_text(encoding="utf-8").splitlines()
    assert all(line in written for line in printed)


@pytest.mark.parametrize(
    ("flags", "level"),
    [([], logging.WARNING), (["-v"], logging.INFO), (["--quiet"], logging.ERROR)],
)
def test_verbose_and_quiet_set_the_level_and_the_log_file_has_timestamps(
    flags, level, tmp_path, monkeypatch, capsys
) -> None:
    from msa_edit import cli

    logger = logging.getLogger("msa_edit")
    before = logger.level
    seen: list[int] = []

    def fake_example(*args, **kwargs) -> None:
        seen.append(logger.getEffectiveLevel())
        logging.getLogger("msa_edit.some.module").warning("a warning")
        logging.getLogger("msa_edit.some.module").info("a detail")
        print("printed\rredrawn")
        print("no newline at the end", end="", file=sys.stderr)

    monkeypatch.setattr(cli, "run_example", fake_example)
    log = tmp_path / "msa-edit.log"
    assert main([*flags, "--log-file", str(log), "example"]) == 0
    assert seen == [level] and logger.level == before and not logger.handlers
    text = log.read_text(encoding="utf-8")
    stamp = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} "
    assert bool(re.search(stamp + "WARNING msa_edit.some.module: a warning", text)) == (
        level <= logging.WARNING
    )
    assert bool(re.search(stamp + "INFO msa_edit.some.module: a detail", text)) == (
        level <= logging.INFO
    )
    assert "redrawn\n" in text.splitlines(keepends=True) and "printed" not in text
    assert text.endswith("no newline at the end\n")
    err = capsys.readouterr().err
    assert ("a warning" in err) == (level <= logging.WARNING)
    assert ("a detail" in err) == (level <= logging.INFO)


def test_an_unwritable_log_file_is_one_line(tmp_path, capsys) -> None:
    assert main(["--log-file", str(tmp_path / "absent" / "x.log"), "example"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("msa-edit: error: cannot open --log-file")


def test_a_closed_pipe_ends_quietly(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    def closed(*_: object) -> None:  # `msa-edit units M | head`: the reader went away
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(cli, "run_units", closed)
    assert main(["units", "some/model"]) == 141
    assert capsys.readouterr().err == ""
