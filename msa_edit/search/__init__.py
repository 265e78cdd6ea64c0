"""Removal sets chosen with the lesion game itself, at the operating point (the model minus a few
units): leave-one-out, greedy rounds that re-evaluate after each removal, swap passes, and
targeted removal verified against retained sets' bounds. Transformers-free: a search sees a game
(one loss per calibration block), the units, which block belongs to which target set, and a
budget of coalitions.

>>> import torch
>>> from msa_edit.plan import Budget
>>> from msa_edit.units import Unit
>>> units = [Unit(0, "experts", e) for e in range(4)]
>>> cost = torch.tensor([0.3, 0.1, 0.2, 0.4], dtype=torch.float64)
>>> game = lambda c: ((~c).double() @ cost)[:, None].expand(-1, 4)   # 4 blocks, additive loss
>>> blocks = Blocks.split(("all",), torch.zeros(4, dtype=torch.long))
>>> removals = Removals(game, 4, budget=40, progress=False)
>>> res = search_compression(removals, blocks, Quota.from_budget(units, Budget(per_layer=2)),
...                          ["all"])
>>> [str(u) for u in res.units], res.chosen
(['layers.0.experts.1', 'layers.0.experts.2'], 'search')
"""

from __future__ import annotations

from msa_edit.search.compress import (
    SearchSettings,
    fit_width,
    leave_one_out,
    search_compression,
    search_cost,
)
from msa_edit.search.measure import Blocks, Removals, TargetMean
from msa_edit.search.quota import Quota
from msa_edit.search.result import Candidate, SearchResult
from msa_edit.search.targeted import search_targeted

__all__ = [
    "Blocks",
    "Candidate",
    "Quota",
    "Removals",
    "SearchResult",
    "SearchSettings",
    "TargetMean",
    "fit_width",
    "leave_one_out",
    "search_compression",
    "search_cost",
    "search_targeted",
]
