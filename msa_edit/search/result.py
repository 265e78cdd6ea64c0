"""What a removal search found: its candidates measured on both halves, the choice, the cost."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from msa_edit.units import Unit


@dataclass(frozen=True)
class Candidate:
    """One removal set the search evaluated as a coalition.

    `objective` is the quantity the search optimises on calibration text: the mean loss increase
    over the target sets (compression, lower is better) or the target sets' increase (targeted
    removal, higher is better), on the search half, the check half and all blocks, with the
    stderr over all blocks. `per_set` holds every target set's increase over all blocks, and
    `feasible` whether every retained set stays within its bound on both halves (targeted only).
    """

    name: str
    units: tuple[str, ...]
    search: float
    check: float
    all: float
    stderr: float
    per_set: dict[str, float]
    feasible: bool | None = None

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["units"] = list(self.units)
        return out


@dataclass(frozen=True)
class SearchResult:
    """The chosen removal set, the candidates it was chosen from, leave-one-out, and the cost.

    `loo[i, t]` is target set t's mean loss increase when only unit i is removed (all blocks),
    `loo_stderr` its stderr over blocks; `n_evaluations` counts distinct coalitions.
    """

    units: tuple[Unit, ...]
    chosen: str
    candidates: tuple[Candidate, ...]
    loo: torch.Tensor
    loo_stderr: torch.Tensor
    n_evaluations: int
    rounds: tuple[dict[str, Any], ...] = field(default_factory=tuple)

    def candidate(self, name: str) -> Candidate:
        return next(c for c in self.candidates if c.name == name)

    def summary(self) -> dict[str, Any]:
        """The plan.json record of the search (candidates, rounds and cost)."""
        return {
            "chosen": self.chosen,
            "n_evaluations": self.n_evaluations,
            "candidates": [c.to_json() for c in self.candidates],
            "rounds": list(self.rounds),
        }
