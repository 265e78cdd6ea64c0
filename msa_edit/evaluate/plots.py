"""Plots people look at instead of reading tables: Shapley modes as layer x unit maps, a ranking
with error bars, before/after metric bars and estimator convergence, each saved as a PNG.

The figure functions take plain numbers (no run-directory knowledge; `report.py` reads the files)
and write atomically (temp file, then rename) with the `Agg` backend, closing every figure. NaN,
infinite and (on log axes) non-positive numbers get no bar or point, and names are drawn as plain
text (`$` is not mathtext), so no value or name in a run file makes a plot raise.
"""

from __future__ import annotations

import math
import os
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from msa_edit.atomic import atomic_path
from msa_edit.errors import MsaEditError
from msa_edit.units import Kind, Unit

if TYPE_CHECKING:
    from matplotlib.figure import Figure

AXIS_LABEL: dict[Kind, str] = {
    "experts": "expert",
    "heads": "head",
    "neurons": "neuron",
    "layer": "",
}
"""The x-axis of each kind's grid; whole layers are one column."""


def _pyplot() -> Any:
    """`matplotlib.pyplot` on the non-interactive `Agg` backend (imported lazily)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _text(name: object) -> str:
    """`name` as literal plot text: `$` escaped (no mathtext), lone surrogates as escapes.

    >>> print(_text("a$^$b"))
    a\\$^\\$b
    """
    return str(name).replace("$", r"\$").encode("utf-8", "backslashreplace").decode("utf-8")


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


def _bar_height(value: float | None, log: bool) -> float:
    """`value` as a bar height: NaN (no bar) when None, non-finite or, on a log axis, <= 0."""
    if value is None or not math.isfinite(value) or (log and value <= 0):
        return math.nan
    return value


def _plain_log_ticks(axis: Any) -> None:
    """Plain numbers (0.02, 30) instead of 2x10^-2 on a log axis spanning about a decade or less."""
    from matplotlib.ticker import FuncFormatter

    lo, hi = sorted(abs(v) for v in axis.get_view_interval())
    if lo > 0 and hi / lo <= 12:
        plain = FuncFormatter(lambda v, _: f"{v:g}")
        axis.set_major_formatter(plain)
        axis.set_minor_formatter(plain)


def save_figure(fig: Figure, path: str | os.PathLike[str]) -> Path:
    """Save `fig` as a PNG at `path` atomically (temp file in the same folder, then rename)."""
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=120, metadata={"Software": None})
    finally:
        _pyplot().close(fig)
    return Path(path)


def unit_grid(
    values: torch.Tensor, units: Sequence[Unit], kind: Kind | None = None
) -> torch.Tensor:
    """Values `[n_units, T]` of the units of one kind as a grid `[T, n_layers, n_index]`.

    Cell `[t, L, i]` holds unit `layers.L.<kind>.i`'s value for target t (NaN = no such unit);
    whole layers (`layers.L`) fill one column. Units of other kinds are skipped; `kind=None`
    takes the only kind present.

    >>> units = [Unit(1, "heads", 2), Unit(0, "experts", 1), Unit(0, "heads", 0)]
    >>> g = unit_grid(torch.tensor([[1.0], [2.0], [3.0]]), units, "heads")
    >>> g.shape, g[0, 1, 2].item(), g[0, 0, 0].item()
    (torch.Size([1, 2, 3]), 1.0, 3.0)
    """
    kinds = sorted({u.kind for u in units})
    if kind is None:
        if len(kinds) != 1:
            raise MsaEditError(f"units of kinds {kinds} are mixed; pass kind= to pick one")
        kind = units[0].kind
    values = values.reshape(len(units), -1)
    rows = [row for row, unit in enumerate(units) if unit.kind == kind]
    if not rows:
        raise MsaEditError(f"no {kind} units among {len(units)}; pick one of {kinds}")
    layers = max(units[r].layer for r in rows) + 1
    width = 1 if kind == "layer" else max(units[r].index for r in rows) + 1
    grid = torch.full((values.shape[1], layers, width), math.nan, dtype=torch.float64)
    for row in rows:
        unit = units[row]
        grid[:, unit.layer, max(unit.index, 0)] = values[row].double()
    return grid


def expert_grid(values: torch.Tensor, units: Sequence[Unit]) -> torch.Tensor:
    """Values `[n_units, T]` of expert units as a grid `[T, n_layers, n_experts]` (NaN = absent).

    >>> units = [Unit(0, "experts", 1), Unit(1, "experts", 0)]
    >>> g = expert_grid(torch.tensor([[1.0], [2.0]]), units)
    >>> g.shape, g[0, 1, 0].item()
    (torch.Size([1, 2, 2]), 2.0)
    """
    if any(u.kind != "experts" for u in units):
        raise MsaEditError("expert_grid takes expert units only (layers.L.experts.E)")
    return unit_grid(values, units, "experts")


def _mark(ax: Any, cells: Sequence[tuple[int, int]], width: int) -> None:
    """Outline chosen cells (row = layer, column = index): boxes on small grids, x on large."""
    from matplotlib.patches import Rectangle

    for layer, index in cells:
        if width <= 64:
            ax.add_patch(
                Rectangle(
                    (index - 0.5, layer - 0.5), 1, 1, fill=False, edgecolor="black", linewidth=1.6
                )
            )
        else:
            ax.plot([index], [layer], marker="x", color="black", markersize=5)


def unit_heatmaps(
    values: torch.Tensor,
    units: Sequence[Unit],
    target_names: Sequence[str],
    path: str | os.PathLike[str],
    *,
    kind: Kind | None = None,
    title: str | None = None,
    label: str = "contribution",
    marked: Collection[Unit] = (),
) -> Path:
    """One layers x index heat-map per target, side by side, for one unit kind, as a PNG.

    Colours share one symmetric diverging scale across targets so the maps compare directly
    (blue = negative, red = positive, grey = no such unit); `marked` units get a black box.
    """
    plt = _pyplot()
    grid = unit_grid(values, units, kind)
    kind = kind or units[0].kind
    if grid.shape[0] != len(target_names):
        raise MsaEditError(f"{grid.shape[0]} targets in the values but {len(target_names)} names")
    finite = grid[torch.isfinite(grid)]
    limit = (float(finite.abs().max()) if finite.numel() else 0.0) or 1.0
    n_layers, width = grid.shape[1], grid.shape[2]
    cells = sorted((u.layer, max(u.index, 0)) for u in set(marked) if u.kind == kind)
    cmap = plt.get_cmap("RdBu_r").with_extremes(bad="0.85")
    cols = len(target_names)
    panel_w = min(max(0.28 * width + 0.8, 1.4), 4.5)
    fig, axes = plt.subplots(
        1,
        cols,
        figsize=(panel_w * cols + 1.4, min(0.4 * n_layers + 1.6, 9)),
        squeeze=False,
        constrained_layout=True,
    )
    image = None
    for t, ax in enumerate(axes[0]):
        image = ax.imshow(
            grid[t].numpy(),
            cmap=cmap,
            vmin=-limit,
            vmax=limit,
            aspect="auto",
            interpolation="nearest",
        )
        _mark(ax, cells, width)
        ax.set_title(_text(target_names[t]))
        ax.set_xlabel(AXIS_LABEL[kind])
        if width == 1:
            ax.set_xticks([])
        elif width <= 32:
            ax.set_xticks(range(width))
        if n_layers <= 32:
            ax.set_yticks(range(n_layers))
        if t == 0:
            ax.set_ylabel("layer")
    assert image is not None
    fig.colorbar(image, ax=axes[0].tolist(), label=_text(label), shrink=0.9)
    fig.suptitle(_text(title or f"Shapley value of each {AXIS_LABEL[kind] or 'layer'}"))
    return save_figure(fig, path)


def expert_heatmaps(
    values: torch.Tensor,
    units: Sequence[Unit],
    target_names: Sequence[str],
    path: str | os.PathLike[str],
    *,
    title: str = "Shapley value of each expert",
    label: str = "contribution",
    marked: Collection[Unit] = (),
) -> Path:
    """One layers x experts heat-map per target (e.g. per language), side by side, as a PNG.

    Colours share one symmetric scale across targets so maps compare directly.
    """
    if any(u.kind != "experts" for u in units):
        raise MsaEditError("expert_heatmaps takes expert units only (layers.L.experts.E)")
    return unit_heatmaps(
        values, units, target_names, path, kind="experts", title=title, label=label, marked=marked
    )


def ranking_plot(
    names: Sequence[str],
    scores: Sequence[float],
    errors: Sequence[float],
    chosen: Collection[str],
    path: str | os.PathLike[str],
    *,
    title: str,
    xlabel: str,
) -> Path:
    """Horizontal bars of `scores` (first name on top) with ±`errors` bars; `chosen` in red.

    A non-finite error gets no bar; an infinite one also gets "±∞" after its name. A non-finite
    score gets no bar and "(n/a)" after its name.
    """
    plt = _pyplot()
    n = len(names)
    fig, ax = plt.subplots(figsize=(7.5, 0.3 * n + 1.6), constrained_layout=True)
    ys = list(range(n))[::-1]
    colours = ["tab:red" if name in chosen else "tab:grey" for name in names]
    widths = [s if _finite(s) else 0.0 for s in scores]
    finite = [e if _finite(e) and _finite(s) else 0.0 for s, e in zip(scores, errors, strict=True)]
    ax.barh(ys, widths, xerr=finite, color=colours, capsize=2, error_kw={"elinewidth": 1})
    labels = [
        _text(name)
        + (" ±∞" if e is not None and math.isinf(e) else "")
        + ("" if _finite(s) else " (n/a)")
        for name, s, e in zip(names, scores, errors, strict=True)
    ]
    ax.set_yticks(ys, labels)
    ax.axvline(0.0, color="black", linewidth=0.8)
    ax.set_xlabel(_text(xlabel))
    ax.set_title(_text(title))
    if chosen:
        from matplotlib.patches import Patch

        ax.legend(
            handles=[
                Patch(color="tab:red", label="chosen by the plan"),
                Patch(color="tab:grey", label="not chosen"),
            ],
            loc="lower right",
        )
    return save_figure(fig, path)


def candidates_plot(
    names: Sequence[str],
    series: Mapping[str, Sequence[float]],
    chosen: str,
    path: str | os.PathLike[str],
    *,
    xlabel: str,
    title: str,
) -> Path:
    """Grouped horizontal bars: one group per candidate (first on top), one bar per series (e.g.
    calibration check half, held-out text); NaN values are left out; `chosen` is named in bold."""
    plt = _pyplot()
    n, k = len(names), len(series)
    fig, ax = plt.subplots(figsize=(7.5, 0.25 * n * k + 1.8), constrained_layout=True)
    height = 0.8 / max(k, 1)
    for j, (label, values) in enumerate(series.items()):
        ys = [n - 1 - i + 0.4 - height * (j + 0.5) for i in range(n)]
        widths = [v if _finite(v) else 0.0 for v in values]
        ax.barh(ys, widths, height=height, label=_text(label))
    ax.set_yticks(list(range(n))[::-1], [_text(name) for name in names])
    for tick, name in zip(ax.get_yticklabels(), names, strict=True):
        if name == chosen:
            tick.set_fontweight("bold")
    ax.axvline(0.0, color="black", linewidth=0.8)
    ax.set_xlabel(_text(xlabel))
    ax.set_title(_text(title))
    ax.legend(loc="best", fontsize="small")
    return save_figure(fig, path)


def before_after_plot(
    panels: Sequence[tuple[str, Sequence[str], bool]],
    before: Mapping[str, float | None],
    after: Mapping[str, float | None],
    path: str | os.PathLike[str],
) -> Path:
    """Grouped before/after bars per metric, one panel per `(title, metrics, log_scale)`.

    A metric missing, None or non-finite on one side gets no bar on that side, nor does a
    non-positive value on a log panel; a log panel with no positive value is drawn linear.
    """
    plt = _pyplot()
    fig, axes = plt.subplots(
        1,
        len(panels),
        squeeze=False,
        constrained_layout=True,
        figsize=(max(3.0, 0.9 * max(len(m) for _, m, _ in panels) + 1.5) * len(panels), 3.8),
    )
    for ax, (name, metrics, log) in zip(axes[0], panels, strict=True):
        xs = range(len(metrics))
        values = [side.get(m) for side in (before, after) for m in metrics]
        linear = log and not any(math.isfinite(_bar_height(v, True)) for v in values)
        log = log and not linear
        for side, by_metric, shift, colour in (
            ("before", before, -0.2, "tab:blue"),
            ("after", after, 0.2, "tab:orange"),
        ):
            heights = [_bar_height(by_metric.get(m), log) for m in metrics]
            bars = ax.bar([x + shift for x in xs], heights, width=0.4, label=side, color=colour)
            labels = [f"{h:.4g}" if math.isfinite(h) else "" for h in heights]
            ax.bar_label(bars, labels=labels, fontsize=7)
        ax.set_xticks(list(xs), [_text(m) for m in metrics], rotation=30, ha="right")
        ax.set_xlim(-0.8, len(metrics) - 0.2)
        ax.margins(y=0.12)
        if log:
            ax.set_yscale("log")
            _plain_log_ticks(ax.yaxis)
        ax.set_title(_text(name) + ("\n(linear: no positive values)" if linear else ""))
    axes[0][0].legend(fontsize="small", loc="lower left")
    return save_figure(fig, path)


def convergence_plot(
    n_evaluations: Sequence[int],
    max_stderr: Sequence[float],
    curves: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    path: str | os.PathLike[str],
    *,
    target: str,
) -> Path:
    """Left: the largest finite stderr vs evaluations (log-log). Right: each curve's value
    vs evaluations with a ±1.96·stderr band (`curves[name] = (values, stderrs)` per point).
    Points with a non-positive count or a non-finite value are left out.
    """
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8), constrained_layout=True)
    keep = [i for i, n in enumerate(n_evaluations) if n > 0]
    ns = [n_evaluations[i] for i in keep]
    shown = [(ns[j], max_stderr[i]) for j, i in enumerate(keep) if _finite(max_stderr[i])]
    shown = [(n, s) for n, s in shown if s > 0]
    if shown:
        left.plot([n for n, _ in shown], [s for _, s in shown], marker="o")
        left.set_xscale("log")
        left.set_yscale("log")
        _plain_log_ticks(left.xaxis)
        _plain_log_ticks(left.yaxis)
    else:
        left.text(0.5, 0.5, "no finite stderr yet", ha="center", transform=left.transAxes)
    left.set_xlabel("coalitions evaluated")
    left.set_ylabel("largest stderr")
    left.set_title("Estimator stderr")
    drawn = False
    for name, (all_values, all_errors) in curves.items():
        values = [all_values[i] if _finite(all_values[i]) else math.nan for i in keep]
        errors = [all_errors[i] for i in keep]
        (line,) = right.plot(ns, values, marker=".", label=_text(name))
        drawn = drawn or any(math.isfinite(v) for v in values)
        lo = [v - 1.96 * e if _finite(e) else math.nan for v, e in zip(values, errors, strict=True)]
        hi = [v + 1.96 * e if _finite(e) else math.nan for v, e in zip(values, errors, strict=True)]
        right.fill_between(ns, lo, hi, color=line.get_color(), alpha=0.2)
    if drawn:
        right.set_xscale("log")
        _plain_log_ticks(right.xaxis)
    else:
        right.text(0.5, 0.5, "no finite values", ha="center", transform=right.transAxes)
    right.axhline(0.0, color="black", linewidth=0.8)
    right.set_xlabel("coalitions evaluated")
    right.set_ylabel(_text(f"Shapley value ({target})"))
    right.set_title(_text(f"Top units for {target}"))
    if curves:
        right.legend(fontsize="small")
    return save_figure(fig, path)
