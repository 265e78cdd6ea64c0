"""What an editor did: a frozen record with the lesion the edited model matches."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass

from torch import nn

from msa_edit.units import Unit


@dataclass(frozen=True)
class EditRecord:
    """One edit: its action, the units it touched, the lesion it equals and the size change.

    `matches` names the lesion of `msa_edit.lesions` the edited model computes, e.g. `reroute`
    (experts sliced out), `zero` (weights zeroed), `scale`, or `reroute+zero` (see `notes`).

    >>> r = EditRecord("prune_heads", ("layers.0.heads.1",), "zero", 100, 100)
    >>> EditRecord.from_json(r.to_json()) == r, r.params_saved
    (True, 0)
    """

    action: str
    units: tuple[str, ...]
    matches: str
    params_before: int
    params_after: int
    notes: tuple[str, ...] = ()

    @property
    def params_saved(self) -> int:
        """Parameters removed from the model (0 when weights were only zeroed or scaled)."""
        return self.params_before - self.params_after

    def to_json(self) -> str:
        """The record as a JSON object string."""
        return json.dumps({**asdict(self), "params_saved": self.params_saved})

    @classmethod
    def from_json(cls, text: str) -> EditRecord:
        """The record written by `to_json`."""
        data = json.loads(text)
        data.pop("params_saved", None)
        data["units"], data["notes"] = tuple(data["units"]), tuple(data["notes"])
        return cls(**data)


def n_params(model: nn.Module) -> int:
    """Distinct parameters of `model` (tied weights counted once) plus its persistent buffers
    (DeepSeek's router correction bias): the values its checkpoint stores."""
    stored = set(model.state_dict())
    buffers = sum(b.numel() for name, b in model.named_buffers() if name in stored)
    return sum(p.numel() for p in model.parameters()) + buffers


def names(units: Iterable[Unit]) -> tuple[str, ...]:
    """Canonical names of `units`, in canonical order."""
    return tuple(str(u) for u in sorted(units))
