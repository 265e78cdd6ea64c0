"""plan.json -> edited model -> exported directory: equals the lesion; bad plans write nothing."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import build
from transformers import AutoModelForCausalLM

from msa_edit.edit import apply_plan
from msa_edit.errors import MsaEditError
from msa_edit.export import CardInfo, export_model
from msa_edit.lesions import lesioned, scaled
from msa_edit.plan import Plan

TOKENS = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(0))


def plan(action: str, units: list[str], **extra) -> Plan:
    return Plan(action=action, units=tuple(units), scores={}, target=["ru"], base_model="tiny",
                **extra)  # fmt: skip


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS).logits


@pytest.mark.parametrize(
    ("family", "action", "units", "lesion"),
    [
        ("mixtral", "remove", ["layers.0.experts.1", "layers.1.experts.4"], "reroute"),
        ("olmoe", "remove", ["layers.0.experts.0", "layers.1.experts.0"], "reroute"),
        ("llama", "prune", ["layers.0.heads.1", "layers.1.mlp.neurons.7"], "zero"),
    ],
)
def test_exported_plan_equals_the_lesion(tmp_path, family, action, units, lesion) -> None:
    model = build(family)
    p = plan(action, units)
    with lesioned(model, p.unit_list, lesion):
        want = logits(model)
    edited = copy.deepcopy(model)
    records = apply_plan(edited, p)
    assert all(r.matches == lesion for r in records)
    out = export_model(edited, None, tmp_path / "model", card=CardInfo(plan=p.to_json()))
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert (logits(reloaded) - want).abs().max() <= 1e-5
    saved = sum(r.params_saved for r in records)
    assert (
        sum(t.numel() for t in reloaded.parameters())
        == sum(t.numel() for t in model.parameters()) - saved
    )
    if family != "llama":
        assert saved > 0  # really smaller


def test_scale_plan_equals_the_scale_lesion() -> None:
    model = build("mixtral")
    p = plan("scale", ["layers.1.experts.2", "layers.0.heads.3"],
             alpha={"layers.1.experts.2": 0.5, "layers.0.heads.3": 2.0})  # fmt: skip
    with scaled(model, {u: p.alpha[str(u)] for u in p.unit_list}):
        want = logits(model)
    edited = copy.deepcopy(model)
    apply_plan(edited, p)
    assert (logits(edited) - want).abs().max() <= 1e-5


@pytest.mark.parametrize(
    ("family", "p", "match"),
    [
        ("mixtral", plan("remove", ["layers.0.experts.9"]), "layer 0 has 6 experts"),
        ("mixtral", plan("remove", [f"layers.{i}.experts.{e}" for i in (0, 1) for e in range(5)]),
         "fewer than top-k=2"),
        ("llama", plan("remove", ["layers.0.experts.0"]), "no experts"),
        ("mixtral", plan("remove", ["layers.0.heads.1", "layers.0.experts.7"]), "has 6 experts"),
        ("mixtral", plan("scale", ["layers.0.heads.1"]), "no alpha for"),
        ("mixtral", plan("remove", []), "names no units"),
    ],
)  # fmt: skip
def test_bad_plans_change_nothing_and_write_nothing(tmp_path, family, p, match) -> None:
    model = build(family)
    before = copy.deepcopy(model.state_dict())
    out = tmp_path / "model"
    with pytest.raises(MsaEditError, match=match):
        apply_plan(model, p)
        export_model(model, None, out)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not out.exists() and not list(tmp_path.iterdir())
