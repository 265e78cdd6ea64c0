"""Editors that bake a plan into weights, in place; each returns an `EditRecord`.

Pass `copy.deepcopy(model)` to keep the original. Every editor checks feasibility before it
changes a weight and names the lesion of `msa_edit.lesions` that the edited model equals.
"""

from __future__ import annotations

from msa_edit.edit.apply import apply_plan
from msa_edit.edit.experts import check_removal, remove_experts
from msa_edit.edit.prune import remove_channels, remove_neurons, scale_units
from msa_edit.edit.record import EditRecord

__all__ = [
    "EditRecord",
    "apply_plan",
    "check_removal",
    "remove_channels",
    "remove_experts",
    "remove_neurons",
    "scale_units",
]
