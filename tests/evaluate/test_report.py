"""report.md and its PNGs from synthetic run directories (no model needed)."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from msa_edit.errors import MsaEditError
from msa_edit.evaluate.plots import expert_grid, unit_grid, unit_heatmaps
from msa_edit.evaluate.report import write_report
from msa_edit.units import Unit

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TARGETS = ["en", "ru", "de"]
UNITS = [f"layers.{layer}.experts.{e}" for layer in range(2) for e in range(4)]
CHOSEN = ["layers.1.experts.2", "layers.0.experts.3"]


def _values(scale: float) -> list[list[float]]:
    return [[scale * (i - 3.5) * (t + 1) / 10 for t in range(len(TARGETS))] for i in range(8)]


def _stderr(scale: float) -> list[list[float | None]]:
    rows: list[list[float | None]] = [[0.02 * scale + 0.001 * i] * 3 for i in range(8)]
    rows[5][1] = None  # infinite stderr, as the runner writes it
    return rows


def _make_run(
    path: Path, *, plan: bool = True, eval_: bool = True, edit: bool = True, recipe: bool = True
) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    shapley = {
        "units": UNITS,
        "targets": TARGETS,
        "values": _values(1.0),
        "stderr": _stderr(1.0),
        "n_evaluations": 192,
        "method": "kernel",
        "seed": 0,
        "budget": 192,
        "stopped": "budget",
        "v_full": [2.0, 2.5, 2.2],
        "v_empty": [5.0, 5.0, 5.0],
        "lesion": "reroute",
        "objective": "mean_nll",
        "model": "tiny-moe",
        "trace": [
            {"n_evaluations": n, "values": _values(1 + 1 / n), "stderr": _stderr(64 / n)}
            for n in (64, 128, 192)
        ],
    }
    (path / "shapley.json").write_text(json.dumps(shapley))
    if plan:
        scores = {u: round(0.3 - 0.05 * i, 3) for i, u in enumerate(CHOSEN + UNITS[:4])}
        (path / "plan.json").write_text(
            json.dumps(
                {
                    "action": "remove",
                    "units": CHOSEN,
                    "scores": scores,
                    "stderr": {u: 0.01 for u in scores} | {UNITS[0]: None},
                    "target": ["ru"],
                    "retain": ["en", "de"],
                    "mode": "specific",
                    "budget": {"per_layer": 1},
                    "base_model": "tiny-moe",
                    "alpha": {},
                    "shapley": {},
                }
            )
        )
    if eval_:
        before = {"nll/en": 2.123456, "nll/ru": 2.5, "ppl/en": 8.3612, "ppl/ru": 12.18249}
        before["arc_easy/acc"] = 0.41237
        after = {"nll/en": 2.13, "nll/ru": 3.987654, "ppl/en": 8.41, "ppl/ru": 53.9}
        after["arc_easy/acc"] = 0.40005
        delta = {k: after[k] - before[k] for k in before}
        (path / "eval.json").write_text(
            json.dumps({"before": before, "after": after, "delta": delta})
        )
    if edit:
        record = {"action": "remove_experts", "units": CHOSEN, "params_before": 1_000_000}
        record["params_after"] = 950_000
        (path / "edit.json").write_text(json.dumps({"records": [record]}))
    if recipe:
        (path / "recipe.yaml").write_text("model: tiny-moe\nplan:\n  action: remove\n")
    return path


@pytest.fixture(scope="module")
def full_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    run = _make_run(tmp_path_factory.mktemp("run"))
    report = write_report(run)
    return run, report.read_text()


def _table(text: str) -> dict[str, tuple[str, str, str]]:
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and "/" in cells[0] and re.fullmatch(r"[\w./-]+", cells[0]):
            rows[cells[0]] = (cells[1], cells[2], cells[3])
    return rows


def test_report_and_pngs_are_written_and_linked(full_run: tuple[Path, str]) -> None:
    run, text = full_run
    names = ["heatmap_experts.png", "ranking.png", "before_after.png", "convergence.png"]
    for name in names:
        data = (run / name).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 1000, name
        assert f"]({name})" in text, name
    linked = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert sorted(linked) == sorted(names)
    assert not list(run.glob("*.tmp")) and not list(run.glob(".*.tmp"))
    assert text.startswith("# MSA report: tiny-moe\n")
    for section in ("## Edit", "## Estimator convergence", "## Top units per target", "<details>"):
        assert section in text
    assert "1,000,000" in text and "950,000" in text and "-5.00%" in text


def test_report_numbers_equal_eval_json(full_run: tuple[Path, str]) -> None:
    run, text = full_run
    ev = json.loads((run / "eval.json").read_text())
    table = _table(text)
    assert set(table) == set(ev["before"])
    for metric, (before, after, delta) in table.items():
        assert float(before) == round(ev["before"][metric], 4)
        assert float(after) == round(ev["after"][metric], 4)
        assert float(delta) == round(ev["delta"][metric], 4)
        assert delta[0] in "+-"
    summary = text.split("\n## ", 1)[0]
    assert "`nll/ru` +1.4877 (2.5000 → 3.9877)" in summary  # target headline, same formatter
    assert "retained `nll/en` +0.0065" in summary


def test_chosen_units_appear(full_run: tuple[Path, str]) -> None:
    _, text = full_run
    for unit in CHOSEN:
        assert f"`{unit}`" in text
        assert f"**`{unit}`**" in text  # bold in the per-target tables
    assert "remove 2 of 8 units" in text


def test_the_estimator_and_its_surrogate_are_named(tmp_path: Path) -> None:
    run = _make_run(tmp_path, plan=False, eval_=False, edit=False, recipe=False)
    record = json.loads((run / "shapley.json").read_text())
    assert "with the `kernel` estimator: 192 coalitions" in write_report(run).read_text()
    record |= {"method": "adjusted", "surrogate": "within"}
    (run / "shapley.json").write_text(json.dumps(record))
    text = write_report(run).read_text()
    assert "with the `adjusted` estimator (surrogate `within`): 192 coalitions" in text


def test_missing_plan_and_eval_still_writes_report(tmp_path: Path) -> None:
    run = _make_run(tmp_path, plan=False, eval_=False, edit=False, recipe=False)
    text = write_report(run, title="bare").read_text()
    assert text.startswith("# bare\n")
    assert "Plan:" not in text and "| metric |" not in text and "## Edit" not in text
    assert "<details>" not in text and not (run / "before_after.png").exists()
    assert "mean |Shapley value|" in text
    assert (run / "ranking.png").read_bytes()[:8] == PNG_MAGIC


def test_missing_shapley_raises(tmp_path: Path) -> None:
    with pytest.raises(MsaEditError, match=r"shapley\.json"):
        write_report(tmp_path)


def test_report_is_deterministic(full_run: tuple[Path, str]) -> None:
    run, text = full_run
    assert write_report(run).read_bytes() == text.encode()


def test_short_trace_and_shape_data_json(tmp_path: Path) -> None:
    """Tensors in msa_edit's {"shape", "data"} form; a 1-point trace skips convergence."""
    run = _make_run(tmp_path, plan=False, eval_=False)
    obj = json.loads((run / "shapley.json").read_text())
    flat = [x for row in obj["stderr"] for x in row]
    obj["stderr"] = {"shape": [8, 3], "data": flat}
    obj["trace"] = obj["trace"][:1]
    (run / "shapley.json").write_text(json.dumps(obj))
    text = write_report(run).read_text()
    assert "## Estimator convergence" not in text and "∞" in text


def test_grid_puts_values_at_layer_and_index() -> None:
    units = [Unit(1, "heads", 2), Unit(0, "heads", 1), Unit(2, "experts", 0), Unit(1, "layer")]
    values = torch.tensor([[1.0, -1.0], [2.0, -2.0], [3.0, -3.0], [4.0, -4.0]])
    heads = unit_grid(values, units, "heads")
    assert heads.shape == (2, 2, 3)
    assert heads[0, 1, 2] == 1.0 and heads[1, 1, 2] == -1.0 and heads[0, 0, 1] == 2.0
    assert int(torch.isfinite(heads).sum()) == 4
    experts = unit_grid(values, units, "experts")
    assert experts.shape == (2, 3, 1) and experts[1, 2, 0] == -3.0
    layers = unit_grid(values, units, "layer")
    assert layers.shape == (2, 2, 1) and layers[0, 1, 0] == 4.0 and math.isnan(layers[0, 0, 0])
    neurons = [Unit(0, "neurons", 5), Unit(1, "neurons", 0)]
    grid = unit_grid(torch.tensor([7.0, 8.0]), neurons)
    assert grid.shape == (1, 2, 6) and grid[0, 0, 5] == 7.0 and grid[0, 1, 0] == 8.0
    with pytest.raises(MsaEditError, match="mixed"):
        unit_grid(values, units)
    with pytest.raises(MsaEditError):
        expert_grid(values, units)


def test_heatmap_of_mixed_kinds(tmp_path: Path) -> None:
    units = [Unit(0, "heads", 0), Unit(0, "heads", 1), Unit(1, "heads", 0), Unit(0, "experts", 0)]
    values = torch.tensor([[0.5], [-0.5], [math.nan], [1.0]])
    png = unit_heatmaps(values, units, ["en"], tmp_path / "h.png", kind="heads", marked=units[:1])
    assert png.read_bytes()[:8] == PNG_MAGIC


def test_mixed_kinds_run_writes_one_heatmap_per_kind(tmp_path: Path) -> None:
    run = _make_run(tmp_path, eval_=False, edit=False)
    obj = json.loads((run / "shapley.json").read_text())
    obj["units"] = [*UNITS[:4], "layers.0.heads.0", "layers.1.heads.1", "layers.0", "layers.1"]
    obj["trace"] = []
    (run / "shapley.json").write_text(json.dumps(obj))
    text = write_report(run).read_text()
    for name in ("heatmap_experts.png", "heatmap_heads.png", "heatmap_layers.png"):
        assert (run / name).read_bytes()[:8] == PNG_MAGIC and f"]({name})" in text
    assert "4 experts, 2 heads, 2 layers" in text


def test_eval_without_delta_computes_it(tmp_path: Path) -> None:
    run = _make_run(tmp_path, plan=False, edit=False, recipe=False)
    ev = json.loads((run / "eval.json").read_text())
    del ev["delta"]
    (run / "eval.json").write_text(json.dumps(ev))
    obj = json.loads((run / "shapley.json").read_text())
    (run / "shapley.json").write_text(json.dumps(obj | {"trace": []}))  # no convergence: faster
    text = write_report(run).read_text()
    assert "`nll/ru` +1.4877 (2.5000 → 3.9877)" in text
    assert _table(text)["nll/en"] == ("2.1235", "2.1300", "+0.0065")


def _edit_json(path: Path, change: Callable[[dict[str, Any]], object]) -> None:
    obj = json.loads(path.read_text())
    change(obj)
    path.write_text(json.dumps(obj))


def _rows_of(text: str, heading: str) -> list[list[str]]:
    """The cells of the first table after the line `heading`, header row first (split at
    unescaped pipes, so a pipe that a name slipped in shows as an extra cell)."""
    lines = text.splitlines()
    start = next(i for i in range(lines.index(heading), len(lines)) if lines[i].startswith("|"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    rows = lines[start:end]
    return [[c.strip() for c in re.split(r"(?<!\\)\|", row)[1:-1]] for row in rows[:1] + rows[2:]]


def test_nulls_everywhere_show_na(tmp_path: Path) -> None:
    """shapley.json writes non-finite numbers as null; every report path takes them."""
    run = _make_run(tmp_path)

    def shapley(obj: dict[str, Any]) -> None:
        obj["values"][0] = [None, None, None]  # layers.0.experts.0: n/a for every target
        obj["values"][7][1] = None
        obj["stderr"][0] = [None, None, None]
        obj["v_full"], obj["v_empty"] = [None, 2.5, None], [None, None, None]
        for point in obj["trace"]:
            point["values"][0] = [None, None, None]
            point["stderr"] = [[None] * 3 for _ in UNITS]  # no finite stderr: no log axis data
        obj["trace"] += [
            {"n_evaluations": None, "values": obj["values"], "stderr": obj["stderr"]},
            {"n_evaluations": 256, "values": None, "stderr": "unreadable"},
        ]

    def plan(obj: dict[str, Any]) -> None:
        obj["scores"][CHOSEN[0]] = None
        obj["search"] = {
            "chosen": "a",
            "n_evaluations": None,
            "candidates": [
                {"name": "a", "units": CHOSEN, "search": None, "check": None, "all": None,
                 "stderr": None, "per_set": {"ru": None}},
                {"name": "b", "units": [], "search": 0.1, "check": 0.2, "all": 0.3,
                 "stderr": 0.01, "per_set": {"ru": 0.4}},
            ],
        }  # fmt: skip

    def eval_(obj: dict[str, Any]) -> None:
        obj["before"].update({"ppl/en": None, "ppl/ru": 0.0, "nll/ru": None})
        obj["after"].update({"ppl/en": None, "ppl/ru": None, "arc_easy/acc": None})
        obj["delta"].update({"ppl/en": None, "ppl/ru": None, "nll/ru": None})
        obj["delta"]["arc_easy/acc"] = None
        obj["candidates"] = {"a": {"nll/ru": None, "nll/en": 2.2}, "b": {"nll/ru": 2.6}}

    _edit_json(run / "shapley.json", shapley)
    _edit_json(run / "plan.json", plan)
    _edit_json(run / "eval.json", eval_)
    text = write_report(run).read_text()
    for name in ("before_after.png", "convergence.png", "ranking.png", "candidates.png"):
        assert (run / name).read_bytes()[:8] == PNG_MAGIC, name
    table = _table(text)
    assert table["ppl/en"] == ("n/a", "n/a", "n/a")
    assert table["ppl/ru"] == ("0.0000", "n/a", "n/a")
    assert table["nll/ru"] == ("n/a", "3.9877", "n/a")
    assert table["arc_easy/acc"] == ("0.4124", "n/a", "n/a")
    assert _rows_of(text, "### en")[-1][1:] == ["`layers.0.experts.0`", "n/a", "∞"]  # last
    assert [r[1:] for r in _rows_of(text, "### ru")[-2:]] == [
        ["`layers.0.experts.0`", "n/a", "∞"],
        ["`layers.1.experts.3`", "n/a", "0.0270"],
    ]
    candidates = {row[0]: row for row in _rows_of(text, "## Candidates")}
    assert candidates["**a**"][2:6] == ["n/a", "n/a", "n/a ± n/a", "n/a"]
    assert "nan" not in text.lower().replace("nans/token", "")


def test_names_cannot_inject_markdown(tmp_path: Path) -> None:
    """Names from hand-made run files land in inline code: no heading, cell or HTML escapes."""
    evil = "x\n## injected"
    run = _make_run(tmp_path, recipe=False)
    targets = [evil, "a|b`c", "<script>alert(1)</script>"]
    _edit_json(run / "shapley.json", lambda o: o.update(targets=targets, model="m\n# injected"))

    def plan(obj: dict[str, Any]) -> None:
        obj.update(target=[evil], retain=["a|b`c"], mode="*specific*\n# injected")
        obj["search"] = {
            "chosen": evil,
            "candidates": [
                {"name": evil, "units": [], "search": 0.1, "check": 0.2, "all": 0.3,
                 "stderr": 0.01, "per_set": {evil: 0.5}},
                {"name": "d|e", "units": [], "search": 0.1, "check": 0.2, "all": 0.3,
                 "stderr": 0.01, "per_set": {"<b>": 0.5}},
            ],
        }  # fmt: skip

    def eval_(obj: dict[str, Any]) -> None:
        for key in ("before", "after", "delta"):
            obj[key].update({f"nll/{evil}": 1.0, "arc|easy/<i>acc</i>": 0.5})

    _edit_json(run / "plan.json", plan)
    _edit_json(run / "eval.json", eval_)
    _edit_json(run / "edit.json", lambda o: o["records"][0].update(action="a\n# injected"))
    text = write_report(run).read_text()
    for line in text.splitlines():
        assert not re.match(r" {0,3}#{1,6}\s+injected", line), line  # no heading of its own
        outside_code = re.sub(r"(`+).*?\1", "", line)
        assert not re.search(r"<(?!/?(details|summary)>)", outside_code), line  # no raw HTML
    assert "### `x\\n## injected`" in text and "# MSA report: `m\\n# injected`" in text
    for heading in ("## Candidates", "## Before and after the edit", "### `x\\n## injected`"):
        rows = _rows_of(text, heading)
        assert len(rows) > 2 and {len(r) for r in rows} == {len(rows[0])}, heading
    markdown_it = pytest.importorskip("markdown_it")  # rendered as GitHub would, where present
    html = markdown_it.MarkdownIt("commonmark").enable("table").render(text)
    headings = re.findall(r"<h\d>(.*?)</h\d>", html)
    assert not [h for h in headings if "injected" in re.sub(r"<code>.*?</code>", "", h)]
    assert "<script>" not in html and "<i>" not in html and "<b>" not in html
    assert "<h3><code>x\\n## injected</code></h3>" in html


def _set(file: str, **fields: Any) -> Callable[[Path], None]:
    return lambda run: _edit_json(run / file, lambda o: o.update(fields))


HAND_EDITED: dict[str, Callable[[Path], None]] = {
    "no units": _set("shapley.json", units=[], values=[], stderr=[], trace=[]),
    "plan with no units or scores": _set("plan.json", units=[], scores={}, stderr={}),
    "bare shapley": lambda run: (run / "shapley.json").write_text(
        json.dumps({"units": UNITS, "values": _values(1.0)})
    ),
    "odd shapley fields": _set("shapley.json", targets="ru", stderr="x", trace={}, budget=None),
    "odd plan fields": _set(
        "plan.json", target="ru", retain=None, units=["layers.0.experts.0", "bad"], search=[1]
    ),
    "odd scores": _set("plan.json", scores={"x": "high", UNITS[0]: 1e6}, stderr=[]),
    "empty eval": lambda run: (run / "eval.json").write_text("{}"),
    "odd eval": _set("eval.json", before=[1, 2], after={"nll/en": "2.1", "ppl/en": -1.0}),
    "non-finite eval": lambda run: (run / "eval.json").write_text(
        '{"before": {"ppl/en": Infinity, "nll/en": NaN}, "after": {"ppl/en": -Infinity}}'
    ),
    "edit list": lambda run: (run / "edit.json").write_text('[{"action": null}, 3]'),
    "sparse candidates": _set(
        "plan.json", search={"candidates": [{"name": "a"}, {}, 5], "chosen": None}
    ),
    "binary recipe": lambda run: (run / "recipe.yaml").write_bytes(b"model: \xff\xfe\n"),
}


@pytest.mark.parametrize("change", HAND_EDITED.values(), ids=HAND_EDITED.keys())
def test_hand_edited_run_files_degrade_gracefully(
    tmp_path: Path, change: Callable[[Path], None]
) -> None:
    run = _make_run(tmp_path)
    _edit_json(run / "shapley.json", lambda o: o.update(trace=o["trace"][:2]))  # faster
    change(run)
    text = write_report(run).read_text()
    assert text.startswith("# ") and "Traceback" not in text


def test_wrong_top_level_json_is_a_clear_error(tmp_path: Path) -> None:
    run = _make_run(tmp_path)
    (run / "plan.json").write_text("[]")
    with pytest.raises(MsaEditError, match=r"plan\.json should hold an object"):
        write_report(run)
    (run / "plan.json").unlink()
    (run / "shapley.json").write_text('{"units": ["x\\n## injected"], "values": [[1.0]]}')
    with pytest.raises(MsaEditError, match="malformed unit name"):
        write_report(run)


def test_heatmap_of_64_units_has_a_capped_aspect(tmp_path: Path) -> None:
    """64 experts in one layer x 3 targets: a units x targets list in blocks, not 3 flat strips."""
    from PIL import Image

    from msa_edit.evaluate.plots import MAX_ASPECT, heatmap_layout

    units = [Unit(0, "experts", e) for e in range(64)]
    values = torch.linspace(-1, 1, 64 * 3).reshape(64, 3)
    png = unit_heatmaps(values, units, TARGETS, tmp_path / "h.png", marked=units[3:5])
    width, height = Image.open(png).size
    assert 1 / MAX_ASPECT <= width / height <= MAX_ASPECT
    assert max(width, height) <= 1400
    layout = heatmap_layout(1, 64, 3, 64)
    assert layout.mode == "list" and layout.fold * layout.chunk >= 64
    for shape in [
        (1, 8, 3, 8),
        (2, 64, 3, 128),
        (4, 64, 3, 256),
        (2, 2048, 3, 4096),
        (32, 1, 3, 32),
    ]:
        assert 1 / MAX_ASPECT <= heatmap_layout(*shape).aspect <= MAX_ASPECT, shape


def test_delta_plot_bars_are_after_minus_before(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from msa_edit.evaluate import plots

    seen: dict[str, Any] = {}
    real = plots.delta_plot

    def spy(panels: Any, deltas: Any, path: Any, *, highlight: Any = ()) -> Path:
        seen.update(panels=panels, deltas=deltas, highlight=highlight)
        return real(panels, deltas, path, highlight=highlight)

    monkeypatch.setattr(plots, "delta_plot", spy)
    run = _make_run(tmp_path, edit=False, recipe=False)
    write_report(run)
    ev = json.loads((run / "eval.json").read_text())
    metrics = [m for _, ms in seen["panels"] for m in ms]
    bars = plots.delta_bars(metrics, seen["deltas"])
    for metric, height, colour in bars:
        assert height == pytest.approx(ev["after"][metric] - ev["before"][metric], abs=1e-12)
        assert colour == ("tab:red" if height > 0 else "tab:blue")
    assert seen["highlight"] == {"nll/ru", "ppl/ru"}  # the plan's target
    assert "red = it rose, blue = it fell" in (run / "report.md").read_text()


def test_two_point_trace_draws_points_not_lines(tmp_path: Path) -> None:
    run = _make_run(tmp_path, plan=False, eval_=False, edit=False, recipe=False)
    _edit_json(run / "shapley.json", lambda o: o.update(trace=o["trace"][:2]))
    text = write_report(run).read_text()
    assert "Only 2 checkpoints were recorded" in text
    assert (run / "convergence.png").read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize("stored", [True, False, None])
def test_the_stored_sign_decides_how_values_read(tmp_path: Path, stored: bool | None) -> None:
    """shapley.json stores `lower_is_better`; the objective's name is a guess for older files
    (here a score whose name contains "nll")."""
    run = _make_run(tmp_path / "run", plan=False, eval_=False, edit=False)

    def sign(obj: dict[str, Any]) -> None:
        obj["objective"] = "nll_reduction_score"
        if stored is not None:
            obj["lower_is_better"] = stored

    _edit_json(run / "shapley.json", sign)
    text = write_report(run).read_text()
    loss = stored is not False
    assert ("Δ mean NLL (nats)" in text or "negative = the unit lowers the loss" in text) == loss
    assert ("positive = the unit raises the objective" in text) == (not loss)
