"""Plots people look at instead of reading tables: Shapley modes as layer x unit maps, a ranking
with error bars, before/after metric bars and estimator convergence, each saved as a PNG.

The figure functions take plain numbers (no run-directory knowledge; `report.py` reads the files)
and write atomically (temp file, then rename) with the `Agg` backend, closing every figure. NaN,
infinite and (on log axes) non-positive numbers get no bar or point, and names are drawn as plain
text (`$` is not mathtext), so no value or name in a run file makes a plot raise.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from msa_edit.atomic import atomic_path
from msa_edit.errors import MsaEditError
from msa_edit.units import UNIT_KINDS, Kind, Unit

if TYPE_CHECKING:
    from matplotlib.figure import Figure


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
    spec = UNIT_KINDS[kind]
    rows = [row for row, unit in enumerate(units) if unit.spec is spec]
    if not rows:
        raise MsaEditError(f"no {kind} units among {len(units)}; pick one of {kinds}")
    layers = max(units[r].layer for r in rows) + 1
    width = 1 if spec.segment is None else max(units[r].index for r in rows) + 1
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
    if any(not u.spec.routed for u in units):
        raise MsaEditError("expert_grid takes expert units only (layers.L.experts.E)")
    return unit_grid(values, units, "experts")


MAX_ASPECT = 2.5
"""Heat-maps are at most this many times wider than tall (or taller than wide)."""
MAX_FIG_IN = 11.0
"""Heat-maps are at most this many inches wide or tall (about 1300 px at 120 dpi)."""
_LIST_MAX_UNITS = 128
"""Up to this many units, a flat layers x index grid becomes a units x targets list instead."""


@dataclass(frozen=True)
class HeatmapLayout:
    """How `unit_heatmaps` arranges a kind's values, chosen by `heatmap_layout`.

    `mode` "grid": one layers x index panel per target, `panels = (rows, cols)` of subplots,
    each layer's index axis folded into `fold` rows of `chunk` columns. `mode` "list": one
    image of units (rows, in order) x targets (columns), wrapped into `fold` side-by-side blocks
    of `chunk` rows. `figsize` is in inches; its aspect lies within [1/MAX_ASPECT, MAX_ASPECT].
    """

    mode: Literal["grid", "list"]
    panels: tuple[int, int]
    fold: int
    chunk: int
    figsize: tuple[float, float]

    @property
    def aspect(self) -> float:
        return self.figsize[0] / self.figsize[1]


def _figsize(data_w: int, data_h: int, panels: tuple[int, int]) -> tuple[float, float]:
    """Inches for `data_w` x `data_h` cells in `panels` subplots, before the aspect cap."""
    rows, cols = panels
    extra_w, extra_h = 2.2 + 0.5 * (cols - 1), 0.9 + 0.75 * rows
    cell = min((MAX_FIG_IN - extra_w) / data_w, (MAX_FIG_IN - extra_h) / data_h, 0.45)
    cell = max(cell, 0.1)
    return data_w * cell + extra_w, data_h * cell + extra_h


def _capped(size: tuple[float, float]) -> tuple[float, float]:
    """`size` with the short side lengthened until the aspect is within MAX_ASPECT, and
    both sides then scaled down to MAX_FIG_IN."""
    w, h = size
    w, h = max(w, h / MAX_ASPECT), max(h, w / MAX_ASPECT)
    scale = min(1.0, MAX_FIG_IN / max(w, h))
    return round(w * scale, 2), round(h * scale, 2)


def _chunks(n: int) -> list[int]:
    """Row lengths to fold `n` cells into: `n` itself, then the shortest multiple of 4 (of 8
    past 64) giving each number of rows, down to rows of about 4.

    >>> _chunks(64)[:5]
    [64, 32, 24, 16, 12]
    """
    step = 8 if n > 64 else 4
    out = [n]
    for rows in range(2, max(2, n // 4) + 1):
        chunk = step * math.ceil(math.ceil(n / rows) / step)
        if chunk < out[-1]:
            out.append(chunk)
    return out


def heatmap_layout(n_layers: int, width: int, n_targets: int, n_units: int) -> HeatmapLayout:
    """The arrangement of a `n_layers` x `width` grid per target (`n_units` units present)
    whose figure is closest to 3:2 without passing MAX_ASPECT: panels side by side or wrapped
    into rows, a long index axis folded, or (few units) a units x targets list in blocks.

    >>> heatmap_layout(2, 4, 3, 8).mode, heatmap_layout(1, 64, 3, 64).mode
    ('grid', 'list')
    >>> layout = heatmap_layout(1, 64, 3, 64)
    >>> layout.fold, layout.chunk, 1 / MAX_ASPECT <= layout.aspect <= MAX_ASPECT
    (4, 16, True)
    """
    candidates: list[HeatmapLayout] = []
    for chunk in _chunks(width):
        fold = -(-width // chunk)
        for cols in range(1, n_targets + 1):
            rows = -(-n_targets // cols)
            if rows > 1 and -(-n_targets // rows) != cols:
                continue
            size = _figsize(cols * chunk, rows * n_layers * fold, (rows, cols))
            candidates.append(HeatmapLayout("grid", (rows, cols), fold, chunk, size))
    if n_units <= _LIST_MAX_UNITS:
        for chunk in _chunks(n_units):
            blocks = -(-n_units // chunk)
            size = _figsize(blocks * n_targets, chunk, (1, blocks))
            candidates.append(HeatmapLayout("list", (1, blocks), blocks, chunk, size))

    def badness(layout: HeatmapLayout) -> tuple[bool, int, int, float]:
        w, h = _capped(layout.figsize)
        hard = abs(math.log(layout.aspect / 1.5)) > math.log(1.4 * MAX_ASPECT / 1.5)
        # an unfolded grid keeps the layer structure best, then a list, then a folded grid;
        # a single layer has no structure to keep: a list shows it best
        if layout.mode == "list":
            penalty = 0 if n_layers == 1 else 1
        else:
            penalty = 2 if layout.fold > 1 else 0 if n_layers > 1 else 1
        empty = layout.panels[0] * layout.panels[1] - (n_targets if layout.mode == "grid" else 1)
        return hard, penalty, empty, abs(math.log(w / h / 1.5))

    best = min(candidates, key=badness)
    return dataclasses.replace(best, figsize=_capped(best.figsize))


def _mark(ax: Any, cells: Collection[tuple[int, int]], width: int) -> None:
    """Outline chosen cells (row, column): boxes on small grids, x on large."""
    from matplotlib.patches import Rectangle

    for row, col in sorted(cells):
        if width <= 64:
            ax.add_patch(
                Rectangle(
                    (col - 0.5, row - 0.5), 1, 1, fill=False, edgecolor="black", linewidth=1.6
                )
            )
        else:
            ax.plot([col], [row], marker="x", color="black", markersize=5)


def _ticks(axis: Any, labels: Sequence[str]) -> None:
    """Label integer positions 0..n-1 of `axis` with `labels`: every one up to 40, else a few."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, MaxNLocator

    n = len(labels)
    if n <= 40:
        axis.set_major_locator(FixedLocator(list(range(n))))
    else:
        axis.set_major_locator(MaxNLocator(nbins=12, integer=True))
    axis.set_major_formatter(
        FuncFormatter(lambda v, _: labels[int(v)] if v == int(v) and 0 <= v < n else "")
    )


def _grid_panels(
    grid: torch.Tensor, layout: HeatmapLayout, cells: Collection[tuple[int, int]]
) -> tuple[list[torch.Tensor], list[str], list[str], set[tuple[int, int]]]:
    """Each target's `[layers, width]` grid folded into `[layers * fold, chunk]` images, with
    their row and column labels and the marked cells' new positions."""
    _, n_layers, width = grid.shape
    fold, chunk = layout.fold, layout.chunk
    padded = torch.full((grid.shape[0], n_layers, fold * chunk), math.nan, dtype=grid.dtype)
    padded[:, :, :width] = grid
    images = list(padded.reshape(grid.shape[0], n_layers * fold, chunk))
    if fold == 1:
        rows = [str(layer) for layer in range(n_layers)]
        cols = [str(i) for i in range(chunk)]
    else:
        rows = [f"{layer}: {k * chunk}" for layer in range(n_layers) for k in range(fold)]
        cols = [f"+{i}" for i in range(chunk)]
    marked = {(layer * fold + index // chunk, index % chunk) for layer, index in cells}
    return images, rows, cols, marked


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
    """Heat-maps of one unit kind's values per target, as a PNG laid out by `heatmap_layout`.

    Usually one layers x index panel per target (a long index axis folded into several rows,
    labelled `layer: first index`); a single layer or a few units become one units x targets
    image in side-by-side blocks. Colours share one symmetric diverging scale across targets so
    the maps compare directly (blue = negative, red = positive, grey = no such unit); `marked`
    units get a black box (an x on wide maps). The figure's aspect stays within MAX_ASPECT.
    """
    plt = _pyplot()
    grid = unit_grid(values, units, kind)
    kind = kind or units[0].kind
    if grid.shape[0] != len(target_names):
        raise MsaEditError(f"{grid.shape[0]} targets in the values but {len(target_names)} names")
    finite = grid[torch.isfinite(grid)]
    limit = (float(finite.abs().max()) if finite.numel() else 0.0) or 1.0
    n_targets, n_layers, width = grid.shape
    spec = UNIT_KINDS[kind]
    whole = spec.segment is None  # whole layers: one column
    present = sorted({(u.layer, max(u.index, 0)) for u in units if u.spec is spec})
    cells = {(u.layer, max(u.index, 0)) for u in set(marked) if u.spec is spec}
    layout = heatmap_layout(n_layers, width, n_targets, len(present))
    axis = "" if whole else spec.axis
    cmap = plt.get_cmap("RdBu_r").with_extremes(bad="0.85")
    fig, axes = plt.subplots(
        *layout.panels, figsize=layout.figsize, squeeze=False, constrained_layout=True
    )
    flat = list(axes.flat)
    if layout.mode == "grid":
        images, row_labels, col_labels, spots = _grid_panels(grid, layout, cells)
        titles = [_text(name) for name in target_names]
        xlabel = axis if layout.fold == 1 else f"{axis} (row start +)"
        ylabel = "layer" if layout.fold == 1 else f"layer: first {axis}"
        col_sets = [col_labels] * n_targets
        row_sets = [row_labels] * n_targets
        spot_sets = [spots] * n_targets
    else:  # units (rows) x targets (columns), wrapped into blocks of `chunk` units
        table = torch.stack([grid[:, layer, index] for layer, index in present])
        names = [
            str(layer) if whole else str(index) if n_layers == 1 else f"{layer}: {index}"
            for layer, index in present
        ]
        blocks = range(0, len(present), layout.chunk)
        images = [table[b : b + layout.chunk] for b in blocks]
        row_sets = [names[b : b + layout.chunk] for b in blocks]
        col_sets = [[_text(t) for t in target_names]] * len(images)
        spot_sets = [
            {(r, t) for r, cell in enumerate(present[b : b + layout.chunk]) if cell in cells
             for t in range(n_targets)}
            for b in blocks
        ]  # fmt: skip
        titles = [""] * len(images)
        xlabel = "target"
        ylabel = "layer" if whole else axis if n_layers == 1 else f"layer: {axis}"
    image = None
    for i, ax in enumerate(flat):
        if i >= len(images):
            ax.set_axis_off()
            continue
        image = ax.imshow(
            images[i].numpy(),
            cmap=cmap,
            vmin=-limit,
            vmax=limit,
            aspect="auto",
            interpolation="nearest",
        )
        _mark(ax, spot_sets[i], images[i].shape[1])
        ax.set_title(titles[i])
        if whole and layout.mode == "grid":
            ax.set_xticks([])
        else:
            _ticks(ax.xaxis, col_sets[i])
            if layout.mode == "list" and max(len(c) for c in col_sets[i]) > 2:
                ax.tick_params(axis="x", labelrotation=45)
        _ticks(ax.yaxis, row_sets[i])
        ax.set_xlabel(xlabel if layout.mode == "grid" or n_targets > 1 else "")
        if i % layout.panels[1] == 0:
            ax.set_ylabel(ylabel)
    assert image is not None
    fig.colorbar(image, ax=flat, label=_text(label), shrink=0.9)
    fig.suptitle(_text(title or f"Shapley value of each {axis or 'layer'}"))
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
    if any(not u.spec.routed for u in units):
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
            loc="upper left",
            bbox_to_anchor=(1.02, 1.0),
            borderaxespad=0.0,
            fontsize="small",
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
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    return save_figure(fig, path)


def delta_bars(
    metrics: Sequence[str], deltas: Mapping[str, float | None]
) -> list[tuple[str, float, str]]:
    """(metric, bar height, colour) per metric as `delta_plot` draws them: the height is the
    change (NaN, no bar, when missing or non-finite), red when it rose, blue when it fell.

    >>> delta_bars(["nll/en", "nll/ru", "acc"], {"nll/en": 0.02, "nll/ru": -0.01})
    [('nll/en', 0.02, 'tab:red'), ('nll/ru', -0.01, 'tab:blue'), ('acc', nan, 'tab:grey')]
    """
    out = []
    for m in metrics:
        d = _bar_height(deltas.get(m), False)
        colour = "tab:grey" if not math.isfinite(d) else "tab:red" if d > 0 else "tab:blue"
        out.append((m, d, colour))
    return out


def bar_labels(values: Sequence[float]) -> list[str]:
    """Signed labels with the decimals the panel's largest value needs for 3 significant
    digits, so small neighbours stay short (n/a where not finite).

    >>> bar_labels([0.6803, 0.0005938, -0.0027, math.nan])
    ['+0.680', '+0.001', '-0.003', 'n/a']
    >>> bar_labels([137.8, 0.07])
    ['+138', '+0']
    """
    finite = [abs(v) for v in values if math.isfinite(v)]
    top = max(finite, default=0.0)
    decimals = max(0, 2 - math.floor(math.log10(top))) if top > 0 else 0
    return [f"{v:+.{decimals}f}" if math.isfinite(v) else "n/a" for v in values]


def delta_plot(
    panels: Sequence[tuple[str, Sequence[str]]],
    deltas: Mapping[str, float | None],
    path: str | os.PathLike[str],
    *,
    highlight: Collection[str] = (),
) -> Path:
    """One panel of change bars (after - before, signed) per `(title, metrics)`, as a PNG.

    Bars are red where the metric rose and blue where it fell, labelled with the signed change;
    the axis spans the changes (and 0), so 0.01 and 0.04 look different. `highlight`ed metrics
    (the plan's target) get a black outline and bold names. A missing or non-finite change gets
    no bar and "n/a".
    """
    plt = _pyplot()
    from matplotlib.patches import Patch

    widest = max((len(m) for _, m in panels), default=1)
    fig, axes = plt.subplots(
        1,
        max(len(panels), 1),
        squeeze=False,
        constrained_layout=True,
        figsize=(min(max(3.2, 0.8 * widest + 1.6) * len(panels), 12.0), 4.2),
    )
    for ax, (name, metrics) in zip(axes[0], panels, strict=True):
        bars = delta_bars(metrics, deltas)
        xs = list(range(len(bars)))
        heights = [h for _, h, _ in bars]
        drawn = ax.bar(
            xs,
            heights,
            width=0.6,
            color=[c for *_, c in bars],
            edgecolor=["black" if m in highlight else "none" for m, _, _ in bars],
            linewidth=1.8,
        )
        labels = bar_labels(heights)
        ax.bar_label(drawn, labels=labels, fontsize=8, padding=2)
        ax.axhline(0.0, color="black", linewidth=0.8)
        ax.set_xticks(xs, [_text(m) for m in metrics], rotation=30, ha="right")
        for tick, metric in zip(ax.get_xticklabels(), metrics, strict=True):
            if metric in highlight:
                tick.set_fontweight("bold")
        ax.set_xlim(-0.7, len(metrics) - 0.3)
        finite = [h for h in heights if math.isfinite(h)]
        lo, hi = min([0.0, *finite]), max([0.0, *finite])
        pad = 0.18 * (hi - lo) or 1.0
        ax.set_ylim(lo - (pad if lo < 0 else 0.05 * pad), hi + (pad if hi > 0 else 0.05 * pad))
        ax.set_title(_text(name), fontsize="medium")
    handles = [Patch(color="tab:red", label="rose"), Patch(color="tab:blue", label="fell")]
    if highlight:
        handles.append(Patch(facecolor="white", edgecolor="black", linewidth=1.8, label="target"))
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize="small")
    fig.suptitle("Change after the edit (after - before)")
    return save_figure(fig, path)


FEW_POINTS = 3
"""A trace with fewer checkpoints than this shows no trend: markers with error bars, no lines."""


def _count_ticks(axis: Any, ns: Sequence[int]) -> None:
    """Ticks exactly at the evaluation counts when there are a few of them."""
    from matplotlib.ticker import NullLocator

    if 0 < len(set(ns)) <= 6:
        axis.set_ticks(sorted(set(ns)), [str(n) for n in sorted(set(ns))])
        axis.set_minor_locator(NullLocator())


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
    Points with a non-positive count or a non-finite value are left out. With fewer than
    FEW_POINTS checkpoints no line is drawn: markers, ±1.96·stderr error bars (side by side)
    and a note that there are too few checkpoints for a trend.
    """
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.0), constrained_layout=True)
    keep = [i for i, n in enumerate(n_evaluations) if n > 0]
    ns = [n_evaluations[i] for i in keep]
    few = len(ns) < FEW_POINTS
    note = f"only {len(ns)} checkpoint{'s' * (len(ns) != 1)}: too few for a trend"
    shown = [(ns[j], max_stderr[i]) for j, i in enumerate(keep) if _finite(max_stderr[i])]
    shown = [(n, s) for n, s in shown if s > 0]
    if shown:
        left.plot(
            [n for n, _ in shown], [s for _, s in shown], marker="o", linestyle="" if few else "-"
        )
        left.set_xscale("log")
        left.set_yscale("log")
        left.margins(x=0.15, y=0.15)
        _plain_log_ticks(left.xaxis)
        _plain_log_ticks(left.yaxis)
        _count_ticks(left.xaxis, [n for n, _ in shown])
    else:
        left.text(0.5, 0.5, "no finite stderr yet", ha="center", transform=left.transAxes)
    left.set_xlabel("coalitions evaluated")
    left.set_ylabel("largest stderr")
    left.set_title("Estimator stderr" + (f"\n({note})" if few and shown else ""))
    drawn = False
    for j, (name, (all_values, all_errors)) in enumerate(curves.items()):
        values = [all_values[i] if _finite(all_values[i]) else math.nan for i in keep]
        errors = [all_errors[i] for i in keep]
        drawn = drawn or any(math.isfinite(v) for v in values)
        if few:  # no line between two points: each estimate with its interval, dodged apart
            dodge = 1.04 ** (j - (len(curves) - 1) / 2)
            yerr = [1.96 * e if _finite(e) else 0.0 for e in errors]
            right.errorbar(
                [n * dodge for n in ns], values, yerr=yerr, fmt="o", capsize=3, label=_text(name)
            )
            continue
        (line,) = right.plot(ns, values, marker=".", label=_text(name))
        lo = [v - 1.96 * e if _finite(e) else math.nan for v, e in zip(values, errors, strict=True)]
        hi = [v + 1.96 * e if _finite(e) else math.nan for v, e in zip(values, errors, strict=True)]
        right.fill_between(ns, lo, hi, color=line.get_color(), alpha=0.2)
    if drawn:
        right.set_xscale("log")
        right.margins(x=0.15)
        _plain_log_ticks(right.xaxis)
        _count_ticks(right.xaxis, ns)
    else:
        right.text(0.5, 0.5, "no finite values", ha="center", transform=right.transAxes)
    right.axhline(0.0, color="black", linewidth=0.8)
    right.set_xlabel("coalitions evaluated")
    right.set_ylabel(_text(f"Shapley value ({target})"))
    right.set_title(_text(f"Top units for {target}") + (f"\n({note})" if few and drawn else ""))
    if curves:
        right.legend(
            fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0
        )
    return save_figure(fig, path)
