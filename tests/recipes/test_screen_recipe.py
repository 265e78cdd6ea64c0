"""The recipe's screen stage: a cheap screen narrows the units before the analysis and the plan.

Checked against an independent computation of the screen (`msa_edit.screens.gate_attribution`
on the same blocks) and against the files every later stage reads.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from tiny_models import LANGS, UD_TEXT
from transformers import AutoModelForCausalLM, AutoTokenizer

from msa_edit.cli import main
from msa_edit.errors import MsaEditError
from msa_edit.plan import Plan
from msa_edit.recipes import load_recipe
from msa_edit.screens import gate_attribution
from msa_edit.texts import text_blocks

N_SEQ, SEQ_LEN = 4, 16


def recipe(model: Path, **screen: Any) -> dict[str, Any]:
    """The tiny Mixtral's 4 heads, screened to 2 zh-specific ones, then Shapley and a search."""
    sets = {lang: {"path": str(UD_TEXT / f"{lang}.txt"), "n_seq": N_SEQ, "seq_len": SEQ_LEN}
            for lang in LANGS}  # fmt: skip
    return {
        "model": {"path": str(model)},
        "units": "layers.*.heads.*",
        "targets": {"sets": sets},
        "screen": {"method": "gradient", "keep": 2} | screen,
        "estimator": {"method": "exact"},
        "lesion": {"kind": "zero"},
        "plan": {"target": ["zh"], "method": "search", "fraction": 0.5, "min_selectivity": 1.0},
        "evaluate": {"n_seq": 2, "seq_len": SEQ_LEN},
    }


def write(tmp: Path, data: dict[str, Any], name: str = "r") -> Path:
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def screened_run(tiny_mixtral: Path, tmp_path_factory) -> tuple[Path, int]:
    tmp = tmp_path_factory.mktemp("screen")
    code = main(["run", str(write(tmp, recipe(tiny_mixtral))), "--out", str(tmp / "out")])
    return tmp / "out", code


def expected_heads(model_dir: Path, keep: int) -> list[str]:
    """The `keep` heads whose gradient x activation estimate for zh most exceeds en's and ru's."""
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    blocks = {x: text_blocks(tok, UD_TEXT / f"{x}.txt", N_SEQ, SEQ_LEN) for x in LANGS}
    units, scores = gate_attribution(model, blocks, "heads")
    zh = LANGS.index("zh")
    others = torch.cat([scores[:, :zh], scores[:, zh + 1 :]], 1).max(1).values
    order = torch.argsort(-(scores[:, zh].double() - others.double()), stable=True)
    return [str(units[i]) for i in order[:keep].tolist()]


def test_the_screen_keeps_the_most_specific_heads_and_the_analysis_uses_them(
    screened_run: tuple[Path, int], tiny_mixtral: Path
) -> None:
    out, code = screened_run
    record = json.loads((out / "screen.json").read_text())
    assert record["units"] == expected_heads(tiny_mixtral, 2)  # most specific first
    assert record["from"] == 4 and record["method"] == ["gradient"] and record["target"] == "zh"
    shapley = json.loads((out / "shapley.json").read_text())
    assert shapley["units"] == sorted(record["units"])  # 2 players: 4 coalitions, not 16
    assert shapley["n_evaluations"] == 4
    report = (out / "report.md").read_text() if code == 0 else ""
    if code == 0:
        assert "| screen (gradient, for zh) | 4 → 2 |" in report
        assert "| Shapley analysis | 2 | 4 coalitions |" in report
        plan = Plan.load(out / "plan.json")
        assert set(plan.units) <= set(record["units"])
        measured = [c["units"] for c in plan.search["candidates"]]
        assert record["units"][:1] in measured  # the screen's own top pick competes


def test_a_second_run_reads_the_screen_back(
    screened_run: tuple[Path, int], tiny_mixtral: Path, tmp_path: Path
) -> None:
    out, _ = screened_run
    saved = json.loads((out / "screen.json").read_text())
    fake = ["layers.1.heads.0", "layers.1.heads.1"]  # not what the screen picks: read, not redone
    (out / "screen.json").write_text(json.dumps(saved | {"units": fake}))
    (out / "shapley.json").unlink()
    (out / "shapley.ckpt").unlink(missing_ok=True)
    data = recipe(tiny_mixtral)
    assert main(["analyze", str(write(tmp_path, data)), "--out", str(out)]) == 0
    assert json.loads((out / "shapley.json").read_text())["units"] == fake


@pytest.mark.parametrize(
    ("screen", "message"),
    [
        ({"method": "lape"}, "lape ranks MLP neurons only but units.0 is 'layers.*.heads.*'"),
        ({"target": "xx"}, "screen.target: unknown target set 'xx'"),
        ({"method": []}, "give at least one screen method"),
        ({"keep": 0}, "screen.keep"),
    ],
)
def test_bad_screens_are_one_line(tiny_mixtral: Path, tmp_path: Path, screen, message) -> None:
    with pytest.raises(MsaEditError, match=re.escape(message)):
        load_recipe(write(tmp_path, recipe(tiny_mixtral, **screen)))


def test_a_screen_keeping_more_units_than_there_are_fails_before_writing(
    tiny_mixtral: Path, tmp_path: Path, capsys
) -> None:
    path = write(tmp_path, recipe(tiny_mixtral, keep=5))
    assert main(["run", str(path), "--out", str(tmp_path / "out")]) == 2
    assert "screen keep=5 but there are 4 units; lower keep" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
