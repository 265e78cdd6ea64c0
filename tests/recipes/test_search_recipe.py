"""Plans without Shapley values through `msa-edit run`: search, leave-one-out, REAP, frequency.

Checked against independent computations: leave-one-out against lesioned evaluations, the
exported model against the reroute lesion of the plan's units, eval.json's candidates against
fresh evaluations of each candidate's lesion.
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
from msa_edit.evaluate.language import block_nll, language_nll
from msa_edit.lesions import lesioned
from msa_edit.plan import Plan
from msa_edit.recipes import load_recipe
from msa_edit.routing import routing_stats
from msa_edit.texts import text_blocks
from msa_edit.units import Unit

N_SEQ, SEQ_LEN = 4, 16
UNITS = [Unit(la, "experts", e) for la in range(2) for e in range(4)]


def recipe(model: Path, **plan: Any) -> dict[str, Any]:
    """Compress the tiny Mixtral (2 layers x 4 experts): one expert per layer, no analysis."""
    sets = {lang: {"path": str(UD_TEXT / f"{lang}.txt"), "n_seq": N_SEQ, "seq_len": SEQ_LEN}
            for lang in LANGS}  # fmt: skip
    return {
        "model": {"path": str(model)},
        "units": "layers.*.experts.*",
        "targets": {"sets": sets},
        "plan": {
            "mode": "least_useful",
            "method": "search",
            "per_layer": 1,
            "min_keep_per_layer": 2,
        }
        | plan,
        "evaluate": {"n_seq": 2, "seq_len": SEQ_LEN},
    }


def run(tmp: Path, data: dict[str, Any], name: str = "out") -> Path:
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    assert main(["run", str(path), "--out", str(tmp / name)]) == 0
    return tmp / name


@pytest.fixture(scope="module")
def search_run(tiny_mixtral: Path, tmp_path_factory) -> Path:
    return run(tmp_path_factory.mktemp("search"), recipe(tiny_mixtral, coalitions=40))


def calibration(tokenizer) -> dict[str, torch.Tensor]:
    return {lang: text_blocks(tokenizer, UD_TEXT / f"{lang}.txt", N_SEQ, SEQ_LEN) for lang in LANGS}


def test_search_plan_records_its_candidates_within_its_budget(search_run: Path) -> None:
    plan = Plan.load(search_run / "plan.json")
    assert plan.method == "search" and plan.mode == "least_useful"
    assert not (search_run / "shapley.json").exists()  # no Shapley analysis was paid for
    search = plan.search
    assert 9 <= search["n_evaluations"] <= 40 and search["coalitions"] == 40
    names = [c["name"] for c in search["candidates"]]
    assert {"search", "leave-one-out", "reap", "frequency"} <= set(names)
    chosen = next(c for c in search["candidates"] if c["name"] == search["chosen"])
    assert list(plan.units) == chosen["units"] and len(plan.units) == 2
    assert chosen["check"] == min(c["check"] for c in search["candidates"])
    assert {u.layer for u in plan.unit_list} == {0, 1}


def test_the_search_exports_the_reroute_lesion_of_its_units(
    search_run: Path, tiny_mixtral: Path
) -> None:
    plan = Plan.load(search_run / "plan.json")
    base = AutoModelForCausalLM.from_pretrained(tiny_mixtral)
    edited = AutoModelForCausalLM.from_pretrained(search_run / "model")
    assert edited.config.num_local_experts == 3
    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    with lesioned(base, plan.unit_list, "reroute"):
        expected = base(ids).logits
    torch.testing.assert_close(edited(ids).logits, expected, atol=1e-5, rtol=1e-5)


def test_candidates_are_evaluated_on_held_out_text_and_reported(
    search_run: Path, tiny_mixtral: Path
) -> None:
    record = json.loads((search_run / "eval.json").read_text())
    plan = Plan.load(search_run / "plan.json")
    model = AutoModelForCausalLM.from_pretrained(tiny_mixtral)
    tokenizer = AutoTokenizer.from_pretrained(tiny_mixtral)
    texts = {lang: UD_TEXT / f"{lang}.txt" for lang in LANGS}
    for c in plan.search["candidates"]:
        with lesioned(model, [Unit.parse(n) for n in c["units"]], "reroute"):
            fresh = language_nll(model, tokenizer, texts, n_seq=2, seq_len=SEQ_LEN)
        got = record["candidates"][c["name"]]
        assert got == pytest.approx({k: v for k, v in fresh.items() if k.startswith("nll/")})
    chosen = record["candidates"][plan.search["chosen"]]
    assert chosen == pytest.approx({k: v for k, v in record["after"].items() if k in chosen})
    report = (search_run / "report.md").read_text()
    assert "## Candidates" in report and "held-out ru" in report
    assert f"**{plan.search['chosen']}**" in report and "Shapley" not in report.split("##")[0]
    assert (search_run / "candidates.png").read_bytes()[:4] == b"\x89PNG"


def test_loo_plan_equals_an_independent_leave_one_out(tiny_mixtral: Path, tmp_path) -> None:
    out = run(tmp_path, recipe(tiny_mixtral, method="loo"))
    plan = Plan.load(out / "plan.json")
    assert plan.method == "loo" and plan.search["n_evaluations"] == len(UNITS) + 2
    model = AutoModelForCausalLM.from_pretrained(tiny_mixtral)
    blocks = calibration(AutoTokenizer.from_pretrained(tiny_mixtral))

    def mean_nll(units: list[Unit]) -> torch.Tensor:  # per set, mean over blocks
        with lesioned(model, units, "reroute"):
            return torch.stack([block_nll(model, ids).mean() / (SEQ_LEN - 1)
                                for ids in blocks.values()])  # fmt: skip

    intact = torch.stack([block_nll(model, ids).mean() / (SEQ_LEN - 1) for ids in blocks.values()])
    loo = torch.stack([(mean_nll([u]) - intact).mean() for u in UNITS])
    scores = torch.tensor([plan.scores[str(u)] for u in UNITS], dtype=torch.float64)
    torch.testing.assert_close(scores, -loo, atol=1e-5, rtol=0)  # higher = removed first
    expected = sorted(min(layer, key=lambda u: float(loo[UNITS.index(u)]))
                      for layer in (UNITS[:4], UNITS[4:]))  # fmt: skip
    assert plan.unit_list == expected


@pytest.mark.parametrize("method", ["reap", "frequency"])
def test_routing_plans_take_the_lowest_scores(tiny_mixtral: Path, tmp_path, method: str) -> None:
    out = run(tmp_path, recipe(tiny_mixtral, method=method))
    plan = Plan.load(out / "plan.json")
    model = AutoModelForCausalLM.from_pretrained(tiny_mixtral)
    ids = torch.cat(list(calibration(AutoTokenizer.from_pretrained(tiny_mixtral)).values()))
    stats = routing_stats(model, ids)
    score = stats.score(method, UNITS)
    expected = [
        min(layer, key=lambda u: (float(score[UNITS.index(u)]), u.index))
        for layer in (UNITS[:4], UNITS[4:])
    ]
    assert plan.unit_list == expected and plan.method == method and not plan.search
    assert "## Candidates" not in (out / "report.md").read_text()


def test_targeted_search_refuses_what_the_check_half_does_not_confirm(
    tiny_mixtral: Path, tmp_path, capsys
) -> None:
    """The tiny Mixtral (60 training steps) has no zh-specific expert: the search's best removal
    stays within the retain bound and raises zh on the search half, but not significantly on the
    check half (+0.0000), so the plan is refused in one line and nothing is edited."""
    data = recipe(tiny_mixtral, mode="specific", target=["zh"], per_layer=1, retain_bound=0.5)
    path = tmp_path / "zh.yaml"
    path.write_text(yaml.safe_dump(data | {"edit": {"extra": "zero"}}), encoding="utf-8")
    assert main(["run", str(path), "--out", str(tmp_path / "out")]) == 2
    captured = capsys.readouterr()
    assert "plan: candidate search:" in captured.out and "within bounds" in captured.out
    assert "plan: chose none" in captured.out
    err = captured.err.strip().splitlines()
    assert err[-1].startswith("msa-edit: error: plan: no removal raises zh significantly")
    assert not (tmp_path / "out" / "plan.json").exists()
    assert not (tmp_path / "out" / "model").exists()


def test_recipes_without_shapley_validate(tiny_mixtral: Path, tmp_path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(recipe(tiny_mixtral)), encoding="utf-8")
    assert load_recipe(good).estimator is None
    cases = {
        "estimator: missing (required); only a plan with method loo": {"method": "shapley"},
        "plan.coalitions: only used with method loo or search": {"method": "reap",
                                                                 "coalitions": 10},
        "plan.method: reap is a compression score": {"method": "reap", "mode": "specific",
                                                      "target": ["ru"]},
    }  # fmt: skip
    for message, plan in cases.items():
        path = tmp_path / "bad.yaml"
        path.write_text(yaml.safe_dump(recipe(tiny_mixtral, **plan)), encoding="utf-8")
        with pytest.raises(MsaEditError, match=re.escape(message)):
            load_recipe(path)
    heads = recipe(tiny_mixtral, method="frequency") | {"units": "layers.*.heads.*",
                                                       "lesion": {"kind": "zero"}}  # fmt: skip
    path = tmp_path / "heads.yaml"
    path.write_text(yaml.safe_dump(heads), encoding="utf-8")
    with pytest.raises(MsaEditError, match="frequency scores experts only"):
        load_recipe(path)


def test_a_search_budget_below_its_minimum_fails_before_writing(
    tiny_mixtral: Path, tmp_path, capsys
) -> None:
    path = tmp_path / "small.yaml"
    path.write_text(yaml.safe_dump(recipe(tiny_mixtral, coalitions=5)), encoding="utf-8")
    assert main(["run", str(path), "--out", str(tmp_path / "out")]) == 2
    assert "(plan.coalitions) to at least" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
