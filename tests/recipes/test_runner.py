"""`msa-edit run` and the stage commands on a real tiny Mixtral: every run-directory file, checked
against independent computations (efficiency, lesion == exported edit, eval == fresh evaluation)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from tiny_models import LANGS, UD_TEXT
from transformers import AutoModelForCausalLM, AutoTokenizer

from msa_edit.cli import main
from msa_edit.evaluate.language import block_nll, language_nll
from msa_edit.lesions import lesioned
from msa_edit.plan import Plan
from msa_edit.texts import text_blocks
from msa_edit.units import Unit

N_SEQ, SEQ_LEN = 2, 16
REPO = Path(__file__).resolve().parents[2]


def recipe(model: Path, **stages: Any) -> dict[str, Any]:
    """A recipe over all 8 experts, exact Shapley values on en/ru/zh, remove ru's experts."""
    sets = {lang: {"path": str(UD_TEXT / f"{lang}.txt"), "n_seq": N_SEQ, "seq_len": SEQ_LEN}
            for lang in LANGS}  # fmt: skip
    base = {
        "model": {"path": str(model)},
        "units": "layers.*.experts.*",
        "targets": {"sets": sets},
        "estimator": {"method": "exact"},
        "plan": {"target": ["ru"], "per_layer": 1},
        "evaluate": {"n_seq": N_SEQ, "seq_len": SEQ_LEN},
    }
    return base | stages


def write(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def report_table(report: str) -> dict[str, tuple[float, float, float]]:
    rows = re.findall(r"^\| (\S+/\S+) \| (\S+) \| (\S+) \| (\S+) \|$", report, re.M)
    return {m: (float(b), float(a), float(d)) for m, b, a, d in rows}


@pytest.fixture(scope="module")
def run_dir(tiny_mixtral: Path, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("run")
    path = write(root / "recipe.yaml", recipe(tiny_mixtral))
    assert main(["run", str(path), "--out", str(root / "out")]) == 0
    return root / "out"


def test_run_writes_every_file(run_dir: Path) -> None:
    names = {"shapley.json", "plan.json", "eval.json", "edit.json", "recipe.yaml", "report.md"}
    assert names <= {p.name for p in run_dir.iterdir()}
    assert (run_dir / "model" / "config.json").is_file()
    report = (run_dir / "report.md").read_text()
    for png in re.findall(r"\]\((\S+\.png)\)", report):
        assert (run_dir / png).read_bytes()[:4] == b"\x89PNG"
    assert not [p for p in run_dir.rglob("*") if ".tmp" in p.name]


def test_shapley_json_contract_and_efficiency(run_dir: Path, tiny_mixtral: Path) -> None:
    record = json.loads((run_dir / "shapley.json").read_text())
    assert record["units"] == [f"layers.{la}.experts.{e}" for la in range(2) for e in range(4)]
    assert record["targets"] == list(LANGS) and record["method"] == "exact"
    assert record["n_evaluations"] == 256 and record["seed"] == 0
    assert record["lower_is_better"] is True and record["objective"] == "mean_nll"
    values = torch.tensor(record["values"], dtype=torch.float64)
    assert values.shape == (8, 3) and torch.tensor(record["stderr"]).abs().max() == 0
    model = AutoModelForCausalLM.from_pretrained(tiny_mixtral)
    tokenizer = AutoTokenizer.from_pretrained(tiny_mixtral)
    for t, lang in enumerate(LANGS):  # v(N): the intact model's mean NLL, computed independently
        ids = text_blocks(tokenizer, UD_TEXT / f"{lang}.txt", N_SEQ, SEQ_LEN)
        full = float(block_nll(model, ids).sum()) / (N_SEQ * (SEQ_LEN - 1))
        assert record["v_full"][t] == pytest.approx(full, abs=1e-5)
        efficiency = record["v_full"][t] - record["v_empty"][t]
        assert float(values[:, t].sum()) == pytest.approx(efficiency, abs=1e-9)


def test_exported_model_equals_the_lesion(run_dir: Path, tiny_mixtral: Path) -> None:
    plan = Plan.load(run_dir / "plan.json")
    edit = json.loads((run_dir / "edit.json").read_text())
    assert plan.units and edit["records"][0]["matches"] == "reroute"
    base = AutoModelForCausalLM.from_pretrained(tiny_mixtral)
    edited = AutoModelForCausalLM.from_pretrained(run_dir / "model")
    assert edited.config.num_local_experts == 4 - len(plan.units) // 2
    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    with lesioned(base, plan.unit_list, "reroute"):
        expected = base(ids).logits
    torch.testing.assert_close(edited(ids).logits, expected, atol=1e-5, rtol=1e-5)


def test_eval_json_and_report_match_fresh_evaluations(run_dir: Path, tiny_mixtral: Path) -> None:
    record = json.loads((run_dir / "eval.json").read_text())
    texts = {lang: UD_TEXT / f"{lang}.txt" for lang in LANGS}
    for side, folder in (("before", tiny_mixtral), ("after", run_dir / "model")):
        model = AutoModelForCausalLM.from_pretrained(folder)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        fresh = language_nll(model, tokenizer, texts, n_seq=N_SEQ, seq_len=SEQ_LEN)
        assert record[side] == pytest.approx(fresh, rel=1e-6)
    assert record["after"]["nll/ru"] > record["before"]["nll/ru"]
    table = report_table((run_dir / "report.md").read_text())
    assert set(table) == set(record["before"])
    for metric, (before, after, delta) in table.items():
        assert before == round(record["before"][metric], 4)
        assert after == round(record["after"][metric], 4)
        assert delta == round(record["delta"][metric], 4)


def test_stage_commands_with_a_hand_edited_plan(tiny_mixtral: Path, tmp_path: Path) -> None:
    path = write(tmp_path / "r.yaml", recipe(tiny_mixtral))
    out = tmp_path / "out"
    assert main(["plan", str(path), "--out", str(out)]) == 2  # no run directory yet
    assert main(["analyze", str(path), "--out", str(out)]) == 0
    assert main(["plan", str(path), "--out", str(out)]) == 0
    plan = json.loads((out / "plan.json").read_text())
    plan["units"] = ["layers.0.experts.3", "layers.1.experts.3"]  # by hand
    (out / "plan.json").write_text(json.dumps(plan))
    for stage in ("edit", "evaluate", "export"):
        assert main([stage, str(path), "--out", str(out)]) == 0, stage
    edited = AutoModelForCausalLM.from_pretrained(out / "model")
    base = AutoModelForCausalLM.from_pretrained(tiny_mixtral)
    ids = torch.arange(20).reshape(2, 10)
    with lesioned(base, [Unit(0, "experts", 3), Unit(1, "experts", 3)], "reroute"):
        torch.testing.assert_close(edited(ids).logits, base(ids).logits, atol=1e-5, rtol=1e-5)
    card = (out / "model" / "README.md").read_text()
    assert "layers.1.experts.3" in card and "nll/ru" in card
    assert "layers.1.experts.3" in (out / "report.md").read_text()


def test_mixtral_language_recipe_runs_unchanged_in_4bit(
    tiny_mixtral: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("bitsandbytes")
    from msa_edit.recipes import runner

    loads: list[int | None] = []
    real_load = runner._load

    def recording(folder, stage, bits, name):
        loads.append(bits)
        return real_load(folder, stage, bits, name)

    monkeypatch.setattr(runner, "_load", recording)
    overrides = [
        f"model.path={tiny_mixtral}",
        "model.dtype=float32",  # bfloat16 matmuls are not supported by this CPU
        "estimator.budget=40",
        "plan.min_z=null",
        "evaluate.lm_eval_tasks=[]",  # belebele comes from the Hub
        *[f"targets.sets.{lang}.n_seq=2" for lang in ("en", "de", "fr", "es")],
        "evaluate.n_seq=4",
    ]
    args = ["run", str(REPO / "recipes" / "mixtral_remove_language.yaml"), "--out", str(tmp_path)]
    assert main(args + [a for o in overrides for a in ("--set", o)]) == 0
    record = json.loads((tmp_path / "eval.json").read_text())
    assert set(record["after"]) == {f"{m}/{lang}" for m in ("nll", "ppl", "bpb")
                                    for lang in ("en", "de", "fr", "es")}  # fmt: skip
    plan = Plan.load(tmp_path / "plan.json")
    assert plan.target == ["fr"] and plan.retain == ["en", "de", "es"] and plan.units
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    assert reloaded.config.num_local_experts < 4 or "zero" in (tmp_path / "edit.json").read_text()
    assert loads and set(loads) == {4}  # the edit streamed the shards: no full-precision load
    assert "streamed from" in (tmp_path / "edit.json").read_text()


def test_mixtral_compress_recipe_runs_unchanged(tiny_mixtral: Path, tmp_path: Path) -> None:
    pytest.importorskip("bitsandbytes")
    calibration = UD_TEXT / "en.txt"
    overrides = [
        f"model.path={tiny_mixtral}",
        "model.dtype=float32",
        f"targets.sets.calibration.path={calibration}",  # pile-10k comes from the Hub
        "targets.sets.calibration.n_seq=4",
        "targets.sets.calibration.seq_len=32",
        "evaluate.lm_eval_tasks=[]",
        "evaluate.n_seq=4",
    ]
    args = ["run", str(REPO / "recipes" / "mixtral_compress.yaml"), "--out", str(tmp_path)]
    assert main(args + [a for o in overrides for a in ("--set", o)]) == 0
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    assert reloaded.config.num_local_experts == 2  # 2 of 4 removed per layer, top-2 kept
    plan = Plan.load(tmp_path / "plan.json")
    assert plan.method == "search" and plan.search["n_evaluations"] <= 454


def test_killed_run_resumes_from_the_checkpoint(tiny_mixtral: Path, tmp_path: Path) -> None:
    data = recipe(
        tiny_mixtral,
        estimator={"method": "exact", "batch_size": 4, "checkpoint_every": 0},
        plan={"mode": "least_useful", "target": ["ru"], "per_layer": 1},
    )
    for spec in data["targets"]["sets"].values():
        spec.update(n_seq=4, seq_len=32)
    path = write(tmp_path / "r.yaml", data)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "msa_edit.cli", "run", str(path), "--out", str(out)]
    first = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = out / "shapley.ckpt"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not checkpoint.exists():
        assert first.poll() is None, "the run finished before it could be killed"
        time.sleep(0.01)
    first.kill()  # SIGKILL during the analysis: no cleanup runs
    first.wait()
    stored = len(torch.load(checkpoint, weights_only=True)["keys"])
    assert 0 < stored < 256 and not (out / "shapley.json").exists()

    second = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr
    now, resumed = map(int, re.search(r"\((\d+) evaluated now, (\d+) from", second.stdout).groups())
    assert resumed == stored and now == 256 - stored

    clean = tmp_path / "clean"
    assert main(["run", str(path), "--out", str(clean)]) == 0
    for name in ("shapley.json", "plan.json", "eval.json"):
        assert (out / name).read_text() == (clean / name).read_text(), name


def test_run_with_healing_and_an_lm_eval_task(tiny_mixtral: Path, tmp_path: Path) -> None:
    pytest.importorskip("lm_eval")
    pytest.importorskip("peft")
    tasks = REPO / "tests" / "data" / "lm_eval_tasks"
    config = yaml.safe_load((tasks / "next_word.yaml").read_text())
    config["dataset_kwargs"] |= {"data_files": {"test": str(tasks / "next_word.jsonl")},
                                 "cache_dir": str(tmp_path / "hf")}  # fmt: skip
    (tmp_path / "tasks").mkdir()
    write(tmp_path / "tasks" / "next_word.yaml", config)
    data = recipe(
        tiny_mixtral,
        edit={"heal": {"steps": 3, "lr": 1e-2}},
        evaluate={"n_seq": N_SEQ, "seq_len": SEQ_LEN, "lm_eval_tasks": ["next_word"],
                  "lm_eval_include": str(tmp_path / "tasks")},
    )  # fmt: skip
    out = tmp_path / "out"
    assert main(["run", str(write(tmp_path / "r.yaml", data)), "--out", str(out)]) == 0
    record = json.loads((out / "eval.json").read_text())
    assert {"next_word/acc", "next_word/acc_norm"} <= set(record["after"])
    assert 0 <= record["after"]["next_word/acc"] <= 1
    healed = json.loads((out / "edit.json").read_text())["healed"]
    assert healed["steps"] == 3 and healed["rows"] == 2 * N_SEQ  # en and zh rows, not ru
    reloaded = AutoModelForCausalLM.from_pretrained(out / "model")
    tokenizer = AutoTokenizer.from_pretrained(out / "model")
    texts = {lang: UD_TEXT / f"{lang}.txt" for lang in LANGS}
    fresh = language_nll(reloaded, tokenizer, texts, n_seq=N_SEQ, seq_len=SEQ_LEN)
    assert {k: record["after"][k] for k in fresh} == pytest.approx(fresh, rel=1e-6)
    assert "next_word/acc" in report_table((out / "report.md").read_text())


def test_analysis_only_recipe_and_a_changed_game(
    tiny_mixtral: Path, tmp_path: Path, capsys
) -> None:
    data = recipe(tiny_mixtral)
    del data["plan"]
    out = tmp_path / "out"
    assert main(["run", str(write(tmp_path / "r.yaml", data)), "--out", str(out)]) == 0
    names = {p.name for p in out.iterdir()}
    assert {"shapley.json", "report.md"} <= names and not {"plan.json", "eval.json"} & names
    capsys.readouterr()
    saved = (out / "recipe.yaml").read_text()
    data["targets"]["sets"]["en"]["n_seq"] = 3  # another game: the stored coalitions do not apply
    assert main(["analyze", str(write(tmp_path / "r.yaml", data)), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "differs from the run directory's" in err[0]
    assert "targets.sets.en.n_seq" in err[0]
    assert (out / "recipe.yaml").read_text() == saved


def test_rows_per_set_samples_the_analysis_rows_only(tiny_mixtral: Path, tmp_path: Path) -> None:
    """`estimator.rows_per_set` reaches the analysis game (values equal a direct `estimate` on
    `LesionGame(rows_per_set=1, row_seed=seed)`, and differ from the full-row run's)."""
    from msa_edit.games import LesionGame, MeanNLL
    from msa_edit.recipes.runner import RecipeGame, load_targets
    from msa_edit.recipes.schema import as_recipe
    from msa_edit.shapley import estimate
    from msa_edit.units import select

    estimator = {"method": "auto", "budget": 60, "seed": 3}
    data = recipe(tiny_mixtral, estimator=estimator | {"rows_per_set": 1})
    out = tmp_path / "out"
    assert main(["run", str(write(tmp_path / "r.yaml", data)), "--out", str(out)]) == 0
    record = json.loads((out / "shapley.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(tiny_mixtral).eval()
    targets = load_targets(as_recipe(data), AutoTokenizer.from_pretrained(tiny_mixtral))
    units = select(model, ["layers.*.experts.*"])
    groups = [u.layer for u in units]

    def values(**rows: int) -> torch.Tensor:
        game = LesionGame(model, units, targets, MeanNLL(), "reroute", **rows)
        return estimate(game, len(units), "auto", 60, seed=3, progress=False,
                        groups=groups).values  # fmt: skip

    got = torch.tensor(record["values"], dtype=torch.float64)
    assert record["method"] == "adjusted"
    assert torch.allclose(got, values(rows_per_set=1, row_seed=3), atol=1e-6)
    assert not torch.allclose(got, values(), atol=1e-4)
    assert RecipeGame(as_recipe(data), str(tiny_mixtral)).exact_ends == 1  # Ray reads it unbuilt
