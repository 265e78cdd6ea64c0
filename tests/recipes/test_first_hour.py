"""What a new user meets first: the Python API (with a model in memory), a dry run, the plan shown,
stages that keep the run directory's recipe, cards without local paths, an empty plan stopped
early, and an edit whose meaning differs from the analysis said out loud."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from tiny_models import UD_TEXT
from transformers import AutoModelForCausalLM, AutoTokenizer

import msa_edit
from msa_edit.cli import main
from msa_edit.errors import MsaEditError
from msa_edit.recipes import load_recipe, runner

pytestmark = pytest.mark.filterwarnings("ignore")


def recipe(model: Path, **stages: Any) -> dict[str, Any]:
    sets = {lang: {"path": str(UD_TEXT / f"{lang}.txt"), "n_seq": 2, "seq_len": 16}
            for lang in ("en", "ru")}  # fmt: skip
    base = {
        "model": {"path": str(model)},
        "units": "layers.*.experts.*",
        "targets": {"sets": sets},
        "estimator": {"budget": 28},
        "plan": {"mode": "least_useful", "target": ["ru"], "per_layer": 1},
        "evaluate": {"n_seq": 2, "seq_len": 16},
    }
    return base | stages


def write(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def test_the_api_runs_a_dict_recipe_on_a_model_in_memory(tiny_mixtral: Path, tmp_path) -> None:
    by_path = msa_edit.run(recipe(tiny_mixtral), out=tmp_path / "a")
    model = AutoModelForCausalLM.from_pretrained(tiny_mixtral)
    tokenizer = AutoTokenizer.from_pretrained(tiny_mixtral)
    in_memory = msa_edit.run(recipe(tiny_mixtral), out=tmp_path / "b", model=model,
                             tokenizer=tokenizer)  # fmt: skip
    assert by_path.name == in_memory.name == "report.md"
    for name in ("shapley.json", "plan.json", "eval.json"):
        assert (tmp_path / "a" / name).read_text() == (tmp_path / "b" / name).read_text(), name
    assert model.config.num_local_experts == 3  # edited in place, as documented

    other = AutoModelForCausalLM.from_pretrained(tiny_mixtral)
    with torch.no_grad():
        other.model.layers[0].mlp.gate.weight.mul_(2.0)  # another model, same name
    with pytest.raises(MsaEditError, match=r"changed: model\.parameters"):
        msa_edit.analyze(recipe(tiny_mixtral), out=tmp_path / "b", model=other,
                         tokenizer=tokenizer)  # fmt: skip
    result = msa_edit.analyze(recipe(tiny_mixtral), out=tmp_path / "c", model=other,
                              tokenizer=tokenizer)  # fmt: skip
    assert result.values.shape == (8, 2) and result.n_evaluations <= 28


def test_dry_run_counts_and_writes_nothing(tiny_mixtral: Path, tmp_path: Path) -> None:
    data = recipe(tiny_mixtral, estimator={"method": "exact"})
    text = runner.dry_run(load_recipe(write(tmp_path / "r.yaml", data)), say=lambda _: None)
    assert "units: 8 (8 experts)" in text
    assert "analysis (exact): 256 coalitions x 4 rows = 16 forward passes" in text
    assert "evaluation: 2 texts x 2 blocks" in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]


@pytest.fixture(scope="module")
def planned(tiny_mixtral: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("planned")
    path = write(root / "r.yaml", recipe(tiny_mixtral))
    for stage in ("analyze", "plan"):
        assert main([stage, str(path), "--out", str(root / "out")]) == 0
    return root


def test_show_plan_lists_each_unit_with_its_score(planned: Path) -> None:
    plan = json.loads((planned / "out" / "plan.json").read_text())
    text = runner.show_plan(planned / "out")
    assert f"remove {len(plan['units'])} units" in text
    for unit in plan["units"]:
        assert f"{unit}" in text and f"{plan['scores'][unit]:+.4g}" in text


def test_stages_run_the_saved_recipe_and_refuse_a_conflicting_one(
    planned: Path, tmp_path: Path
) -> None:
    out = planned / "out"
    saved = runner.stage_recipe(planned / "r.yaml", out, ["plan.per_layer=2"])
    assert saved.plan is not None and saved.plan.per_layer == 2
    data = recipe(Path(load_recipe(planned / "r.yaml").model.name))
    data["estimator"] = {"budget": 100}
    with pytest.raises(
        MsaEditError, match=r"differs from the run directory's .* estimator\.budget"
    ):
        runner.stage_recipe(write(tmp_path / "other.yaml", data), out)


def test_cards_carry_no_local_paths(tiny_mixtral: Path, tmp_path: Path) -> None:
    assert main(["run", str(write(tmp_path / "r.yaml", recipe(tiny_mixtral))),
                 "--out", str(tmp_path / "out")]) == 0  # fmt: skip
    card = (tmp_path / "out" / "model" / "README.md").read_text()
    info = (tmp_path / "out" / "model" / "msa_edit.json").read_text()
    for text in (card, info):
        assert str(tiny_mixtral) not in text and str(UD_TEXT) not in text
    assert "en.txt" in card and tiny_mixtral.name in card


def test_an_empty_plan_stops_before_the_evaluation(
    tiny_mixtral: Path, tmp_path: Path, capsys
) -> None:
    data = recipe(tiny_mixtral, plan={"target": ["ru"], "per_layer": 1, "min_z": 1e6})
    out = tmp_path / "out"
    assert main(["run", str(write(tmp_path / "r.yaml", data)), "--out", str(out)]) == 2
    err = [e for e in capsys.readouterr().err.splitlines() if e.startswith("msa-edit: error")]
    assert len(err) == 1 and "the plan chose no units" in err[0] and "min_z" in err[0]
    assert json.loads((out / "plan.json").read_text())["units"] == []
    assert not (out / "eval.json").exists()


def test_an_edit_that_differs_from_the_analysis_is_said_and_recorded(
    tiny_mixtral: Path, tmp_path: Path, capsys, caplog
) -> None:
    data = recipe(tiny_mixtral, units="layers.0.experts.*", edit={"extra": "zero"})
    data["estimator"] = {"method": "exact"}
    out = tmp_path / "out"
    assert main(["run", str(write(tmp_path / "r.yaml", data)), "--out", str(out)]) == 0
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert [w.startswith("edit: WARNING: the model computes the ") for w in warned] == [True]
    assert "WARNING" not in capsys.readouterr().out  # said once: on stderr / the log file
    edit = json.loads((out / "edit.json").read_text())
    assert edit["analysed_lesion"] == "reroute"
    assert (
        edit["records"][0]["differs"].endswith(")")
        and "not the analysed 'reroute'" in (edit["records"][0]["differs"])
    )
    report = (out / "report.md").read_text()
    assert "differs from the analysis:**" in report and "not the analysed 'reroute'" in report
    assert (
        "**differs from the analysis**: the model computes the"
        in (out / "model" / "README.md").read_text()
    )
    shutil.rmtree(out)


def test_a_model_too_big_for_this_machine_fails_before_loading(
    tiny_mixtral: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.setattr(runner, "memory_bytes", lambda: (1 << 20, "no GPU; CPU memory"))
    out = tmp_path / "out"
    assert main(["run", str(write(tmp_path / "r.yaml", recipe(tiny_mixtral))), "--out",
                 str(out)]) == 2  # fmt: skip
    err = [e for e in capsys.readouterr().err.splitlines() if e.startswith("msa-edit: error")]
    n_params = sum(
        p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_mixtral).parameters()
    )
    assert len(err) == 1 and f"({n_params / 1e9:.2f} B parameters in float32)" in err[0]
    assert "this machine has no GPU; CPU memory: 0.0 GB" in err[0] and not out.exists()


def test_a_set_on_analyze_is_kept_by_the_later_stages(
    tiny_mixtral: Path, tmp_path: Path, capsys
) -> None:
    path = str(write(tmp_path / "r.yaml", recipe(tiny_mixtral)))
    out = tmp_path / "out"
    assert main(["analyze", path, "--out", str(out), "--set", "estimator.budget=26"]) == 0
    capsys.readouterr()
    assert main(["plan", path, "--out", str(out)]) == 2  # the file says 28: refused, not forgotten
    err = [e for e in capsys.readouterr().err.splitlines() if e.startswith("msa-edit: error")]
    assert len(err) == 1 and "in estimator.budget" in err[0] and "recipe.yaml" in err[0]
    saved = str(out / "recipe.yaml")
    for stage in ("plan", "edit", "evaluate", "export"):
        assert main([stage, saved, "--out", str(out)]) == 0, stage
    info = json.loads((out / "model" / "msa_edit.json").read_text())
    assert info["recipe"]["estimator"]["budget"] == 26 == info["shapley"]["n_evaluations"]


def test_dry_run_through_the_cli(tiny_mixtral: Path, tmp_path: Path, capsys) -> None:
    path = str(write(tmp_path / "r.yaml", recipe(tiny_mixtral)))
    assert main(["run", path, "--out", str(tmp_path / "out"), "--dry-run"]) == 0
    assert "analysis (adjusted): 28 coalitions x 4 rows" in capsys.readouterr().out
    assert not (tmp_path / "out").exists()
