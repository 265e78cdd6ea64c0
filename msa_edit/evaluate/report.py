"""The run directory's `report.md`, with PNG plots beside it, from the files a run leaves there.

`shapley.json` is required; `plan.json`, `eval.json`, `edit.json` and `recipe.yaml` each add their
sections when present. Every eval number goes through one formatter (`fmt`, `fmt_delta`), so the
report shows exactly `round(value, 4)` of eval.json (`n/a` for null, i.e. non-finite); the output
is byte-identical for the same inputs (no timestamps). Every name read from the run directory
(targets, units, metrics, candidates, model, recipe fields) goes through `md_text`, so a
hand-made file cannot inject Markdown or HTML into the report.

    >>> from msa_edit.evaluate.report import write_report
    >>> write_report("runs/demo")  # doctest: +SKIP
    PosixPath('runs/demo/report.md')
"""

from __future__ import annotations

import json
import math
import re
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from msa_edit.atomic import write_text
from msa_edit.errors import MsaEditError
from msa_edit.evaluate import plots
from msa_edit.evaluate.numbers import fmt, fmt_delta
from msa_edit.rundir import (
    EDIT_JSON,
    EVAL_JSON,
    PLAN_JSON,
    RECIPE_YAML,
    REPORT_MD,
    SCREEN_JSON,
    SHAPLEY_JSON,
)
from msa_edit.tensorjson import decode
from msa_edit.units import UNIT_KINDS, Unit

TOP_RANKING = 20
TOP_CONVERGENCE = 5
TOP_TABLE = 8
_PLAIN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_./+=,-]*")
"""Names shown as they are: no character here starts Markdown or HTML markup."""


def _fmt_se(x: float) -> str:
    return "∞" if math.isinf(x) else "—" if math.isnan(x) else fmt(x)


def _escape_char(ch: str) -> str:
    if ch == "\\":
        return "\\\\"
    if ch == "|":
        return "\\|"  # a table cell's pipe; GFM unescapes it inside code spans too
    if unicodedata.category(ch)[0] == "C" or ch in "\u2028\u2029":
        return ch.encode("unicode_escape").decode("ascii")  # newline -> \n, visible
    return ch


def md_text(text: object, *, code: bool = False) -> str:
    """`text` (a name from a run file) safe to paste anywhere in report.md: prose, a heading or
    a table cell. Plain names stay as they are (`code=True`: always in inline code); anything
    else goes in inline code with newlines and control characters shown as escapes (`\\n`),
    backslashes doubled and pipes escaped, so it can neither start a line nor add markup.

    >>> md_text("nll/ru"), md_text("nll/ru", code=True), md_text("a*b*")
    ('nll/ru', '`nll/ru`', '`a*b*`')
    >>> print(md_text("x\\n## injected | <b>`"))
    `` x\\n## injected \\| <b>` ``
    """
    s = str(text)
    if not s:
        return '""'
    if not code and _PLAIN.fullmatch(s):
        return s
    shown = "".join(_escape_char(ch) for ch in s)
    fence = "`" * (max((len(r) for r in re.findall("`+", shown)), default=0) + 1)
    pad = " " if shown[0] in "` " or shown[-1] in "` " else ""
    return f"{fence}{pad}{shown}{pad}{fence}"


def _num(x: Any) -> float:
    """A JSON number as float; null, NaN, text or anything else is NaN (shown "n/a")."""
    if isinstance(x, bool) or not isinstance(x, int | float):
        return math.nan
    return float(x)


def _str_list(x: Any) -> list[str]:
    """A JSON list of names as strings (one name alone counts as a list of one; null: [])."""
    if x is None:
        return []
    if isinstance(x, str):
        return [x]
    if isinstance(x, list | tuple | Mapping):
        return [str(y) for y in x]
    return [str(x)]


def _mapping(x: Any) -> Mapping[str, Any]:
    return x if isinstance(x, Mapping) else {}


def _metrics(x: Any) -> dict[str, float]:
    """{metric: value} of an eval.json section; null or non-numbers become NaN."""
    return {str(k): _num(v) for k, v in _mapping(x).items()}


@dataclass(frozen=True)
class _Shapley:
    """shapley.json as the report needs it: values/stderr `[n_units, T]` (null value = NaN,
    null stderr = inf)."""

    units: list[Unit]
    targets: list[str]
    values: torch.Tensor
    stderr: torch.Tensor
    meta: Mapping[str, Any]

    @property
    def names(self) -> list[str]:
        return [str(u) for u in self.units]


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MsaEditError(f"cannot read {path} ({exc.__class__.__name__}); fix or re-run") from exc


def _load_shapley(run_dir: Path) -> _Shapley:
    path = run_dir / SHAPLEY_JSON
    if not path.is_file():
        raise MsaEditError(f"{path} is missing; run the analysis first (msa-edit run RECIPE.yaml)")
    obj = _read_json(path)
    if not isinstance(obj, Mapping) or not isinstance(obj.get("units"), list):
        raise MsaEditError(f"{path} is not a JSON object with a list of units")
    units = [Unit.parse(str(name)) for name in obj["units"]]
    targets = _str_list(obj.get("targets"))
    try:
        if units:
            values = decode(obj["values"], math.nan).reshape(len(units), -1)
        else:
            values = torch.zeros(0, max(len(targets), 1), dtype=torch.float64)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise MsaEditError(f"{path} lacks units/values in the expected shape ({exc})") from exc
    try:
        stderr = decode(obj.get("stderr") or [], math.inf).reshape(values.shape)
    except (KeyError, TypeError, ValueError, RuntimeError):  # no usable stderr: unknown, "—"
        stderr = torch.full_like(values, math.nan)
    if len(targets) != values.shape[1]:
        targets = [f"output {t}" for t in range(values.shape[1])]
    return _Shapley(units, targets, values, stderr, obj)


def _loss_like(meta: Mapping[str, Any]) -> bool:
    """Whether lower values of the analysed objective are better (NLL, loss): as shapley.json
    stores it, else (files of older versions) from the objective's name."""
    stored = meta.get("lower_is_better")
    if isinstance(stored, bool):
        return stored
    objective = str(meta.get("objective") or "mean_nll").lower()
    return "nll" in objective or "loss" in objective or "ppl" in objective


def _sign_meaning(meta: Mapping[str, Any]) -> str:
    if _loss_like(meta):
        return "negative = the unit lowers the loss (helps that target), positive = it raises it"
    return "positive = the unit raises the objective, negative = it lowers it"


def _names(names: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(md_text(n, code=True) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _list(names: Sequence[str]) -> str:
    return ", ".join(md_text(n) for n in names)


def _meta(meta: Mapping[str, Any], key: str, code: bool = False) -> str:
    value = meta.get(key)
    return "?" if value is None else md_text(value, code=code)


# ---- eval.json ------------------------------------------------------------------------------


def metric_group(name: str) -> str:
    """Which panel a metric belongs to: "nll", "bpb", "ppl" or "lm-eval".

    >>> metric_group("nll/ru"), metric_group("bpb/ru"), metric_group("arc_easy/acc")
    ('nll', 'bpb', 'lm-eval')
    """
    head = name.split("/", 1)[0]
    return head if head in ("nll", "bpb", "ppl") else "lm-eval"


def _eval_rows(ev: Mapping[str, Any]) -> list[tuple[str, float | None, float | None, float | None]]:
    """(metric, before, after, delta) for every metric, grouped nll, bpb, ppl, lm-eval, file order;
    None = not in the file, NaN = null there."""
    before, after = _metrics(ev.get("before")), _metrics(ev.get("after"))
    delta = _metrics(ev.get("delta"))
    names = list(dict.fromkeys([*before, *after, *delta]))
    order = {"nll": 0, "bpb": 1, "ppl": 2, "lm-eval": 3}
    names.sort(key=lambda n: order[metric_group(n)])
    rows = []
    for n in names:
        b, a = before.get(n), after.get(n)
        d = delta.get(n, a - b if a is not None and b is not None else None)
        rows.append((n, b, a, d))
    return rows


def _headline(ev: Mapping[str, Any], plan: Mapping[str, Any] | None, sh: _Shapley | None) -> str:
    """The target and retained deltas that say whether the edit did what it should."""
    delta = {n: d for n, _, _, d in _eval_rows(ev) if d is not None}
    before, after = _metrics(ev.get("before")), _metrics(ev.get("after"))

    def show(m: str) -> str:
        text = f"{md_text(m, code=True)} {fmt_delta(delta[m])}"
        if m in before and m in after:
            text += f" ({fmt(before[m])} → {fmt(after[m])})"
        return text

    def pick(names: Sequence[str]) -> list[str]:
        out = []
        for t in names:
            m = next((f"{g}/{t}" for g in ("nll", "ppl") if f"{g}/{t}" in delta), None)
            out += [m] if m else []
        return out

    target = _str_list((plan or {}).get("target"))
    retain = _str_list((plan or {}).get("retain"))
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
    kinds = {spec: sum(u.spec is spec for u in sh.units) for spec in UNIT_KINDS.values()}
    counts = ", ".join(
        f"{n} {spec.name.replace('_', ' ') if spec.segment else 'layers'}"
        for spec, n in kinds.items()
        if n
    )
    budget = meta.get("budget")
    text = (
        f"Model {md_text(meta.get('model', 'unknown'), code=True)}: Multiperturbation "
        f"Shapley-value Analysis of {len(sh.units)} units"
        + (f" ({counts})" if counts else "")
        + f" on {len(sh.targets)} target(s) ({_list(sh.targets)}) with the "
        f"{_meta(meta, 'method', code=True)} estimator"
        + (f" (surrogate {md_text(meta['surrogate'], code=True)})" if meta.get("surrogate") else "")
        + ": "
        f"{_meta(meta, 'n_evaluations')} coalitions evaluated"
        + (f" of a budget of {md_text(budget)}" if budget is not None else "")
        + f", stopped by {_meta(meta, 'stopped')}"
        + (f", lesion {md_text(meta['lesion'], code=True)}" if meta.get("lesion") else "")
        + (f", objective {md_text(meta['objective'], code=True)}" if meta.get("objective") else "")
        + f", seed {_meta(meta, 'seed')}. Values: {_sign_meaning(meta)}."
    )
    if plan is not None:
        chosen = _str_list(plan.get("units"))
        retain = _str_list(plan.get("retain"))
        method = str(plan.get("method", "shapley"))
        text += (
            f" **Plan:** {_meta(plan, 'action')} {len(chosen)} of {len(sh.units)} units "
            f"({_names(chosen)}), {METHOD_TEXT.get(method, md_text(method))}; "
            f"mode {_meta(plan, 'mode', code=True)}, target "
            f"{_list(_str_list(plan.get('target'))) or '—'}"
            + (f" while retaining {_list(retain)}" if retain else "")
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


def _levels(
    screen: Mapping[str, Any] | None, sh: _Shapley | None, plan: Mapping[str, Any] | None
) -> list[str]:
    """With a screen: what each level of the narrowing looked at and what it cost."""
    if not screen:
        return []
    methods = " + ".join(md_text(m) for m in _str_list(screen.get("method")))
    rows = [
        "| level | units | cost |",
        "|---|---:|---|",
        f"| screen ({methods}, for {md_text(screen.get('target'))}) | "
        f"{md_text(screen.get('from'))} → {len(_str_list(screen.get('units')))} | "
        f"one pass over {md_text(screen.get('rows'))} calibration rows, "
        f"{_num(screen.get('seconds')):.1f} s, no coalitions |",
    ]
    if sh is not None:
        rows.append(
            f"| Shapley analysis | {len(sh.units)} | {_meta(sh.meta, 'n_evaluations')} coalitions |"
        )
    search = _mapping((plan or {}).get("search"))
    if search.get("n_evaluations") is not None:
        rows.append(
            f"| verified search | {len(_str_list((plan or {}).get('units')))} removed | "
            f"{md_text(search['n_evaluations'])} coalitions |"
        )
    return ["## Narrowing", "", *rows, ""]


def _plan_summary(plan: Mapping[str, Any], ev: Mapping[str, Any] | None) -> list[str]:
    """The summary paragraph of a run whose plan needed no Shapley analysis."""
    chosen = _str_list(plan.get("units"))
    method = str(plan.get("method", "?"))
    search = _mapping(plan.get("search"))
    retain = _str_list(plan.get("retain"))
    text = (
        f"**Plan:** {_meta(plan, 'action')} {len(chosen)} units ({_names(chosen)}), "
        f"{METHOD_TEXT.get(method, md_text(method))}; mode {_meta(plan, 'mode', code=True)}, "
        f"target {_list(_str_list(plan.get('target'))) or '—'}"
        + (f" while retaining {_list(retain)}" if retain else "")
        + (
            f"; {md_text(search['n_evaluations'])} coalitions evaluated"
            if search.get("n_evaluations") is not None
            else ""
        )
        + "."
    )
    if ev is not None and any(d is not None for *_, d in _eval_rows(ev)):
        text += f" **After the edit:** {_headline(ev, plan, None)}."
    return [text, ""]


def _candidates(run_dir: Path, plan: Mapping[str, Any], ev: Mapping[str, Any] | None) -> list[str]:
    """The comparison table of a search plan's candidates: calibration and held-out changes."""
    search = _mapping(plan.get("search"))
    found = [c for c in search.get("candidates") or [] if isinstance(c, Mapping)]
    if len(found) < 2:
        return []
    targeted = plan.get("mode") == "specific"
    heldout = {str(k): _metrics(v) for k, v in _mapping((ev or {}).get("candidates")).items()}
    before = _metrics((ev or {}).get("before"))
    chosen = str(search.get("chosen", "?"))
    names = [str(c.get("name")) for c in found]
    sets = sorted({str(k) for c in found for k in _mapping(c.get("per_set"))})
    langs = sorted({m.split("/", 1)[1] for m in before if m.startswith("nll/")})
    langs = [g for g in langs if any(f"nll/{g}" in heldout.get(n, {}) for n in names)]
    what = "target increase (higher = more targeted)" if targeted else "mean increase (lower wins)"
    head = ["candidate", "units", "calib. search half", "calib. check half", "calib. all ± se"]
    head += [f"calib. {md_text(s)}" for s in sets]
    head += [f"held-out {md_text(lang)}" for lang in langs]
    if targeted:
        head.append("within bounds")
    lines = [
        "## Candidates",
        "",
        f"Every removal set the plan compared, measured with the game on the calibration text "
        f"(loss change in nats/token; objective: {what}). The search half ranked moves; the "
        "check half, which ranked nothing, chose among the candidates. Held-out columns: the "
        "evaluation text's NLL change with each set lesioned on the base model. "
        f"Chosen: **{md_text(chosen)}**; {_meta(search, 'n_evaluations')} coalitions spent.",
        "",
        "| " + " | ".join(head) + " |",
        "|---|---:|" + "---:|" * (len(head) - 2),
    ]
    for c, name in zip(found, names, strict=True):
        units = _str_list(c.get("units"))
        cells = [f"**{md_text(name)}**" if name == chosen else md_text(name), str(len(units))]
        cells += [fmt_delta(_num(c.get(k))) for k in ("search", "check")]
        cells.append(f"{fmt_delta(_num(c.get('all')))} ± {fmt(_num(c.get('stderr')))}")
        per_set = {str(k): v for k, v in _mapping(c.get("per_set")).items()}
        cells += [fmt_delta(_num(per_set[s])) if s in per_set else "—" for s in sets]
        got = heldout.get(name, {})
        for lang in langs:
            m = f"nll/{lang}"
            cells.append(fmt_delta(got[m] - before[m]) if m in got and m in before else "—")
        if targeted:
            cells.append("yes" if c.get("feasible") else "no")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "<details><summary>the candidates' removal sets</summary>", ""]
    lines += [
        f"- {md_text(name)}: "
        + (", ".join(md_text(u, code=True) for u in _str_list(c.get("units"))) or "nothing")
        for c, name in zip(found, names, strict=True)
    ]
    lines += ["", "</details>"]
    series = {"calibration, check half": [_num(c.get("check")) for c in found]}
    target = _str_list(plan.get("target"))
    shown = [g for g in langs if g in target] if targeted else langs
    if shown:
        series["held-out" + (", target" if targeted else ", mean over sets")] = [
            sum(heldout.get(n, {}).get(f"nll/{g}", math.nan) - before[f"nll/{g}"] for g in shown)
            / len(shown)
            for n in names
        ]
    plots.candidates_plot(
        names, series, chosen, run_dir / "candidates.png",
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
    for spec in UNIT_KINDS.values():
        if not any(u.spec is spec for u in sh.units):
            continue
        kind, file, axis = spec.name, spec.heatmap, spec.axis
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
        columns = "one column" if spec.segment is None else f"columns are {axis} indices"
        colours = (
            "blue (negative) = the unit lowers that target's loss, i.e. helps it; red (positive) "
            "= it raises the loss"
            if _loss_like(sh.meta)
            else "red (positive) = the unit raises the objective; blue (negative) = it lowers it"
        )
        caption = (
            f"One panel per target; rows are layers, {columns}. One colour scale is shared by "
            f"all panels: {colours}; grey = not analysed (or n/a)."
            + (" Black boxes (x on wide maps) mark the units the plan chose." if chosen else "")
        )
        lines += _figure(file, f"{kind} heat-map", caption)
    return lines if len(lines) > 2 else []


def _ranking(run_dir: Path, sh: _Shapley | None, plan: Mapping[str, Any] | None) -> list[str]:
    scores = _mapping((plan or {}).get("scores"))
    chosen = _str_list((plan or {}).get("units"))
    if not scores and sh is None:
        return []
    if scores:
        se = _mapping((plan or {}).get("stderr"))
        rows = [
            (_num(s), math.inf if n in se and se[n] is None else _num(se.get(n)), str(n))
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
    if not top:
        return []
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
        shown = ", ".join(md_text(n, code=True) for n in chosen)
        lines += [f"Chosen units ({len(chosen)}): {shown}", ""]
    return lines


def _eval(run_dir: Path, ev: Mapping[str, Any], plan: Mapping[str, Any] | None) -> list[str]:
    rows = _eval_rows(ev)
    if not rows:
        return []
    titles = {
        "nll": "NLL (nats/token; + = worse)",
        "bpb": "Bits per byte (comparable across languages; + = worse)",
        "ppl": "Perplexity (+ = worse)",
        "lm-eval": "lm-eval (+ = better)",
    }
    panels = []
    for group, name in titles.items():
        metrics = [r[0] for r in rows if metric_group(r[0]) == group]
        if metrics:
            panels.append((name, metrics))
    target = set(_str_list((plan or {}).get("target")))
    highlight = {r[0] for r in rows if r[0].split("/", 1)[-1] in target}
    plots.delta_plot(
        panels, {n: d for n, _, _, d in rows}, run_dir / "before_after.png", highlight=highlight
    )
    caption = (
        "The change of each metric (after - before the edit, the table's delta column): red = "
        "it rose, blue = it fell; for NLL and perplexity a rise is worse, for lm-eval scores "
        "better"
        + ("; outlined bars (bold names) are the plan's target" if highlight else "")
        + ". n/a values get no bar. The table below holds the exact numbers before and after."
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
        lines.append(f"| {md_text(name)} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def _edit(edit: Any) -> list[str]:
    records = edit.get("records", [edit]) if isinstance(edit, Mapping) else edit
    if not isinstance(records, list) or not records:
        return []
    lines = [
        "## Edit",
        "",
        "| # | action | units | lesion it equals | params before | params after | change |",
        "|---:|---|---:|---|---:|---:|---:|",
    ]
    warnings = []
    for i, rec in enumerate(r for r in records if isinstance(r, Mapping)):
        units = rec.get("units")
        before, after = rec.get("params_before"), rec.get("params_after")
        change = "—"
        if _num(before) and math.isfinite(_num(before)) and math.isfinite(_num(after)):
            change = f"{(_num(after) - _num(before)) / _num(before):+.2%}"
        cells = [
            str(i + 1),
            md_text(rec.get("action", "?"), code=True),
            str(len(units)) if isinstance(units, list) else "—",
            md_text(rec.get("matches", "—"), code=True),
            f"{before:,}" if isinstance(before, int) else "—",
            f"{after:,}" if isinstance(after, int) else "—",
            change,
        ]
        lines.append("| " + " | ".join(cells) + " |")
        if isinstance(rec.get("differs"), str):
            why = md_text(rec["differs"])
            warnings += [f"**Edit {i + 1} differs from the analysis:** {why}.", ""]
    return [*lines, "", *warnings]


def _trace(sh: _Shapley) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    trace = sh.meta.get("trace")
    points = []
    for p in trace if isinstance(trace, list) else []:
        try:
            n = _num(p["n_evaluations"])
            values = decode(p["values"], math.nan).reshape(len(sh.units), -1)
            stderr = decode(p["stderr"], math.inf).reshape(len(sh.units), -1)
        except (KeyError, TypeError, ValueError, RuntimeError):
            continue  # a point we cannot read is not plotted
        if values.shape != sh.values.shape or stderr.shape != values.shape:
            return []  # reduced to per-unit norms (huge tensor modes): not comparable
        if math.isfinite(n) and n > 0:  # a point without its count has no place on the x axis
            points.append((int(n), values, stderr))
    return points


def _convergence(run_dir: Path, sh: _Shapley, focus: str | None) -> list[str]:
    """Convergence of the largest stderr, and of the top units for `focus` (default: 1st target)."""
    points = _trace(sh)
    if len(points) < 2 or not sh.units:
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
        f"of the {len(curves)} units with the largest |value| for {md_text(sh.targets[t])}, with "
        "±1.96·stderr bands; flat lines inside narrow bands mean the estimate has settled."
    )
    if len(points) < plots.FEW_POINTS:
        caption = (
            f"Only {len(points)} checkpoints were recorded (a small budget), too few to show a "
            "trend: left, the largest finite standard error at each; right, the estimates of the "
            f"{len(curves)} units with the largest |value| for {md_text(sh.targets[t])} at each, "
            "with ±1.96·stderr error bars."
        )
    return ["## Estimator convergence", "", *_figure("convergence.png", "convergence", caption)]


def _tables(sh: _Shapley, chosen: set[str]) -> list[str]:
    k = min(TOP_TABLE, len(sh.units))
    if not k:
        return []
    lines = [
        "## Top units per target",
        "",
        f"The {k} units with the largest |Shapley value| for each target "
        f"({_sign_meaning(sh.meta)}); **bold** = chosen by the plan; n/a = not a finite number.",
        "",
    ]
    for t, target in enumerate(sh.targets):
        col = sh.values[:, t].abs().nan_to_num(nan=-1.0)
        order = sorted(range(len(sh.units)), key=lambda i: (-float(col[i]), sh.names[i]))[:k]
        lines += [f"### {md_text(target)}", "", "| rank | unit | value | ± stderr |"]
        lines.append("|---:|---|---:|---:|")
        for r, i in enumerate(order):
            name = md_text(sh.names[i], code=True)
            name = f"**{name}**" if sh.names[i] in chosen else name
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


def _optional_json(path: Path, *, kinds: tuple[type, ...] = (dict,)) -> Any:
    """The file's JSON if it exists; `MsaEditError` if it is not one of `kinds` at the top."""
    if not path.is_file():
        return None
    obj = _read_json(path)
    if not isinstance(obj, kinds):
        what = " or ".join("an object" if k is dict else "a list" for k in kinds)
        raise MsaEditError(f"{path} should hold {what} at the top; fix or re-run")
    return obj


def _parse_units(names: Sequence[str]) -> set[Unit]:
    """The units among `names` that parse (a malformed name is still listed, just not marked)."""
    out = set()
    for name in names:
        try:
            out.add(Unit.parse(name))
        except MsaEditError:
            continue
    return out


def write_report(run_dir: str | Path, *, title: str | None = None) -> Path:
    """Write run_dir/report.md and its PNGs from the run-directory files; returns the report path.

    `shapley.json` or a `plan.json` made without Shapley values (`method` loo, search, reap,
    frequency) is required (`MsaEditError` without either); plan.json, eval.json, edit.json and
    recipe.yaml add their sections when present, and a plan's candidates a comparison table.
    Nulls (non-finite numbers) show as "n/a"; `title` is the caller's Markdown (one line).
    """
    run_dir = Path(run_dir)
    plan = _optional_json(run_dir / PLAN_JSON)
    has_shapley = (run_dir / SHAPLEY_JSON).is_file()
    if not has_shapley and (plan or {}).get("method", "shapley") == "shapley":
        _load_shapley(run_dir)  # raises: the run has neither an analysis nor a plan without one
    sh = _load_shapley(run_dir) if has_shapley else None
    ev = _optional_json(run_dir / EVAL_JSON)
    edit = _optional_json(run_dir / EDIT_JSON, kinds=(dict, list))
    recipe = run_dir / RECIPE_YAML
    chosen = _str_list((plan or {}).get("units"))
    model = sh.meta.get("model") if sh is not None else (plan or {}).get("base_model")
    name = md_text(model) if model else md_text(run_dir.name)
    heading = " ".join(title.splitlines()) if title else f"MSA report: {name}"
    lines = [f"# {heading}", ""]
    lines += _levels(_optional_json(run_dir / SCREEN_JSON), sh, plan)
    if sh is not None:
        lines += _summary(sh, plan, ev)
        lines += _heatmaps(run_dir, sh, _parse_units(chosen))
    else:
        lines += _plan_summary(plan or {}, ev)
    lines += _candidates(run_dir, plan or {}, ev)
    lines += _ranking(run_dir, sh, plan)
    lines += _eval(run_dir, ev, plan) if ev is not None else []
    lines += _edit(edit) if edit is not None else []
    if sh is not None:
        focus = _str_list((plan or {}).get("target"))
        lines += _convergence(run_dir, sh, focus[0] if focus else None)
        lines += _tables(sh, set(chosen))
    lines += _recipe(recipe.read_text(errors="replace")) if recipe.is_file() else []
    return write_text(run_dir / REPORT_MD, "\n".join(lines).rstrip("\n") + "\n")
