"""Malformed recipes through `msa-edit run`: one clear line, exit 2, nothing written to the run dir.

Half of these pass the schema and fail only once the model is loaded (an absent unit, the wrong
architecture, too little text, an unknown lm-eval task): those must fail before anything is written.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from tiny_models import UD_TEXT, build

from msa_edit import optional
from msa_edit.cli import main

Mutation = Callable[[dict[str, Any], Path], None]


def base_recipe(model: Path) -> dict[str, Any]:
    sets = {lang: {"path": str(UD_TEXT / f"{lang}.txt"), "n_seq": 2, "seq_len": 16}
            for lang in ("en", "ru")}  # fmt: skip
    return {
        "model": {"path": str(model)},
        "units": "layers.*.experts.*",
        "targets": {"sets": sets},
        "estimator": {"method": "exact"},
        "plan": {"target": ["ru"], "per_layer": 1},
        "evaluate": {"n_seq": 2, "seq_len": 16},
    }


def setting(path: str, value: Any) -> Mutation:
    """Set (or with `...` delete) a dotted key; `"{tmp}"` in a string value is the test folder."""

    def apply(data: dict[str, Any], tmp: Path) -> None:
        *parents, last = path.split(".")
        node = data
        for key in parents:
            node = node.setdefault(key, {})
        if value is ...:
            del node[last]
        else:
            node[last] = value.replace("{tmp}", str(tmp)) if isinstance(value, str) else value

    return apply


def dense_model(data: dict[str, Any], tmp: Path) -> None:
    """A Llama (no experts) saved with the Mixtral's tokenizer."""
    folder = tmp / "llama"
    build("llama").save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((Path(data["model"]["path"]) / name).read_bytes())
    data["model"]["path"] = str(folder)


def task_without_data(data: dict[str, Any], tmp: Path) -> None:
    """A local lm-eval task whose data file is missing (as an offline Hub dataset would be)."""
    pytest.importorskip("lm_eval")
    tasks = Path(__file__).resolve().parents[1] / "data" / "lm_eval_tasks"
    config = yaml.safe_load((tasks / "next_word.yaml").read_text())
    config["dataset_kwargs"] |= {"data_files": {"test": str(tmp / "missing.jsonl")},
                                 "cache_dir": str(tmp / "hf")}  # fmt: skip
    (tmp / "tasks").mkdir()
    (tmp / "tasks" / "next_word.yaml").write_text(yaml.safe_dump(config))
    data["evaluate"] |= {"lm_eval_tasks": ["next_word"], "lm_eval_include": str(tmp / "tasks")}


TINY = {"texts": {"en": str(UD_TEXT / "en.txt")}}
MALFORMED: list[tuple[str, Mutation | str, str]] = [
    ("missing stage", setting("estimator", ...), "estimator: missing (required)"),
    ("bad type", setting("estimator.budget", "many"), "estimator.budget: must be a valid integer"),
    ("unknown key", setting("estimator.budgt", 3), "estimator.budgt: unknown key"),
    (
        "unknown unit",
        setting("units", "layers.7.experts.*"),
        "matches 'layers.7.experts.*'; it has layers.0-1.experts.0-3",
    ),
    ("wrong architecture", dense_model, "no unit of this llama model matches 'layers.*.exp"),
    ("model not found", setting("model.path", "{tmp}/nope"), "model folder"),
    ("no data file", setting("targets.sets.en.path", "{tmp}/en.txt"), "does not exist"),
    ("too little text", setting("targets.sets.en.n_seq", 100000), "use fewer or shorter blocks"),
    ("eval text short", setting("evaluate.n_seq", 100000), "use fewer or shorter blocks"),
    ("unknown plan target", setting("plan.target", ["de"]), "plan.target.0: unknown target set"),
    ("reroute on heads", setting("units", "layers.*.heads.*"), "lesion.kind: 'reroute' applies"),
    ("heldout, no tiny_moe", setting("evaluate.heldout", True), "evaluate.heldout: held-out"),
    ("path and tiny_moe", setting("model.tiny_moe", TINY), "model.path: give exactly one of"),
    ("scale without alpha", setting("plan.action", "scale"), "plan.alpha: give alpha"),
    ("no lm-eval folder", setting("evaluate.lm_eval_include", "{tmp}/tasks"), "does not exist"),
    ("unknown lm-eval task", setting("evaluate.lm_eval_tasks", ["arc_eazy"]), "task 'arc_eazy'"),
    ("bad YAML", "model: [unclosed\n", "not valid YAML at line 2"),
    ("not a mapping", "- just\n- a list\n", "a recipe is a mapping of stages"),
    ("4-bit, no bitsandbytes", setting("model.bits", 4), "pip install -e '.[quant]'"),
    (
        "budget too small",
        setting("estimator", {"method": "permutation", "budget": 3}),
        "budget=3 is too small for method='permutation'",
    ),
    (
        "fraction too small",
        setting("plan", {"target": ["ru"], "fraction": 0.05}),
        "raise per_layer/fraction",
    ),
    ("edit will be refused", setting("units", "layers.0.experts.*"), "cannot be saved as reroute"),
    ("fewer than top-k", setting("plan.per_layer", 3), "fewer than top-k=2"),
    ("lm-eval data missing", task_without_data, "lm-eval task 'next_word': its data cannot be"),
    ("no such CUDA device", setting("model.device_map", "cuda:99"), "'cuda:99', but this machine"),
]


@pytest.mark.parametrize(
    ("mutate", "expected"), [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED]
)
def test_malformed_recipe_one_line_no_files(
    mutate: Mutation | str,
    expected: str,
    tiny_mixtral: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(optional, "available", lambda module: module != "bitsandbytes")
    if "arc_eazy" in expected:
        pytest.importorskip("lm_eval")
        from msa_edit.evaluate import harness

        fake = type("Index", (), {"all_tasks": ["arc_easy"]})()  # the real index takes 10 s
        monkeypatch.setattr(harness, "_builtin_task_manager", lambda: fake)
    if isinstance(mutate, str):
        text = mutate
    else:
        data = copy.deepcopy(base_recipe(tiny_mixtral))
        mutate(data, tmp_path)
        text = yaml.safe_dump(data)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text, encoding="utf-8")
    out = tmp_path / "out"
    assert main(["run", str(recipe), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("msa-edit: error: ") and expected in err[0]
    assert not out.exists()


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("estimator.budgt=3", "unknown key 'budgt' in estimator"),
        ("estimator.budget", "write key.path=value"),
        ("estimator.budget=[1", "the value is not valid YAML"),
    ],
)
def test_bad_override_leaves_an_existing_run_dir_alone(
    override: str, expected: str, tiny_mixtral: Path, tmp_path: Path, capsys
) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(base_recipe(tiny_mixtral)), encoding="utf-8")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["run", str(recipe), "--out", str(out), "--set", override]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0]
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_missing_recipe_file(tmp_path: Path, capsys) -> None:
    assert main(["run", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"msa-edit: error: recipe {tmp_path / 'nope.yaml'} does not exist; check the path"
    ]


@pytest.mark.parametrize(
    "name", ["demo", "mixtral_compress", "mixtral_remove_language", "smollm2_french_neurons"]
)
def test_shipped_recipes_validate(name: str, capsys) -> None:
    path = Path(__file__).resolve().parents[2] / "recipes" / f"{name}.yaml"
    assert main(["validate", str(path)]) == 0
    assert capsys.readouterr().out.startswith(f"{path}: valid; model ")


def test_validate_reports_a_bad_override(capsys) -> None:
    path = Path(__file__).resolve().parents[2] / "recipes" / "demo.yaml"
    assert main(["validate", str(path), "--set", "plan.per_layer=0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "plan.per_layer: must be greater than 0" in err[0]
