"""Evaluation and Shapley numbers as text: one rounding for report.md, model cards and logs.

>>> fmt(2.123456), fmt(float("inf")), fmt(None), fmt_delta(0.5), fmt_delta(-0.00004)
('2.1235', 'inf', 'n/a', '+0.5000', '-0.0000')
"""

from __future__ import annotations

import math

NA = "n/a"
"""What a missing or NaN number prints as."""


def fmt(x: float | None) -> str:
    """A number with 4 decimals (null or NaN: "n/a")."""
    return NA if x is None or math.isnan(x) else f"{x:.4f}"


def fmt_delta(x: float | None) -> str:
    """A change with its sign and 4 decimals (null or NaN: "n/a")."""
    return NA if x is None or math.isnan(x) else f"{x:+.4f}"
