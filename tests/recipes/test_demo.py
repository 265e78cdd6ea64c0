"""`msa-edit demo` end to end: shortened (30 training steps, 70 coalitions) for the run directory,
and reduced (three languages, a 2-layer model) for the property the README states."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from msa_edit.cli import DEMO_RECIPE, main
from msa_edit.evaluate.language import selectivity
from msa_edit.recipes import load_recipe

LANGUAGES = ("en", "de", "fr", "es", "ru", "zh")


def test_bundled_demo_recipe_is_the_repository_one() -> None:
    repo = Path(__file__).resolve().parents[2] / "recipes" / "demo.yaml"
    assert load_recipe(repo) == load_recipe(DEMO_RECIPE)


def test_demo_writes_the_whole_run_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.setenv("MSA_EDIT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--set", "model.tiny_moe.steps=30"]
    assert main([*args, "--set", "estimator.budget=98"]) == 0  # the kernel's least for 32
    assert "msa-edit demo: done" in capsys.readouterr().out
    shapley = json.loads((out / "shapley.json").read_text())
    assert len(shapley["units"]) == 32 and shapley["targets"] == list(LANGUAGES)
    assert shapley["n_evaluations"] == 98 and shapley["method"] == "adjusted"
    assert shapley["surrogate"] == "kernel"  # 16 sampled pairs: too few to cross-fit a surrogate
    plan = json.loads((out / "plan.json").read_text())
    assert plan["action"] == "remove" and plan["target"] == ["zh"] and plan["units"]
    record = json.loads((out / "eval.json").read_text())
    metrics = ("nll", "ppl", "bpb")
    assert set(record["after"]) == {f"{m}/{lang}" for m in metrics for lang in LANGUAGES}
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    AutoTokenizer.from_pretrained(out / "model")
    assert model.config.model_type == "mixtral"
    report = (out / "report.md").read_text()
    for png in re.findall(r"\]\((\S+\.png)\)", report):
        assert (out / png).stat().st_size > 1000
    rows = dict(re.findall(r"^\| (nll/\w+) \| (\S+) \|", report, re.M))
    assert rows == {k: f"{v:.4f}" for k, v in record["before"].items() if k.startswith("nll/")}


SIZE = "layers: 2, experts: 8, hidden: 64, intermediate: 96, heads: 2, vocab: 1000, seq_len: 32"
SETS = ", ".join(
    f"{k}: {{path: ../ud-text/{k}.txt, n_seq: 8, seq_len: 32}}" for k in ("en", "ru", "zh")
)
REDUCED = [  # the demo recipe on en, ru, zh and a 2-layer, 8-expert model (about 30 s, cached)
    "model.tiny_moe.texts={en: ../ud-text/en.txt, ru: ../ud-text/ru.txt, zh: ../ud-text/zh.txt}",
    "model.tiny_moe.steps=600",
    f"model.tiny_moe.config={{{SIZE}, batch_size: 16}}",
    f"targets.sets={{{SETS}}}",
    "evaluate.seq_len=32",
    "estimator.budget=256",
]


def test_the_reduced_demo_hurts_chinese_five_times_more_than_any_other_language(
    tmp_path: Path, capsys
) -> None:
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), *(a for s in REDUCED for a in ("--set", s))]) == 0
    plan = json.loads((out / "plan.json").read_text())
    assert plan["units"] and len(plan["units"]) <= 2  # at most one per layer, each past the bar
    record = json.loads((out / "eval.json").read_text())  # held-out text: never trained on
    found = selectivity(record["delta"], ["zh"])
    assert found is not None and found.own > 0.05 and found.ratio >= 5, found
    assert f"evaluate: {found.line()}" in capsys.readouterr().out  # the headline it prints
