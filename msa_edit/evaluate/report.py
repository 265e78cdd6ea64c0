"""The run directory's `report.md`, with PNG plots beside it, from the files a run leaves there.

`shapley.json` is required; `plan.json`, `eval.json`, `edit.json` and `recipe.yaml` each add their
sections when present. Every eval number goes through one formatter (`fmt`, `fmt_delta`), so the
report shows exactly `round(value, 4)` of eval.json; the output is byte-identical for the same
inputs (no timestamps).

    >>> from msa_edit.evaluate.report import write_report
    >>> write_report("runs/demo")  # doctest: +SKIP
    PosixPath('runs/demo/report.md')
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from msa_edit.atomic import write_text
from msa_edit.errors import MsaEditError
from msa_edit.evaluate import plots
from msa_edit.units import KINDS, Kind, Unit

TOP_RANKING = 20
TOP_CONVERGENCE = 5
TOP_TABLE = 8
HEATMAP_FILE: dict[Kind, str] = {
    "experts": "heatmap_experts.png",
    "heads": "heatmap_heads.png",
    "neurons": "heatmap_neurons.png",
    "layer": "heatmap_layers.png",
}


def fmt(x: float) -> str:
    """An eval or Shapley number as the report prints it.

    >>> fmt(2.123456), fmt(float("inf"))
    ('2.1235', 'inf')
    """
    return f"{x:.4f}"


def fmt_delta(x: float) -> str:
    """A change, always with its sign.

    >>> fmt_delta(0.5), fmt_delta(-0.00004)
    ('+0.5000', '-0.0000')
    """
    return f"{x:+.4f}"


def _fmt_se(x: float) -> str:
    return "∞" if math.isinf(x) else "—" if math.isnan(x) else fmt(x)


@dataclass(frozen=True)
class _Shapley:
    """shapley.json as the report needs it: values/stderr `[n_units, T]` (null stderr = inf)."""

    units: list[Unit]
    targets: list[str]
    values: torch.Tensor
    stderr: torch.Tensor
    meta: dict[str, Any]

    @property
    def names(self) -> list[str]:
        return [str(u) for u in self.units]


def _tensor(obj: Any, fill: float) -> torch.Tensor:
    """Nested lists or the `{"shape", "data"}` form of msa_edit's JSON; null becomes `fill`."""
    if isinstance(obj, Mapping):
        data = [fill if x is None else float(x) for x in obj["data"]]
        return torch.tensor(data, dtype=torch.float64).reshape(obj["shape"])

    def clean(x: Any) -> Any:
        return [clean(y) for y in x] if isinstance(x, list) else fill if x is None else float(x)

    return torch.tensor(clean(obj), dtype=torch.float64)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise MsaEditError(f"cannot read {path} ({exc.__class__.__name__}); fix or re-run") from exc


def _load_shapley(run_dir: Path) -> _Shapley:
    path = run_dir / "shapley.json"
    if not path.is_file():
        raise MsaEditError(f"{path} is missing; run the analysis first (msa-edit run RECIPE.yaml)")
    obj = _read_json(path)
    try:
        units = [Unit.parse(name) for name in obj["units"]]
        values = _tensor(obj["values"], math.nan).reshape(len(units), -1)
        stderr = _tensor(obj.get("stderr") or [], math.inf)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise MsaEditError(f"{path} lacks units/values in the expected shape ({exc})") from exc
    if stderr.numel() == values.numel():
        stderr = stderr.reshape(values.shape)
    else:  # no usable stderr: unknown, shown as "—"
        stderr = torch.full_like(values, math.nan)
    targets = [str(t) for t in obj.get("targets") or []]
    if len(targets) != values.shape[1]:
        targets = [f"output {t}" for t in range(values.shape[1])]
    return _Shapley(units, targets, values, stderr, obj)


def _loss_like(meta: Mapping[str, Any]) -> bool:
    """Whether lower values of the analysed objective are better (NLL, loss)."""
    objective = str(meta.get("objective") or "mean_nll").lower()
    return "nll" in objective or "loss" in objective or "ppl" in objective


def _sign_meaning(meta: Mapping[str, Any]) -> str:
    if _loss_like(meta):
        return "negative = the unit lowers the loss (helps that target), positive = it raises it"
    return "positive = the unit raises the objective, negative = it lowers it"


def _names(names: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(f"`{n}`" for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


# ---- eval.json ------------------------------------------------------------------------------


def metric_group(name: str) -> str:
    """Which panel a metric belongs to: "nll", "ppl" or "lm-eval".

    >>> metric_group("nll/ru"), metric_group("ppl/ru"), metric_group("arc_easy/acc")
    ('nll', 'ppl', 'lm-eval')
    """
    head = name.split("/", 1)[0]
    return head if head in ("nll", "ppl") else "lm-eval"


def _eval_rows(ev: Mapping[str, Any]) -> list[tuple[str, float | None, float | None, float | None]]:
    """(metric, before, after, delta) for every metric, grouped nll, ppl, lm-eval, file order."""
    before, after = ev.get("before") or {}, ev.get("after") or {}
    delta = ev.get("delta") or {}
    names = list(dict.fromkeys([*before, *after, *delta]))
    order = {"nll": 0, "ppl": 1, "lm-eval": 2}
    names.sort(key=lambda n: order[metric_group(n)])
    rows = []
    for n in names:
        b, a = before.get(n), after.get(n)
        d = delta.get(n, a - b if a is not None and b is not None else None)
        rows.append((n, b, a, d))
    return rows


def _headline(
    ev: Mapping[str, Any], plan: Mapping[str, Any] | None, sh: _Shapley | None
) -> str:
    """The target and retained deltas that say whether the edit did what it should."""
    delta = {n: d for n, _, _, d in _eval_rows(ev) if d is not None}
    before, after = ev.get("before") or {}, ev.get("after") or {}

    def show(m: str) -> str:
        text = f"`{m}` {fmt_delta(delta[m])}"
        if m in before and m in after:
            text += f" ({fmt(before[m])} → {fmt(after[m])})"
        return text

    def pick(names: Sequence[str]) -> list[str]:
        out = []
        for t in names:
            m = next((f"{g}/{t}" for g in ("nll", "ppl") if f"{g}/{t}" in delta), None)
            out += [m] if m else []
        return out

    target = [str(t) for t in (plan or {}).get("target") or []]
    retain = [str(t) for t in (plan or {}).get("retain") or []]
    if plan is None and sh is not None:
        target = sh.targets
    parts = []
    if pick(target):
        parts.append(("target " if plan else "") + ", ".join(show(m) for m in pick(target)))
    if pick(retain):
        parts.append("retained " + ", ".join(show(m) for m in pick(retain)))
    general = [m for m in delta if metric_group(m) == "lm-eval"]
    if general:
        parts.append("lm-eval " + ", ".join(show(m) for m in general))
    if not parts:
        parts = [", ".join(show(m) for m in list(delta)[:6])]
    return "; ".join(parts)


# ---- sections -------------------------------------------------------------------------------


def _summary(
    sh: _Shapley,
    plan: Mapping[str, Any] | None,
    ev: Mapping[str, Any] | None,
) -> list[str]:
    meta = sh.meta
    kinds = {k: sum(u.kind == k for u in sh.units) for k in KINDS}
    counts = ", ".join(f"{n} {'layers' if k == 'layer' else k}" for k, n in kinds.items() if n)
    budget = meta.get("budget")
    text = (
        f"Model `{meta.get('model', 'unknown')}`: Multiperturbation Shapley-value Analysis of "
        f"{len(sh.units)} units ({counts}) on {len(sh.targets)} target(s) "
        f"({', '.join(sh.targets)}) with the `{meta.get('method', '?')}` estimator: "
        f"{meta.get('n_evaluations', '?')} coalitions evaluated"
        + (f" of a budget of {budget}" if budget is not None else "")
        + f", stopped by {meta.get('stopped', '?')}"
        + (f", lesion `{meta['lesion']}`" if meta.get("lesion") else "")
        + (f", objective `{meta['objective']}`" if meta.get("objective") else "")
        + f", seed {meta.get('seed', '?')}. Values: {_sign_meaning(meta)}."
    )
    if plan is not None:
        chosen = [str(u) for u in plan.get("units") or []]
        retain = plan.get("retain") or []
        text += (
            f" **Plan:** {plan.get('action', '?')} {len(chosen)} of {len(sh.units)} units "
            f"({_names(chosen)}), {METHOD_TEXT.get(str(plan.get('method', 'shapley')), '?')}; "
            f"mode `{plan.get('mode', '?')}`, target "
            f"{', '.join(map(str, plan.get('target') or [])) or '—'}"
            + (f" while retaining {', '.join(map(str, retain))}" if retain else "")
            + "."
        )
    if ev is not None and any(d is not None for *_, d in _eval_rows(ev)):
        text += f" **After the edit:** {_headline(ev, plan, sh)}."
    return [text, ""]


METHOD_TEXT = {
    "shapley": "ranked by Shapley value",
    "loo": "ranked by leave-one-out (each unit's removal alone, measured with the game)",
    "search": "chosen by a search that evaluates removal sets with the game",
    "reap": "ranked by REAP saliency (router probability x expert output norm)",
    "frequency": "ranked by how often the router picks each expert",
}


def _plan_summary(plan: Mapping[str, Any], ev: Mapping[str, Any] | None) -> list[str]:
    """The summary paragraph of a run whose plan needed no Shapley analysis."""
    chosen = [str(u) for u in plan.get("units") or []]
    method = str(plan.get("method", "?"))
    search = plan.get("search") or {}
    retain = plan.get("retain") or []
    text = (
        f"**Plan:** {plan.get('action', '?')} {len(chosen)} units ({_names(chosen)}), "
        f"{METHOD_TEXT.get(method, method)}; mode `{plan.get('mode', '?')}`, target "
        f"{', '.join(map(str, plan.get('target') or [])) or '—'}"
        + (f" while retaining {', '.join(map(str, retain))}" if retain else "")
        + (
            f"; {search['n_evaluations']} coalitions evaluated"
            if search.get("n_evaluations") is not None
            else ""
        )
        + "."
    )
    if ev is not None and any(d is not None for *_, d in _eval_rows(ev)):
        text += f" **After the edit:** {_headline(ev, plan, None)}."
    return [text, ""]


def _candidates(
    run_dir: Path, plan: Mapping[str, Any], ev: Mapping[str, Any] | None
) -> list[str]:
    """The comparison table of a search plan's candidates: calibration and held-out changes."""
    search = plan.get("search") or {}
    found = search.get("candidates") or []
    if len(found) < 2:
        return []
    targeted = plan.get("mode") == "specific"
    heldout = (ev or {}).get("candidates") or {}
    before = (ev or {}).get("before") or {}
    sets = sorted({k for c in found for k in c.get("per_set") or {}})
    langs = sorted({m.split("/", 1)[1] for m in before if m.startswith("nll/")})
    langs = [g for g in langs if any(f"nll/{g}" in heldout.get(c["name"], {}) for c in found)]
    what = "target increase (higher = more targeted)" if targeted else "mean increase (lower wins)"
    head = ["candidate", "units", "calib. search half", "calib. check half", "calib. all ± se"]
    head += [f"calib. {_cell(s)}" for s in sets] + [f"held-out {_cell(lang)}" for lang in langs]
    if targeted:
        head.append("within bounds")
    lines = [
        "## Candidates",
        "",
        f"Every removal set the plan compared, measured with the game on the calibration text "
        f"(loss change in nats/token; objective: {what}). The search half ranked moves; the "
        "check half, which ranked nothing, chose among the candidates. Held-out columns: the "
        "evaluation text's NLL change with each set lesioned on the base model. "
        f"Chosen: **{_cell(str(search.get('chosen', '?')))}**; "
        f"{search.get('n_evaluations', '?')} coalitions spent.",
        "",
        "| " + " | ".join(head) + " |",
        "|---|---:|" + "---:|" * (len(head) - 2),
    ]
    for c in found:
        name = _cell(str(c.get("name")))
        name = f"**{name}**" if c.get("name") == search.get("chosen") else name
        cells = [name, str(len(c.get("units") or []))]
        cells += [fmt_delta(float(c[k])) for k in ("search", "check")]
        cells.append(f"{fmt_delta(float(c['all']))} ± {fmt(float(c['stderr']))}")
        per_set = c.get("per_set") or {}
        cells += [fmt_delta(float(per_set[s])) if s in per_set else "—" for s in sets]
        got = heldout.get(str(c.get("name")), {})
        for lang in langs:
            m = f"nll/{lang}"
            cells.append(fmt_delta(got[m] - before[m]) if m in got and m in before else "—")
        if targeted:
            cells.append("yes" if c.get("feasible") else "no")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "<details><summary>the candidates' removal sets</summary>", ""]
    lines += [
        f"- {_cell(str(c.get('name')))}: " + (", ".join(f"`{u}`" for u in c.get("units") or [])
                                                or "nothing")
        for c in found
    ]  # fmt: skip
    lines += ["", "</details>"]
    names = [str(c.get("name")) for c in found]
    series = {"calibration, check half": [float(c["check"]) for c in found]}
    shown = [g for g in langs if g in (plan.get("target") or [])] if targeted else langs
    if shown:
        series["held-out" + (", target" if targeted else ", mean over sets")] = [
            sum(heldout.get(n, {}).get(f"nll/{g}", math.nan) - before[f"nll/{g}"] for g in shown)
            / len(shown)
            for n in names
        ]
    plots.candidates_plot(
        names, series, str(search.get("chosen")), run_dir / "candidates.png",
        xlabel="loss increase (nats/token)" + (" on the target" if targeted else ""),
        title="Candidate removal sets (chosen in bold)",
    )  # fmt: skip
    caption = (
        "Each candidate's loss increase on the calibration check half (the objective the choice "
        "was made on) and, where evaluated, on the held-out text."
    )
    return [*lines, "", *_figure("candidates.png", "candidates", caption)]


def _figure(file: str, alt: str, caption: str) -> list[str]:
    return [f"![{alt}]({file})", "", f"*{caption}*", ""]


def _heatmaps(run_dir: Path, sh: _Shapley, chosen: set[Unit]) -> list[str]:
    label = "Δ mean NLL (nats)" if _loss_like(sh.meta) else "Shapley value"
    lines = ["## Shapley values per target", ""]
    for kind in KINDS:
        if not any(u.kind == kind for u in sh.units):
            continue
        file = HEATMAP_FILE[kind]
        axis = plots.AXIS_LABEL[kind] or "layer"
        plots.unit_heatmaps(
            sh.values,
            sh.units,
            sh.targets,
            run_dir / file,
            kind=kind,
            label=label,
            marked=chosen,
            title=f"Shapley value of each {axis} per target",
        )
        columns = "one column" if kind == "layer" else f"columns are {axis} indices"
        colours = (
            "blue (negative) = the unit lowers that target's loss, i.e. helps it; red (positive) "
            "= it raises the loss"
            if _loss_like(sh.meta)
            else "red (positive) = the unit raises the objective; blue (negative) = it lowers it"
        )
        caption = (
            f"One panel per target; rows are layers, {columns}. One colour scale is shared by "
            f"all panels: {colours}; grey = not analysed."
            + (" Black boxes (x on wide maps) mark the units the plan chose." if chosen else "")
        )
        lines += _figure(file, f"{kind} heat-map", caption)
    return lines


def _ranking(run_dir: Path, sh: _Shapley | None, plan: Mapping[str, Any] | None) -> list[str]:
    scores = (plan or {}).get("scores") or {}
    chosen = [str(u) for u in (plan or {}).get("units") or []]
    if not scores and sh is None:
        return []
    if scores:
        se = (plan or {}).get("stderr") or {}
        rows = [
            (float(s), math.inf if se.get(n, 0.0) is None else float(se.get(n, math.nan)), n)
            for n, s in scores.items()
        ]
        what = "plan score (higher = edited first)"
        how = "by the plan's score"
    else:
        assert sh is not None
        mean = sh.values.abs().nanmean(dim=1)
        err = sh.stderr.pow(2).sum(dim=1).sqrt() / sh.values.shape[1]
        rows = [(float(m), float(e), n) for m, e, n in zip(mean, err, sh.names, strict=True)]
        what = "mean |Shapley value| across targets"
        how = "by mean |Shapley value| across targets"
    rows.sort(key=lambda r: (-r[0] if math.isfinite(r[0]) else math.inf, r[2]))
    top = rows[:TOP_RANKING]
    plots.ranking_plot(
        [r[2] for r in top],
        [r[0] for r in top],
        [1.96 * r[1] for r in top],
        set(chosen),
        run_dir / "ranking.png",
        xlabel=what,
        title=f"Top {len(top)} units {how}",
    )
    caption = (
        f"The {len(top)} highest-ranked units {how}, best on top; whiskers are ±1.96·stderr "
        "(≈95% interval; a whisker crossing 0 means the sign is not established)"
        + ("; red bars are the units the plan chose." if chosen else ".")
    )
    lines = ["## Ranking", "", *_figure("ranking.png", "ranking", caption)]
    if chosen:
        lines += [f"Chosen units ({len(chosen)}): " + ", ".join(f"`{n}`" for n in chosen), ""]
    return lines


def _eval(run_dir: Path, ev: Mapping[str, Any]) -> list[str]:
    rows = _eval_rows(ev)
    if not rows:
        return []
    titles = {
        "nll": ("NLL (nats, lower is better)", False),
        "ppl": ("Perplexity (log scale)", True),
        "lm-eval": ("lm-eval", False),
    }
    panels = []
    for group, (name, log) in titles.items():
        metrics = [r[0] for r in rows if metric_group(r[0]) == group]
        if metrics:
            panels.append((name, metrics, log))
    plots.before_after_plot(
        panels, ev.get("before") or {}, ev.get("after") or {}, run_dir / "before_after.png"
    )
    caption = (
        "Each metric before (blue) and after (orange) the edit; NLL and perplexity: lower is "
        "better, lm-eval scores: higher is better. The table below holds the exact numbers."
    )
    lines = [
        "## Before and after the edit",
        "",
        *_figure("before_after.png", "before/after", caption),
    ]
    lines += ["| metric | before | after | delta |", "|---|---:|---:|---:|"]
    for name, b, a, d in rows:
        cells = [
            fmt(b) if b is not None else "—",
            fmt(a) if a is not None else "—",
            fmt_delta(d) if d is not None else "—",
        ]
        lines.append(f"| {_cell(name)} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def _edit(edit: Any) -> list[str]:
    records = edit.get("records", [edit]) if isinstance(edit, Mapping) else edit
    if not isinstance(records, list) or not records:
        return []
    lines = [
        "## Edit",
        "",
        "| # | action | units | params before | params after | change |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for i, rec in enumerate(r for r in records if isinstance(r, Mapping)):
        units = rec.get("units")
        before, after = rec.get("params_before"), rec.get("params_after")
        change = "—"
        if isinstance(before, int | float) and isinstance(after, int | float) and before:
            change = f"{(after - before) / before:+.2%}"
        cells = [
            str(i + 1),
            f"`{rec.get('action', '?')}`",
            str(len(units)) if isinstance(units, list) else "—",
            f"{before:,}" if isinstance(before, int) else "—",
            f"{after:,}" if isinstance(after, int) else "—",
            change,
        ]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return [*lines, ""]


def _trace(sh: _Shapley) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    points = []
    for p in sh.meta.get("trace") or []:
        try:
            values = _tensor(p["values"], math.nan).reshape(len(sh.units), -1)
            stderr = _tensor(p["stderr"], math.inf).reshape(len(sh.units), -1)
        except (KeyError, TypeError, ValueError, RuntimeError):
            return []  # a trace we cannot read is not plotted
        if values.shape != sh.values.shape:
            return []  # reduced to per-unit norms (huge tensor modes): not comparable
        points.append((int(p["n_evaluations"]), values, stderr))
    return points


def _convergence(run_dir: Path, sh: _Shapley, focus: str | None) -> list[str]:
    """Convergence of the largest stderr, and of the top units for `focus` (default: 1st target)."""
    points = _trace(sh)
    if len(points) < 2:
        return []
    t = sh.targets.index(focus) if focus in sh.targets else 0
    ns = [n for n, _, _ in points]
    largest = []
    for _, _, se in points:
        finite = se[torch.isfinite(se)]
        largest.append(float(finite.max()) if finite.numel() else math.inf)
    final = sh.values[:, t].abs().nan_to_num(nan=-1.0)
    order = sorted(range(len(sh.units)), key=lambda i: (-float(final[i]), sh.names[i]))
    curves = {
        sh.names[i]: (
            [float(v[i, t]) for _, v, _ in points],
            [float(s[i, t]) for _, _, s in points],
        )
        for i in order[:TOP_CONVERGENCE]
    }
    plots.convergence_plot(ns, largest, curves, run_dir / "convergence.png", target=sh.targets[t])
    caption = (
        "Left: the largest finite standard error over all units and targets as more coalitions "
        "are evaluated (log-log; a Monte-Carlo estimate falls like 1/√n). Right: the estimates "
        f"of the {len(curves)} units with the largest |value| for {sh.targets[t]}, with "
        "±1.96·stderr bands; flat lines inside narrow bands mean the estimate has settled."
    )
    return ["## Estimator convergence", "", *_figure("convergence.png", "convergence", caption)]


def _tables(sh: _Shapley, chosen: set[str]) -> list[str]:
    k = min(TOP_TABLE, len(sh.units))
    lines = [
        "## Top units per target",
        "",
        f"The {k} units with the largest |Shapley value| for each target "
        f"({_sign_meaning(sh.meta)}); **bold** = chosen by the plan.",
        "",
    ]
    for t, target in enumerate(sh.targets):
        col = sh.values[:, t].abs().nan_to_num(nan=-1.0)
        order = sorted(range(len(sh.units)), key=lambda i: (-float(col[i]), sh.names[i]))[:k]
        lines += [f"### {target}", "", "| rank | unit | value | ± stderr |", "|---:|---|---:|---:|"]
        for r, i in enumerate(order):
            name = f"**`{sh.names[i]}`**" if sh.names[i] in chosen else f"`{sh.names[i]}`"
            value, se = float(sh.values[i, t]), float(sh.stderr[i, t])
            lines.append(f"| {r + 1} | {name} | {fmt_delta(value)} | {_fmt_se(se)} |")
        lines.append("")
    return lines


def _recipe(text: str) -> list[str]:
    ticks = 3
    while "`" * ticks in text:
        ticks += 1
    fence = "`" * ticks
    return [
        "<details><summary>recipe.yaml</summary>",
        "",
        fence + "yaml",
        text.rstrip("\n"),
        fence,
        "",
        "</details>",
        "",
    ]


# ---- entry point ----------------------------------------------------------------------------


def _optional_json(path: Path) -> Any:
    return _read_json(path) if path.is_file() else None


def write_report(run_dir: str | Path, *, title: str | None = None) -> Path:
    """Write run_dir/report.md and its PNGs from the run-directory files; returns the report path.

    `shapley.json` or a `plan.json` made without Shapley values (`method` loo, search, reap,
    frequency) is required (`MsaEditError` without either); plan.json, eval.json, edit.json and
    recipe.yaml add their sections when present, and a plan's candidates a comparison table.
    """
    run_dir = Path(run_dir)
    plan = _optional_json(run_dir / "plan.json")
    has_shapley = (run_dir / "shapley.json").is_file()
    if not has_shapley and (plan or {}).get("method", "shapley") == "shapley":
        _load_shapley(run_dir)  # raises: the run has neither an analysis nor a plan without one
    sh = _load_shapley(run_dir) if has_shapley else None
    ev = _optional_json(run_dir / "eval.json")
    edit = _optional_json(run_dir / "edit.json")
    recipe = run_dir / "recipe.yaml"
    chosen = [str(u) for u in (plan or {}).get("units") or []]
    marked = {Unit.parse(n) for n in chosen}
    model = sh.meta.get("model") if sh is not None else (plan or {}).get("base_model")
    heading = title or f"MSA report: {model or run_dir.name}"
    lines = [f"# {heading}", ""]
    if sh is not None:
        lines += _summary(sh, plan, ev)
        lines += _heatmaps(run_dir, sh, marked)
    else:
        lines += _plan_summary(plan or {}, ev)
    lines += _candidates(run_dir, plan or {}, ev)
    lines += _ranking(run_dir, sh, plan)
    lines += _eval(run_dir, ev) if ev is not None else []
    lines += _edit(edit) if edit is not None else []
    if sh is not None:
        lines += _convergence(run_dir, sh, ((plan or {}).get("target") or [None])[0])
        lines += _tables(sh, set(chosen))
    lines += _recipe(recipe.read_text()) if recipe.is_file() else []
    return write_text(run_dir / "report.md", "\n".join(lines).rstrip("\n") + "\n")
