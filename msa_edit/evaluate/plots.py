"""Plots people look at instead of reading tables: expert Shapley modes as layer x expert maps."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch

from msa_edit.errors import MsaEditError
from msa_edit.units import Unit


def expert_grid(values: torch.Tensor, units: Sequence[Unit]) -> torch.Tensor:
    """Values `[n_units, T]` of expert units as a grid `[T, n_layers, n_experts]` (NaN = absent).

    >>> units = [Unit(0, "experts", 1), Unit(1, "experts", 0)]
    >>> g = expert_grid(torch.tensor([[1.0], [2.0]]), units)
    >>> g.shape, g[0, 1, 0].item()
    (torch.Size([1, 2, 2]), 2.0)
    """
    if any(u.kind != "experts" for u in units):
        raise MsaEditError("expert_grid takes expert units only (layers.L.experts.E)")
    values = values.reshape(len(units), -1)
    layers = max(u.layer for u in units) + 1
    experts = max(u.index for u in units) + 1
    grid = torch.full((values.shape[1], layers, experts), float("nan"), dtype=torch.float64)
    for row, unit in enumerate(units):
        grid[:, unit.layer, unit.index] = values[row].double()
    return grid


def expert_heatmaps(
    values: torch.Tensor,
    units: Sequence[Unit],
    target_names: Sequence[str],
    path: str | os.PathLike[str],
    *,
    title: str = "Shapley value of each expert",
    label: str = "contribution",
) -> Path:
    """One layers x experts heat-map per target (e.g. per language), side by side, as a PNG.

    Colours share one symmetric scale across targets so maps compare directly.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = expert_grid(values, units)
    if grid.shape[0] != len(target_names):
        raise MsaEditError(f"{grid.shape[0]} targets in the values but {len(target_names)} names")
    limit = float(torch.nan_to_num(grid).abs().max()) or 1.0
    cols = len(target_names)
    fig, axes = plt.subplots(1, cols, figsize=(2.2 * cols + 1.2, 0.45 * grid.shape[1] + 1.6),
                             squeeze=False, constrained_layout=True)  # fmt: skip
    image = None
    for t, ax in enumerate(axes[0]):
        image = ax.imshow(grid[t].numpy(), cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto")
        ax.set_title(target_names[t])
        ax.set_xlabel("expert")
        ax.set_xticks(range(grid.shape[2]))
        ax.set_yticks(range(grid.shape[1]))
        if t == 0:
            ax.set_ylabel("layer")
    assert image is not None
    fig.colorbar(image, ax=axes[0].tolist(), label=label, shrink=0.9)
    fig.suptitle(title)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, out)
    return out
