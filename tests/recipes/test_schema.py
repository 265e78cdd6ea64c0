"""Recipe schema: valid recipes round-trip; every malformed one is one error line naming its key."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from msa_edit import optional
from msa_edit.cli import main
from msa_edit.errors import MsaEditError
from msa_edit.plan import Budget
from msa_edit.recipes import PlanStage, Recipe, load_recipe
from msa_edit.recipes import schema as recipes

VALID: dict[str, Any] = {
    "model": {"path": "org/tiny-moe", "dtype": "bfloat16"},
    "units": ["layers.*.experts.*", "layers.0.experts.3"],
    "targets": {
        "sets": {"en": {"path": "en.txt", "n_seq": 8, "seq_len": 32}, "ru": {"path": "org/ru"}},
        "retain": ["en"],
    },
    "estimator": {"method": "antithetic", "budget": 400, "seed": 1, "tol": 0.01},
    "lesion": {"kind": "reroute"},
    "plan": {"target": ["ru"], "per_layer": 1, "min_keep_per_layer": 2},
    "edit": {"heal": {"steps": 10}},
    "evaluate": {"texts": {"en": "en.txt"}, "lm_eval_tasks": ["arc_easy"]},
    "export": {"push": True, "repo_id": "me/tiny-moe-no-ru"},
}


def write(tmp_path: Path, data: object, name: str = "recipe.yaml") -> Path:
    """A recipe file (and the local data file it names) under `tmp_path`."""
    (tmp_path / "en.txt").write_text("hello world\n", encoding="utf-8")
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data), encoding="utf-8")
    return path


def test_valid_recipe_round_trips(tmp_path: Path) -> None:
    recipe = load_recipe(write(tmp_path, VALID))
    assert recipe.targets.sets["en"].path == str(tmp_path / "en.txt")
    assert recipe.targets.sets["ru"].path == "org/ru"
    assert recipe.units == ("layers.*.experts.*", "layers.0.experts.3")
    again = load_recipe(write(tmp_path, recipe.to_yaml(), "saved.yaml"))
    assert again == recipe
    assert Recipe.from_yaml(recipe.to_yaml()) == recipe


def test_defaults_and_minimal_recipe(tmp_path: Path) -> None:
    minimal = {k: VALID[k] for k in ("model", "units", "targets", "estimator")}
    recipe = load_recipe(write(tmp_path, minimal))
    assert recipe.plan is None and recipe.lesion.kind == "reroute"
    assert not recipe.export.push and recipe.edit.extra == "refuse"
    assert recipe.model.bits is None and recipe.estimator.batch_size == 64


def test_single_glob_is_a_list(tmp_path: Path) -> None:
    data = {**VALID, "units": "layers.*.experts.*"}
    assert load_recipe(write(tmp_path, data)).units == ("layers.*.experts.*",)


def test_overrides_parse_yaml_values(tmp_path: Path) -> None:
    overrides = [
        "estimator.budget=800",
        "export.private=false",
        "plan.target=[ru, en]",
        "lesion.kind=zero",
        "lesion.alpha=0",
        "units=[layers.*.heads.*]",
        "targets.sets.ru.n_seq=4",
    ]
    recipe = load_recipe(write(tmp_path, VALID), overrides)
    assert recipe.estimator.budget == 800 and recipe.export.private is False
    assert recipe.plan is not None and recipe.plan.target == ("ru", "en")
    assert recipe.units == ("layers.*.heads.*",) and recipe.targets.sets["ru"].n_seq == 4


def test_override_creates_missing_stage(tmp_path: Path) -> None:
    data = {k: VALID[k] for k in ("model", "units", "targets", "estimator")}
    recipe = load_recipe(write(tmp_path, data), ["plan.fraction=0.5", "plan.target=[ru]"])
    assert recipe.plan == PlanStage(fraction=0.5, target=("ru",))


def test_plan_budget() -> None:
    assert PlanStage(per_layer=2, min_z=1.0, target=("ru",)).budget() == Budget(2, None, 0, 1.0)


@pytest.mark.parametrize("installed", [True, False])
def test_a_quantised_recipe_validates_with_or_without_bitsandbytes(
    installed: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.setattr(optional, "available", lambda module: installed)
    data = copy.deepcopy(VALID)
    data["model"]["bits"] = 4
    path = write(tmp_path, data)
    assert load_recipe(path).model.bits == 4  # a laptop checks the recipe a GPU box will run
    assert main(["validate", str(path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"{path}: valid;")
    assert out[1:] == ([] if installed else [
        f"{path}: to run it here: 4-bit loading needs bitsandbytes, which is not installed; "
        "pip install -e '.[quant]' in a clone (or pip install bitsandbytes)"
    ])  # fmt: skip


def change(path: str, value: object) -> Callable[[dict[str, Any]], None]:
    """Set (or with `...` delete) the dotted `path` in a recipe dict."""

    def apply(data: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node = data
        for key in parents:
            node = node[key]
        if value is ...:
            del node[last]
        else:
            node[last] = value

    return apply


MALFORMED: list[tuple[str, Callable[[dict[str, Any]], None], str]] = [
    ("missing stage", change("estimator", ...), "estimator: missing"),
    ("missing model id", change("model.path", ...), "model.path: give exactly one of"),
    ("unknown stage", change("analysis", {}), "analysis: unknown key"),
    ("bad packing", change("targets.packing", "lines"), "targets.packing: must be"),
    ("negative skip", change("evaluate.skip", -1), "evaluate.skip: must be greater than or equal"),
    (
        "tiny-moe size key",
        change("model", {"tiny_moe": {"texts": {"en": "en.txt"}, "config": {"layrs": 2}}}),
        "model.tiny_moe.config.layrs: unknown TinyMoeConfig field",
    ),
    (
        "tiny-moe size type",
        change("model", {"tiny_moe": {"texts": {"en": "en.txt"}, "config": {"layers": "two"}}}),
        "model.tiny_moe.config.layers: must be int, got 'two'",
    ),
    (
        "tiny-moe size range",
        change("model", {"tiny_moe": {"texts": {"en": "en.txt"}, "config": {"top_k": 9}}}),
        "model.tiny_moe.config: top_k=9 must be between 1 and",
    ),
    (
        "tiny-moe steps in config",
        change("model", {"tiny_moe": {"texts": {"en": "en.txt"}, "config": {"steps": 9}}}),
        "set tiny_moe.steps, not tiny_moe.config.steps",
    ),
    ("unknown estimator key", change("estimator.budgt", 3), "estimator.budgt: unknown key"),
    ("budget not a number", change("estimator.budget", "many"), "estimator.budget: must be"),
    ("negative budget", change("estimator.budget", -5), "estimator.budget: must be greater"),
    ("bool budget", change("estimator.budget", True), "estimator.budget: must be"),
    ("bad method", change("estimator.method", "magic"), "estimator.method: unknown method"),
    ("negative seed", change("estimator.seed", -1), "estimator.seed: must be"),
    ("zero tol", change("estimator.tol", 0), "estimator.tol: must be greater"),
    ("bad dtype", change("model.dtype", "fp8"), "model.dtype: must be 'float32'"),
    ("bits=3", change("model.bits", 3), "model.bits: must be 4 or 8"),
    ("unit name", change("units", ["layers.1.expert.2"]), "units.0: malformed unit name"),
    ("unit glob", change("units", ["layers.*.experts.*", "layer.*"]), "units.1: malformed unit"),
    ("glob segments", change("units", ["layers.*.*"]), "units.0: malformed unit glob"),
    ("no units", change("units", []), "units: give at least one"),
    ("units mapping", change("units", {"a": 1}), "units: must be"),
    ("bad lesion kind", change("lesion.kind", "cut"), "lesion.kind: unknown lesion"),
    ("reroute on heads", change("units", ["layers.*.heads.*"]), "lesion.kind: 'reroute'"),
    ("alpha without scale", change("lesion.alpha", 0.5), "lesion.alpha: only used"),
    ("no data file", change("targets.sets.en.path", "de.txt"), "targets.sets.en.path: data file"),
    ("no sets", change("targets.sets", {}), "targets.sets: give at least"),
    ("zero n_seq", change("targets.sets.en.n_seq", 0), "targets.sets.en.n_seq: must be"),
    ("retain unknown", change("targets.retain", ["de"]), "targets.retain.0: unknown target"),
    ("plan target unknown", change("plan.target", ["de"]), "plan.target.0: unknown target set"),
    ("fraction > 1", change("plan.fraction", 1.5), "plan.fraction: must be less than or equal"),
    ("plan without budget", change("plan.per_layer", ...), "plan.per_layer: a plan needs"),
    ("bad action", change("plan.action", "delete"), "plan.action: must be 'remove'"),
    ("bad mode", change("plan.mode", "fast"), "plan.mode: must be"),
    ("heal steps", change("edit.heal.steps", "ten"), "edit.heal.steps: must be"),
    ("eval data", change("evaluate.texts", {"fr": "./fr.txt"}), "evaluate.texts.fr: data file"),
    ("push no repo", change("export.repo_id", ...), "export.repo_id: required when push"),
    ("bad repo id", change("export.repo_id", "a b"), "export.repo_id: must look like"),
    ("push not bool", change("export.push", "yes please"), "export.push: must be"),
    ("stage not mapping", change("estimator", [1, 2]), "estimator: must be a mapping"),
    ("zero rows_per_set", change("estimator.rows_per_set", 0), "estimator.rows_per_set: must be"),
    (
        "rows_per_set, position_nll",
        lambda d: [
            change("estimator.rows_per_set", 2)(d),
            change("targets.objective", "position_nll")(d),
        ],
        "estimator.rows_per_set: samples rows of objective mean_nll only",
    ),
    (
        "rows_per_set, exact",
        lambda d: [change("estimator.rows_per_set", 2)(d), change("estimator.method", "exact")(d)],
        "estimator.rows_per_set: method exact does not count the rows' noise",
    ),
]


@pytest.mark.parametrize(
    ("mutate", "expected"), [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED]
)
def test_malformed_recipe_is_one_line_naming_the_key(
    tmp_path: Path, mutate: Callable[[dict[str, Any]], None], expected: str
) -> None:
    data = copy.deepcopy(VALID)
    mutate(data)
    path = write(tmp_path, data)
    with pytest.raises(MsaEditError) as info:
        load_recipe(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: ")
    assert expected in message
    assert " | " not in message  # exactly one problem reported


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("- a\n- b\n", "a recipe is a mapping of stages"),
        ("just words", "a recipe is a mapping of stages"),
        ("", "a recipe is a mapping of stages"),
        ("model: [unclosed\n", "not valid YAML at line"),
    ],
)
def test_bad_yaml_is_one_line(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(MsaEditError) as info:
        load_recipe(write(tmp_path, text))
    assert "\n" not in str(info.value) and expected in str(info.value)


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("estimator.budget", "write key.path=value"),
        ("=3", "write key.path=value"),
        ("estimator.budgt=3", "unknown key 'budgt' in estimator; expected one of method"),
        ("nosuchstage.x=1", "unknown key 'nosuchstage' in the recipe"),
        ("estimator.budget.x=1", "unknown key 'x' in estimator.budget"),
        ("units.x=1", "unknown key 'x' in units"),
        ("estimator.budget=[1", "the value is not valid YAML"),
        ("estimator.budget=-3", "estimator.budget: must be greater than 0 (got -3)"),
    ],
)
def test_bad_override_is_one_line(tmp_path: Path, override: str, expected: str) -> None:
    with pytest.raises(MsaEditError) as info:
        load_recipe(write(tmp_path, VALID), [override])
    assert "\n" not in str(info.value) and expected in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(MsaEditError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")


def test_several_problems_share_one_line(tmp_path: Path) -> None:
    data = copy.deepcopy(VALID)
    data["model"]["dtype"] = "fp8"
    data["estimator"]["budget"] = 0
    with pytest.raises(MsaEditError) as info:
        load_recipe(write(tmp_path, data))
    message = str(info.value)
    assert "\n" not in message and "model.dtype" in message and " | estimator.budget" in message


def test_unit_glob_syntax() -> None:
    for good in ["layers.*", "layers.1?", "layers.*.heads.*", "layers.*.mlp.neurons.*", "*.*"]:
        assert recipes._check_unit_pattern(good) == good
    for bad in ["layers.*.experts", "layers.a*.experts.*", "layers.*.mlp.*", "*"]:
        with pytest.raises(ValueError, match="malformed unit"):
            recipes._check_unit_pattern(bad)


# --------------------------------------------------------------------------- hostile input


def alias_bomb(levels: int = 9, width: int = 9) -> str:
    """A ~1 KB "billion laughs" YAML list: each anchor repeats the previous one `width` times."""
    items = [f"&l0 [{', '.join(['lol'] * width)}]"]
    items += [f"&l{i} [{', '.join([f'*l{i - 1}'] * width)}]" for i in range(1, levels)]
    return "[" + ", ".join(items) + "]"


def one_line_error(path: Path, overrides: list[str] | None = None) -> str:
    with pytest.raises(MsaEditError) as info:
        load_recipe(path, overrides or [])
    message = str(info.value)
    assert "\n" not in message
    return message


def test_yaml_alias_bomb_is_refused_but_small_anchors_work(tmp_path: Path) -> None:
    bomb = alias_bomb()
    assert len(bomb) < 1500
    data = {k: v for k, v in VALID.items() if k != "estimator"}
    start = time.perf_counter()
    message = one_line_error(
        write(tmp_path, f"{yaml.safe_dump(data)}estimator: {{budget: {bomb}}}")
    )
    assert time.perf_counter() - start < 5
    assert "expands to more than 100,000 values (anchors/aliases?)" in message
    assert message.endswith("write the recipe out plainly")
    start = time.perf_counter()
    message = one_line_error(write(tmp_path, VALID), [f"estimator.budget={bomb}"])
    assert time.perf_counter() - start < 5 and "expands to more than" in message
    small = """
model: {path: org/tiny-moe}
units: [layers.*.experts.*]
targets:
  sets:
    en: &small {path: en.txt, n_seq: 4, seq_len: 16}
    ru: {<<: *small, path: org/ru}
estimator: {budget: 40}
"""
    recipe = load_recipe(write(tmp_path, small))
    assert recipe.targets.sets["ru"].n_seq == 4 and recipe.targets.sets["ru"].path == "org/ru"


def test_recursive_alias_is_one_line(tmp_path: Path) -> None:
    text = yaml.safe_dump(VALID).replace("units:", "units: &u [*u]\nunused:", 1)
    assert "a YAML anchor is used inside itself" in one_line_error(write(tmp_path, text))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("model: {path: org/x}\nseed: " + "1" * 5000 + "\n", "not valid YAML (Exceeds the limit"),
        ("model: {path: org/x}\nwhen: 2024-13-45\n", "not valid YAML (month must be in 1..12)"),
        ("model: " + "[" * 20000 + "]" * 20000 + "\n", "not valid YAML (nested too deeply)"),
    ],
    ids=["huge int", "impossible date", "deep nesting"],
)
def test_yaml_python_cannot_build_is_one_line(tmp_path: Path, text: str, expected: str) -> None:
    assert expected in one_line_error(write(tmp_path, text))


def test_non_utf8_recipe_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(yaml.safe_dump(VALID).encode() + "# caf\xe9\n".encode("latin-1"))
    message = one_line_error(path)
    assert message.startswith(f"{path} is not UTF-8 text") and "save the recipe as UTF-8" in message


MEGABYTE = "x" * 1_000_000
LONG: list[tuple[str, Callable[[dict[str, Any]], None], str]] = [
    ("method", change("estimator.method", MEGABYTE), "estimator.method: unknown method"),
    ("lesion kind", change("lesion.kind", MEGABYTE), "lesion.kind: unknown lesion"),
    ("repo id", change("export.repo_id", MEGABYTE), "export.repo_id: must look like"),
    ("unit name", change("units", ["layers.1." + MEGABYTE]), "units.0: malformed unit"),
    ("unit glob", change("units", ["layers.*." + MEGABYTE]), "units.0: malformed unit glob"),
    ("plan target", change("plan.target", [MEGABYTE]), "plan.target.0: unknown target set"),
    ("data path", change("targets.sets.ru.path", MEGABYTE), "targets.sets.ru.path: data file"),
    ("set name", change(f"targets.sets.{MEGABYTE}", {"path": "org/x"}), "targets.sets: name"),
    ("unknown key", change(f"estimator.{MEGABYTE}", 1), "unknown key; expected one of method"),
    ("many problems", change("units", list(range(1000))), "... and 995 more problems"),
]


@pytest.mark.parametrize(("mutate", "expected"), [m[1:] for m in LONG], ids=[m[0] for m in LONG])
def test_error_text_is_bounded(
    tmp_path: Path, mutate: Callable[[dict[str, Any]], None], expected: str
) -> None:
    data = copy.deepcopy(VALID)
    mutate(data)
    path = write(tmp_path, data)
    message = one_line_error(path)
    assert expected in message
    assert len(message) - len(str(path)) < 500


def test_long_override_is_bounded(tmp_path: Path) -> None:
    message = one_line_error(write(tmp_path, VALID), [f"{MEGABYTE}=1"])
    assert "unknown key" in message and len(message) < 500


NON_FINITE: list[tuple[str, str, float]] = [
    ("estimator.tol", "estimator.tol", math.nan),
    ("estimator.checkpoint_every", "estimator.checkpoint_every", math.inf),
    ("plan.fraction", "plan.fraction", math.nan),
    ("plan.min_z", "plan.min_z", math.nan),
    ("plan.min_z", "plan.min_z", -math.inf),
    ("edit.heal.lr", "edit.heal.lr", math.inf),
    ("export.timeout", "export.timeout", math.inf),
]


@pytest.mark.parametrize(
    ("key", "path", "value"), NON_FINITE, ids=[f"{k}={v}" for k, _, v in NON_FINITE]
)
def test_every_float_is_finite(tmp_path: Path, key: str, path: str, value: float) -> None:
    data = copy.deepcopy(VALID)
    change(path, value)(data)
    message = one_line_error(write(tmp_path, data))
    assert f"{key}: must be a finite number" in message and " | " not in message


@pytest.mark.parametrize("alpha", [".nan", ".inf", "1e9", "-1001.0"])
def test_scale_factors_are_finite_and_bounded(tmp_path: Path, alpha: str) -> None:
    data = copy.deepcopy(VALID)
    data["lesion"] = {"kind": "zero"}
    data["units"] = ["layers.*.heads.*"]
    data["plan"] |= {"action": "scale"}
    message = one_line_error(write(tmp_path, data), [f"plan.alpha={alpha}"])
    assert "plan.alpha: must be" in message
    assert PlanStage(per_layer=1, target=("ru",), action="scale", alpha=-1000.0).alpha == -1000


BAD_NAMES = ["# injected\n## heading", "../etc", "a b", "-x", "x" * 65, "ru/nll", "日本語"]


@pytest.mark.parametrize("name", BAD_NAMES, ids=range(len(BAD_NAMES)))
def test_target_set_names_are_restricted(tmp_path: Path, name: str) -> None:
    data = copy.deepcopy(VALID)
    data["targets"]["sets"][name] = {"path": "org/x"}
    message = one_line_error(write(tmp_path, data))
    assert message.startswith(f"{tmp_path / 'recipe.yaml'}: targets.sets: name ")
    assert "must be 1-64 letters, digits" in message and "rename it" in message
    data = copy.deepcopy(VALID)
    data["evaluate"]["texts"] = {name: "org/x"}
    assert "evaluate.texts: name " in one_line_error(write(tmp_path, data))


def test_language_names_are_restricted_and_plain_ones_work(tmp_path: Path) -> None:
    data = copy.deepcopy(VALID)
    data["model"] = {"tiny_moe": {"texts": {"../../x": "en.txt"}}}
    assert "model.tiny_moe.texts: name '../../x' must be" in one_line_error(write(tmp_path, data))
    data = copy.deepcopy(VALID)
    for name in ("zh-Hans", "en_US", "c++", "v1.2", "X" * 64):
        data["targets"]["sets"][name] = {"path": "org/x"}
    data["model"] = {"tiny_moe": {"texts": {"zh-Hans": "en.txt"}}}
    data["estimator"]["budget"] = 4
    recipe = load_recipe(write(tmp_path, data))
    assert "zh-Hans" in recipe.targets.sets and recipe.model.tiny_moe is not None


@pytest.mark.parametrize("repo_id", ["../..", "me/a--b", "me/a..b", "-me/x", "me/x.git", "me/"])
def test_repo_id_is_a_hub_repo_id(tmp_path: Path, repo_id: str) -> None:
    data = copy.deepcopy(VALID)
    data["export"]["repo_id"] = repo_id
    message = one_line_error(write(tmp_path, data))
    assert "export.repo_id: must look like 'namespace/name'" in message and repo_id in message


def test_export_timeout_and_retries(tmp_path: Path) -> None:
    export = load_recipe(write(tmp_path, VALID)).export
    assert (export.timeout, export.retries) == (60.0, 2)
    export = load_recipe(write(tmp_path, VALID), ["export.timeout=5", "export.retries=0"]).export
    assert (export.timeout, export.retries) == (5.0, 0)
    for override, expected in [
        ("export.timeout=0", "export.timeout: must be greater than 0"),
        ("export.timeout=soon", "export.timeout: must be a valid number"),
        ("export.retries=11", "export.retries: must be less than or equal to 10"),
        ("export.retries=-1", "export.retries: must be greater than or equal to 0"),
        ("export.retries=1.5", "export.retries: must be a valid integer"),
        ("export.retries=true", "export.retries: must be a valid integer"),
    ]:
        assert expected in one_line_error(write(tmp_path, VALID), [override]), override


def test_trust_remote_code_is_a_strict_bool(tmp_path: Path) -> None:
    assert load_recipe(write(tmp_path, VALID)).model.trust_remote_code is False
    recipe = load_recipe(write(tmp_path, VALID), ["model.trust_remote_code=true"])
    assert recipe.model.trust_remote_code is True
    assert Recipe.from_yaml(recipe.to_yaml()) == recipe
    message = one_line_error(write(tmp_path, VALID), ["model.trust_remote_code=yes please"])
    assert "model.trust_remote_code: must be a valid boolean" in message
