"""Plans: selectivity with stderr, budgets and guards, plan.json round trip and validation."""

from __future__ import annotations

import json

import pytest
import torch

from msa_edit.errors import MsaEditError
from msa_edit.plan import Budget, Plan, make_plan, scores
from msa_edit.units import Unit

LANGS = ["en", "ru", "zh"]
UNITS = [Unit(layer, "experts", e) for layer in range(2) for e in range(4)]
# Shapley values of per-language NLL (negative = the expert helps that language)
VALUES = torch.tensor(
    [
        [-0.5, -0.5, -0.5],  # L0 e0 helps everyone
        [-0.0, -0.8, -0.0],  # L0 e1 ru only
        [-0.1, -0.3, -0.0],  # L0 e2 mostly ru
        [-0.2, -0.0, -0.0],  # L0 e3 en
        [-0.0, -0.6, -0.1],  # L1 e0 ru
        [-0.0, -0.05, -0.0],  # L1 e1 barely ru, noisy
        [-0.4, -0.0, -0.4],  # L1 e2 en+zh
        [-0.0, -0.0, -0.0],  # L1 e3 useless
    ],
    dtype=torch.float64,
)
STDERR = torch.full_like(VALUES, 0.02)


def test_selectivity_subtracts_what_must_be_retained() -> None:
    score, se = scores(VALUES, STDERR, LANGS, ["ru"], retain=["en", "zh"])
    assert score[0] == pytest.approx(0.0)  # helps ru as much as the rest: not specific
    assert score[1] == pytest.approx(0.8) and score[2] == pytest.approx(0.2)
    assert se[1] == pytest.approx(0.02) and se[2] == pytest.approx((2 * 0.02**2) ** 0.5)


def test_a_unit_one_retained_set_needs_is_not_specific() -> None:
    values = torch.tensor([[-1.0, -0.9, 0.0], [-0.4, 0.0, 0.0]], dtype=torch.float64)
    stderr = torch.tensor([[0.1, 0.2, 0.3], [0.1, 0.2, 0.3]], dtype=torch.float64)
    score, se = scores(values, stderr, ["ru", "en", "zh"], ["ru"], retain=["en", "zh"])
    assert score.tolist() == pytest.approx([0.1, 0.4])  # a mean over en, zh would say 0.55
    assert se.tolist() == pytest.approx([(0.1**2 + 0.2**2) ** 0.5, 0.1])


def test_per_layer_budget_picks_the_most_specific_unit_of_each_layer() -> None:
    plan = make_plan(VALUES, STDERR, UNITS, LANGS, target=["ru"], retain=["en", "zh"],
                     budget=Budget(per_layer=1))  # fmt: skip
    assert plan.units == ("layers.0.experts.1", "layers.1.experts.0")


def test_significance_and_min_keep_guards() -> None:
    loose = make_plan(VALUES, STDERR, UNITS, LANGS, target=["ru"], budget=Budget(per_layer=3))
    assert "layers.1.experts.1" in loose.units
    strict = make_plan(VALUES, STDERR, UNITS, LANGS, target=["ru"],
                       budget=Budget(per_layer=3, min_z=3.0))  # fmt: skip
    assert "layers.1.experts.1" not in strict.units  # 0.05 is 2.5 stderr: not significant
    kept = make_plan(VALUES, STDERR, UNITS, LANGS, target=["ru"],
                     budget=Budget(per_layer=4, min_keep_per_layer=2))  # fmt: skip
    assert sum(u.startswith("layers.0") for u in kept.units) == 2  # 4 experts, keep top-k 2


def test_least_useful_mode_for_compression() -> None:
    plan = make_plan(VALUES, STDERR, UNITS, LANGS, target=LANGS, mode="least_useful",
                     budget=Budget(fraction=0.25))  # fmt: skip
    assert plan.units == ("layers.1.experts.1", "layers.1.experts.3")


def test_plan_json_round_trip_and_hand_edits(tmp_path) -> None:
    plan = make_plan(VALUES, STDERR, UNITS, LANGS, target=["ru"], budget=Budget(per_layer=1),
                     base_model="local/tiny", shapley={"method": "exact"})  # fmt: skip
    path = plan.save(tmp_path / "plan.json")
    obj = json.loads(path.read_text())
    assert obj["action"] == "remove" and obj["base_model"] == "local/tiny"
    assert set(obj["scores"]) == {str(u) for u in UNITS}
    obj["units"] = ["layers.1.experts.3"]  # a person edits the plan before `edit`
    path.write_text(json.dumps(obj))
    assert Plan.load(path).unit_list == [Unit(1, "experts", 3)]
    obj["units"] = ["layers.1.expert.3"]
    path.write_text(json.dumps(obj))
    with pytest.raises(MsaEditError, match=r"malformed unit name 'layers\.1\.expert\.3'"):
        Plan.load(path)
    with pytest.raises(MsaEditError, match=r"unknown fields \['colour'\]"):
        Plan.from_json({**plan.to_json(), "colour": "red"})


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"budget": Budget(per_layer=1), "target": ["fr"]}, r"targets \['fr'\] are not in"),
        ({"budget": Budget(per_layer=1), "target": []}, "name at least one target"),
    ],
)
def test_bad_plans(kwargs, match) -> None:
    with pytest.raises(MsaEditError, match=match):
        make_plan(VALUES, STDERR, UNITS, LANGS, **kwargs)
    with pytest.raises(MsaEditError, match="needs per_layer"):
        Budget()


def test_interactions_keep_redundant_pairs_apart() -> None:
    from msa_edit.shapley import estimate, interactions

    # a loss game of 4 experts where 0 and 1 are fully redundant (either covers the other)
    def loss(c: torch.Tensor) -> torch.Tensor:
        c = c.double()
        covered = torch.maximum(c[:, 0], c[:, 1])
        return (1.0 - 0.2 * covered - 0.5 * c[:, 2] - 0.6 * c[:, 3])[:, None]

    units = [Unit(0, "experts", e) for e in range(4)]
    res = estimate(loss, 4, method="exact", progress=False)
    budget = Budget(per_layer=2)
    naive = make_plan(res.values, res.stderr, units, ["x"], target=["x"], mode="least_useful",
                      budget=budget)  # fmt: skip
    assert naive.units == ("layers.0.experts.0", "layers.0.experts.1")  # each looks useless
    pairs = interactions(loss, 4, [(0, 1), (0, 2), (1, 3)], progress=False)
    assert float(pairs.values[0, 0]) == pytest.approx(0.2)  # redundant: positive for a loss
    guarded = make_plan(res.values, res.stderr, units, ["x"], target=["x"], mode="least_useful",
                        budget=budget, interactions=pairs)  # fmt: skip
    assert guarded.units == ("layers.0.experts.0", "layers.0.experts.2")


# --------------------------------------------------------------------------- hand-edited plan.json


def good_plan() -> dict:
    plan = make_plan(VALUES, STDERR, UNITS, LANGS, target=["ru"], budget=Budget(per_layer=1),
                     action="scale", base_model="local/tiny")  # fmt: skip
    return {**plan.to_json(), "alpha": {u: 0.5 for u in plan.units}}


def nested(depth: int) -> object:
    value: object = 1
    for _ in range(depth):
        value = {"x": value}
    return value


HAND_EDITS = [
    ("units null", {"units": None}, "plan units must be a list of unit names, got null"),
    ("units string", {"units": "layers.0.experts.1"}, "plan units must be a list"),
    ("unit number", {"units": [3]}, "plan units: malformed unit name 3"),
    ("huge unit", {"units": ["layers.0.experts.99999999999"]}, "has an index above 2147483647"),
    (
        "duplicate units",
        {"units": ["layers.0.experts.1", "layers.0.experts.01"]},
        "plan units name layers.0.experts.1 twice",
    ),
    (
        "alpha too big",
        {"alpha": {"layers.0.experts.1": 1e308}},
        "plan alpha of layers.0.experts.1 is 1e+308; a scale factor must be finite",
    ),
    (
        "alpha string",
        {"alpha": {"layers.0.experts.1": "0.5"}},
        "plan alpha of layers.0.experts.1 must be a number, got a string",
    ),
    ("alpha bool", {"alpha": {"layers.0.experts.1": True}}, "must be a number, got a boolean"),
    (
        "alpha not a unit of the plan",
        {"alpha": {"layers.0.experts.1": 0.5, "layers.1.experts.3": 0.5}},
        "plan alpha names layers.1.experts.3, which is not in the plan's units",
    ),
    ("alpha list", {"alpha": [0.5]}, "plan alpha must map unit names to numbers, got an array"),
    ("scores null", {"scores": None}, "plan scores must map unit names to numbers, got null"),
    ("score key", {"scores": {"colour": 1.0}}, "plan scores: malformed unit name 'colour'"),
    (
        "stderr null",
        {"stderr": {"layers.0.experts.1": None}},
        "plan stderr of layers.0.experts.1 must be a number, got null",
    ),
    ("target null", {"target": None}, "plan target must be a list of target-set names"),
    ("retain numbers", {"retain": [1, 2]}, "plan retain must be a list of target-set names"),
    ("base model", {"base_model": 7}, "plan base_model must be a string, got a number"),
    ("mode", {"mode": "fast"}, "plan mode must be specific or least_useful, got 'fast'"),
    ("search list", {"search": [1]}, "plan search must be a JSON object, got an array"),
    ("deep search", {"search": nested(200)}, "plan search nests deeper than 32 levels"),
]


@pytest.mark.parametrize(
    ("edit", "expected"), [h[1:] for h in HAND_EDITS], ids=[h[0] for h in HAND_EDITS]
)
def test_hand_edited_plan_is_checked_field_by_field(tmp_path, edit, expected) -> None:
    path = tmp_path / "plan.json"
    path.write_text(json.dumps({**good_plan(), **edit}))
    with pytest.raises(MsaEditError) as info:
        Plan.load(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and expected in message
    assert "\n" not in message and len(message) < 300 + len(str(path))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('"alpha": {"layers.0.experts.1": NaN}', "NaN is not a finite number"),
        ('"alpha": {"layers.0.experts.1": Infinity}', "Infinity is not a finite number"),
        ('"alpha": {"layers.0.experts.1": -Infinity}', "-Infinity is not a finite number"),
        ('"alpha": {"layers.0.experts.1": 1e400}', "alpha of layers.0.experts.1 is inf"),
        ('"scores": {"layers.0.experts.1": 1e999}', "scores of layers.0.experts.1 is inf"),
        ('"search": ' + "[" * 100_000 + "]" * 100_000, "nested too deeply"),
        ('"search": ' + "1" * 5000, "Exceeds the limit (4300 digits)"),
    ],
    ids=["NaN", "Infinity", "-Infinity", "1e400", "score 1e999", "deep", "huge int"],
)
def test_plan_json_must_be_strict(tmp_path, text: str, expected: str) -> None:
    obj = good_plan()
    key = text.split('"')[1]
    obj.pop(key)
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(obj)[:-1] + ", " + text + "}")
    with pytest.raises(MsaEditError) as info:
        Plan.load(path)
    assert expected in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b'{"action": "remove", "units": [], "base_model": "caf\xe9"}', "not UTF-8 text (byte"),
        (b"null", "a plan is a JSON object of fields, got null"),
        (b"[1, 2]", "a plan is a JSON object of fields, got an array"),
        (b'{"action": "remove", "units": []}', "plan lacks fields ['scores', 'target'"),
    ],
    ids=["latin-1", "null", "array", "missing fields"],
)
def test_unreadable_plan_is_one_line(tmp_path, content: bytes, expected: str) -> None:
    path = tmp_path / "plan.json"
    path.write_bytes(content)
    with pytest.raises(MsaEditError) as info:
        Plan.load(path)
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_plans_round_trip_with_canonical_unit_names(tmp_path) -> None:
    plan = Plan.from_json(good_plan())
    assert Plan.from_json(plan.to_json()) == plan
    assert Plan.load(plan.save(tmp_path / "plan.json")) == plan
    search = {
        "chosen": "greedy", "n_evaluations": 40, "rounds": [{"round": 0, "removed": ["x"]}],
        "candidates": [{"name": "greedy", "units": ["layers.0.experts.1"], "search": 0.1,
                        "check": 0.2, "all": 0.15, "stderr": 0.01, "per_set": {"ru": 0.3},
                        "feasible": None}],
        "coalitions": None, "settings": {"rounds": None, "width": 2, "swaps": 0},
        "blocks": {"search": 4, "check": 4},
    }  # fmt: skip
    searched = Plan(action="remove", units=("layers.0.experts.1",), scores={}, target=["ru"],
                    base_model="m", method="search", search=search)  # fmt: skip
    assert Plan.load(searched.save(tmp_path / "search.json")) == searched
    assert Plan.from_json(searched.to_json()) == searched
    obj = {**good_plan(), "units": [" layers.0.experts.01"], "alpha": {"layers.0.experts.1": -2}}
    plan = Plan.from_json(obj)  # unit names are stored canonically
    assert plan.units == ("layers.0.experts.1",) and plan.alpha == {"layers.0.experts.1": -2}
