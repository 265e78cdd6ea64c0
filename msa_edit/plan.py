"""Ranking units from Shapley modes: how specifically each unit serves one target over the others.

(Budgets, plan files and significance tests come with the planner; this is the ranking core.)
"""

from __future__ import annotations

import torch

from msa_edit.errors import MsaEditError


def specificity(values: torch.Tensor, lower_is_better: bool = True) -> torch.Tensor:
    """How much more each unit helps each target than it helps any other target: `[n_units, T]`.

    `values[i, t]` is unit i's Shapley value for target t (e.g. mean NLL of language t, where a
    unit that helps has a negative value). The result is positive only where unit i helps target
    t more than every other target; the most specific unit of t is `argmax` of column t.

    >>> phi = torch.tensor([[-1.0, -0.9], [-0.5, 0.0]])   # unit 0 helps both, unit 1 only t0
    >>> specificity(phi).tolist()
    [[0.10000002384185791, -0.10000002384185791], [0.5, -0.5]]
    """
    if values.dim() != 2 or values.shape[1] < 2:
        raise MsaEditError(f"specificity needs values [n_units, T >= 2], got {list(values.shape)}")
    helps = -values if lower_is_better else values
    columns = []
    for t in range(values.shape[1]):
        others = torch.cat([helps[:, :t], helps[:, t + 1 :]], dim=1)
        columns.append(helps[:, t] - others.max(dim=1).values)
    return torch.stack(columns, dim=1)
