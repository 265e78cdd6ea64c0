"""report.md and its PNGs from synthetic run directories (no model needed)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

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
