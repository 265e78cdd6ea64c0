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
