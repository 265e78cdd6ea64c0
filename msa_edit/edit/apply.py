"""Apply a `Plan` (plan.json) to a model with the editor its action and unit kinds call for."""

from __future__ import annotations

from torch import nn

from msa_edit.edit.experts import Extra, check_removal, remove_experts
from msa_edit.edit.prune import remove_heads, remove_neurons, scale_units
from msa_edit.edit.record import EditRecord
from msa_edit.errors import MsaEditError
from msa_edit.lesions import Lesion
from msa_edit.plan import Plan
from msa_edit.units import Unit


def apply_plan(model: nn.Module, plan: Plan, *, extra: Extra = "refuse") -> list[EditRecord]:
    """Edit `model` in place as `plan` says; every check runs before any weight changes.

    remove/prune: experts are sliced out (= `reroute`), heads and neurons removed (= `zero`);
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
    by_kind: dict[str, list[Unit]] = {}
    for unit in units:
        by_kind.setdefault(unit.kind, []).append(unit)
    if "layer" in by_kind:
        raise MsaEditError("removing whole layers is not supported; scale them by 0 instead")
    _dry_run(model, by_kind, extra)
    records = []
    for kind, group in sorted(by_kind.items()):
        if kind == "experts":
            records.append(remove_experts(model, group, extra=extra))
        else:
            records.append((remove_heads if kind == "heads" else remove_neurons)(model, group))
    return records


def _dry_run(model: nn.Module, by_kind: dict[str, list[Unit]], extra: Extra) -> None:
    """Validate every group before editing any, so a bad later group leaves the model untouched."""
    for kind, group in by_kind.items():
        if kind == "experts":
            check_removal(model, group, extra)
        else:
            Lesion(model, group, "zero")  # checks the units exist in this model
