"""Tensors in strict JSON, one encoding for every file msa_edit writes: nested lists (a plain
number for a 0-d tensor), non-finite numbers as null.

>>> encode(torch.tensor([[1.5, float("inf")], [float("nan"), -2.0]]))
[[1.5, None], [None, -2.0]]
>>> decode([[1.5, None], [None, -2.0]], fill=math.nan).tolist()
[[1.5, nan], [nan, -2.0]]
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

__all__ = ["decode", "encode"]


def encode(t: torch.Tensor) -> Any:
    """`t` as nested lists of floats (a float for 0-d), non-finite numbers as None."""
    values = t.detach().double().cpu().tolist()
    return _clean(values)


def _clean(x: Any) -> Any:
    if isinstance(x, list):
        return [_clean(y) for y in x]
    return float(x) if math.isfinite(x) else None


def decode(obj: Any, fill: float = math.inf, shape: Sequence[int] | None = None) -> torch.Tensor:
    """The float64 tensor `encode` wrote, nulls as `fill`, reshaped to `shape` if given (nested
    lists cannot say the shape of an empty tensor). Also reads the `{"shape", "data"}` form that
    older versions wrote."""
    if isinstance(obj, Mapping):
        shape = obj["shape"] if shape is None else shape
        obj = obj["data"]

    def fix(x: Any) -> Any:
        return [fix(y) for y in x] if isinstance(x, list) else fill if x is None else float(x)

    out = torch.tensor(fix(obj), dtype=torch.float64)
    return out if shape is None else out.reshape(tuple(shape))
