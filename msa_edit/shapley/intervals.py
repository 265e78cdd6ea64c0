"""Small-sample intervals: the factor that makes "value ± 1.96 stderr" a 95 % interval when the
standard error was estimated from few independent samples (Student's t with `df` degrees of
freedom instead of the normal). Every sampling estimator scales its stderr by it, so reports,
plans (`min_z`) and error bars keep reading ±1.96 stderr as 95 % at every budget.

>>> round(t_factor(1), 3), round(t_factor(9), 3), round(t_factor(1000), 4)
(6.483, 1.154, 1.0012)
"""

from __future__ import annotations

Z_975 = 1.959963984540054
"""The normal distribution's 97.5 % quantile."""

_T_975 = (
    12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
    2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
    2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423,
)  # fmt: skip
"""Student's t 97.5 % quantiles for 1..30 degrees of freedom."""


def t_factor(df: int) -> float:
    """t(0.975, df) / z(0.975): how much wider a 95 % interval is with `df` degrees of freedom
    (infinite below 1). Above 30 the Cornish-Fisher expansion is exact to 1e-4."""
    if df < 1:
        return float("inf")
    if df <= len(_T_975):
        return _T_975[df - 1] / Z_975
    z = Z_975
    t = z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df * df)
    return t / z
