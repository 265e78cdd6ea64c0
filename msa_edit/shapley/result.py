"""Frozen results of the estimators: Shapley modes with stderr, convergence trace, interactions."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from msa_edit.tensorjson import decode, encode


@dataclass(frozen=True)
class TracePoint:
    """The estimate after `n_evaluations` distinct coalitions (`n_samples` sampling units).

    `values`/`stderr` are float32 copies `[n_players, *output_shape]`; for modes with more than
    2**20 numbers they are reduced to per-player L2 norms `[n_players]` to keep the trace small.
    """

    n_evaluations: int
    n_samples: int
    values: torch.Tensor
    stderr: torch.Tensor

    def to_json(self) -> dict[str, Any]:
        return {
            "n_evaluations": self.n_evaluations,
            "n_samples": self.n_samples,
            "values": encode(self.values),
            "stderr": encode(self.stderr),
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> TracePoint:
        return cls(
            obj["n_evaluations"],
            obj["n_samples"],
            decode(obj["values"]).float(),
            decode(obj["stderr"]).float(),
        )


@dataclass(frozen=True)
class ShapleyResult:
    """Shapley values (modes) of every player, with standard errors and how they were obtained.

    `values[i]` has the game's output shape; `values.sum(0) == v_full - v_empty` (efficiency).
    `stderr` is zero for exact values and inf where a sampled estimate has fewer than 2 samples.
    `stopped` says why sampling ended: "exact", "budget", "tol", "topk" or "exhausted" (every
    coalition was evaluated, so the values are exact). `surrogate` is what the `adjusted` method
    chose: a rung of `surrogate.ladder` ("counts", "within", "across") or "kernel" (plain kernel
    regression had the least variance); empty for the other methods.
    """

    values: torch.Tensor
    stderr: torch.Tensor
    n_evaluations: int
    v_full: torch.Tensor
    v_empty: torch.Tensor
    method: str
    seed: int
    budget: int | None
    n_samples: int
    stopped: str
    trace: tuple[TracePoint, ...] = field(default=(), repr=False)
    surrogate: str = ""

    @property
    def n_players(self) -> int:
        return int(self.values.shape[0])

    @property
    def output_shape(self) -> tuple[int, ...]:
        return tuple(self.values.shape[1:])

    def ranking(self, k: int | None = None) -> list[int]:
        """Players ordered by |value| summed over the output, largest first (top `k` if given).

        >>> r = ShapleyResult(torch.tensor([0.1, -2.0, 1.0]), torch.zeros(3), 8, torch.tensor(0.),
        ...                   torch.tensor(0.), "exact", 0, None, 0, "exact")
        >>> r.ranking()
        [1, 2, 0]
        """
        score = self.values.reshape(self.n_players, -1).abs().sum(1)
        order = torch.argsort(score, descending=True, stable=True).tolist()
        return order if k is None else order[:k]

    def to_json(self) -> dict[str, Any]:
        return {
            "values": encode(self.values),
            "stderr": encode(self.stderr),
            "n_evaluations": self.n_evaluations,
            "v_full": encode(self.v_full),
            "v_empty": encode(self.v_empty),
            "method": self.method,
            "seed": self.seed,
            "budget": self.budget,
            "n_samples": self.n_samples,
            "stopped": self.stopped,
            "trace": [p.to_json() for p in self.trace],
            "surrogate": self.surrogate,
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> ShapleyResult:
        return cls(
            values=decode(obj["values"]),
            stderr=decode(obj["stderr"]),
            n_evaluations=obj["n_evaluations"],
            v_full=decode(obj["v_full"]),
            v_empty=decode(obj["v_empty"]),
            method=obj["method"],
            seed=obj["seed"],
            budget=obj["budget"],
            n_samples=obj["n_samples"],
            stopped=obj["stopped"],
            trace=tuple(TracePoint.from_json(p) for p in obj["trace"]),
            surrogate=obj.get("surrogate", ""),
        )


@dataclass(frozen=True)
class InteractionResult:
    """Pairwise Shapley interaction index of chosen pairs: `values[p]` for `pairs[p]`.

    Negative values mean the two players are redundant (each matters less when the other is
    intact); positive values mean they are synergistic.
    """

    pairs: tuple[tuple[int, int], ...]
    values: torch.Tensor
    stderr: torch.Tensor
    n_evaluations: int
    method: str
    seed: int

    def to_json(self) -> dict[str, Any]:
        return {
            "pairs": [list(p) for p in self.pairs],
            "values": encode(self.values),
            "stderr": encode(self.stderr),
            "n_evaluations": self.n_evaluations,
            "method": self.method,
            "seed": self.seed,
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> InteractionResult:
        return cls(
            pairs=tuple((int(a), int(b)) for a, b in obj["pairs"]),
            values=decode(obj["values"]),
            stderr=decode(obj["stderr"]),
            n_evaluations=obj["n_evaluations"],
            method=obj["method"],
            seed=obj["seed"],
        )
