"""The `msa-edit` entry point: the example runs, and bad input gives one line and exit 2."""

from __future__ import annotations

import re

from msa_edit.cli import main


def test_example_prints_estimate_against_exact(capsys) -> None:
    assert main(["example", "--players", "8", "--budget", "120"]) == 0
    out = capsys.readouterr().out
    assert "kernel estimate of 8 hidden units with 120 of 256 coalitions" in out
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
