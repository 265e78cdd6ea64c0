"""Apply a `Plan` (plan.json) to a model with the editor its action and unit kinds call for."""

from __future__ import annotations

from torch import nn

from msa_edit.edit.experts import Extra, check_removal, remove_experts
from msa_edit.edit.prune import remove_channels, remove_neurons, scale_units
from msa_edit.edit.record import EditRecord
from msa_edit.errors import MsaEditError
from msa_edit.lesions import Lesion
from msa_edit.plan import Plan
from msa_edit.units import Unit


def apply_plan(model: nn.Module, plan: Plan, *, extra: Extra = "refuse") -> list[EditRecord]:
    """Edit `model` in place as `plan` says; every check runs before any weight changes.

    remove/prune: each kind as its `UnitKind.removal` says — experts sliced out (= `reroute`),
    neurons sliced or zeroed, heads and shared experts zeroed (= `zero`);
    scale: each unit's output is multiplied by `plan.alpha[unit]` (= `scale`). `extra` is what
    `remove_experts` does with experts beyond a uniform per-layer count ("zero" or "refuse").
    """
    units = plan.unit_list
    if not units:
        raise MsaEditError("the plan names no units; loosen its budget or add units by hand")
    if plan.action == "scale":
        missing = [str(u) for u in units if str(u) not in plan.alpha]
        if missing:
            raise MsaEditError(f"scale plan has no alpha for {missing}; add them to plan.alpha")
        return [scale_units(model, {u: float(plan.alpha[str(u)]) for u in units})]
    by_removal: dict[str, list[Unit]] = {}
    for unit in units:
        if unit.spec.removal is None:
            raise MsaEditError(f"removing {unit} is not supported; scale it by 0 instead")
        by_removal.setdefault(unit.spec.removal, []).append(unit)
    _dry_run(model, by_removal, extra)
    records = []
    for removal, group in sorted(by_removal.items()):
        if removal == "reroute":
            records.append(remove_experts(model, group, extra=extra))
        else:
            editor = remove_neurons if removal == "slice" else remove_channels
            records.append(editor(model, group))
    return records


def _dry_run(model: nn.Module, by_removal: dict[str, list[Unit]], extra: Extra) -> None:
    """Validate every group before editing any, so a bad later group leaves the model untouched."""
    for removal, group in by_removal.items():
        if removal == "reroute":
            check_removal(model, group, extra)
        else:
            Lesion(model, group, "zero")  # checks the units exist in this model
