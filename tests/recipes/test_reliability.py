"""A run directory that cannot be silently wrong, shared, half-moved or hung: stale and foreign
checkpoints, corrupt plans, concurrent runs, a kill between export's steps, planted symlinks and
the failures that used to be tracebacks, each through `msa-edit` on a tiny Mixtral."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from tiny_models import UD_TEXT
from transformers import AutoModelForCausalLM

import msa_edit.atomic as atomic
from msa_edit.cli import main
from msa_edit.rundir import LOCK, locked, stale_paths

pytestmark = pytest.mark.filterwarnings("ignore")
PROGRESS = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ")


def small_recipe(model: Path, texts: Path | None = None, **stages: Any) -> dict[str, Any]:
    """Shapley values of all 8 experts on en/ru from 26 coalitions; remove the least useful
    expert of each layer."""
    folder = texts or UD_TEXT
    sets = {lang: {"path": str(folder / f"{lang}.txt"), "n_seq": 2, "seq_len": 16}
            for lang in ("en", "ru")}  # fmt: skip
    base = {
        "model": {"path": str(model)},
        "units": "layers.*.experts.*",
        "targets": {"sets": sets},
        "estimator": {"budget": 26, "checkpoint_every": 0},
        "plan": {"mode": "least_useful", "target": ["ru"], "per_layer": 1},
        "evaluate": {"n_seq": 2, "seq_len": 16},
    }
    return base | stages


def write(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def one_error(capsys: pytest.CaptureFixture[str]) -> str:
    """The one error line (timestamped progress lines of work done before it aside)."""
    err = [e for e in capsys.readouterr().err.strip().splitlines() if not PROGRESS.match(e)]
    assert len(err) == 1, err
    assert err[0].startswith("msa-edit: error: ")
    return err[0]


def snapshot(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


@pytest.fixture
def model_copy(tiny_mixtral: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny Mixtral that a test may replace in place."""
    return Path(shutil.copytree(tiny_mixtral, tmp_path / "model"))


@pytest.fixture
def texts(tmp_path: Path) -> Path:
    """Private copies of the en/ru/zh texts that a test may edit in place."""
    folder = tmp_path / "texts"
    folder.mkdir()
    for lang in ("en", "ru", "zh"):
        shutil.copy(UD_TEXT / f"{lang}.txt", folder / f"{lang}.txt")
    return folder


def analyzed(model: Path, texts: Path, tmp_path: Path, **stages: Any) -> tuple[Path, Path]:
    tmp_path.mkdir(exist_ok=True)
    recipe = write(tmp_path / "r.yaml", small_recipe(model, texts, **stages))
    out = tmp_path / "out"
    assert main(["analyze", str(recipe), "--out", str(out)]) == 0
    return recipe, out


# --------------------------------------------------------------------------- stale checkpoints


def test_a_replaced_model_at_the_same_path_is_refused(
    model_copy: Path, texts: Path, tmp_path: Path, capsys
) -> None:
    recipe, out = analyzed(model_copy, texts, tmp_path)
    model = AutoModelForCausalLM.from_pretrained(model_copy)
    with torch.no_grad():
        model.model.layers[1].mlp.experts.down_proj.mul_(1.5)  # another model, same path
    model.save_pretrained(model_copy)
    before = snapshot(out)
    capsys.readouterr()
    assert main(["analyze", str(recipe), "--out", str(out)]) == 2
    err = one_error(capsys)
    assert "was made for another game (changed: model/model.safetensors)" in err
    assert "start fresh" in err and snapshot(out) == before


def test_a_target_text_edited_in_place_is_refused(
    tiny_mixtral: Path, texts: Path, tmp_path: Path, capsys
) -> None:
    recipe, out = analyzed(tiny_mixtral, texts, tmp_path)
    lines = (texts / "ru.txt").read_text(encoding="utf-8").splitlines()
    (texts / "ru.txt").write_text("\n".join(lines[1:]) + "\n", encoding="utf-8")
    capsys.readouterr()
    assert main(["analyze", str(recipe), "--out", str(out)]) == 2
    assert "(changed: targets.ru.text)" in one_error(capsys)


def test_a_setting_that_changes_the_bits_is_refused(
    tiny_mixtral: Path, texts: Path, tmp_path: Path, capsys
) -> None:
    recipe, out = analyzed(tiny_mixtral, texts, tmp_path)
    capsys.readouterr()
    args = ["analyze", str(recipe), "--out", str(out), "--set", "estimator.rows_per_forward=1"]
    assert main(args) == 2
    assert "(changed: setting.rows_per_forward)" in one_error(capsys)


@pytest.mark.parametrize(
    ("other", "changed"),
    [
        ({"lesion": {"kind": "zero"}}, "setting.lesion.kind"),
        ({"zh": True}, "targets, targets.zh.n_seq"),  # one more value column per coalition
    ],
    ids=["another lesion", "an extra target column"],
)
def test_a_foreign_checkpoint_is_refused(
    other: dict[str, Any], changed: str, tiny_mixtral: Path, texts: Path, tmp_path: Path, capsys
) -> None:
    stages = {k: v for k, v in other.items() if k != "zh"}
    if other.get("zh"):
        data = small_recipe(tiny_mixtral, texts)
        data["targets"]["sets"]["zh"] = {"path": str(texts / "zh.txt"), "n_seq": 2, "seq_len": 16}
        stages["targets"] = data["targets"]
    _, foreign = analyzed(tiny_mixtral, texts, tmp_path / "a", **stages)
    recipe, out = analyzed(tiny_mixtral, texts, tmp_path)
    shutil.copy(foreign / "shapley.ckpt", out / "shapley.ckpt")  # same players, another game
    capsys.readouterr()
    assert main(["analyze", str(recipe), "--out", str(out)]) == 2
    assert f"(changed: {changed}" in one_error(capsys)


def test_an_unchanged_game_resumes_and_an_old_key_file_is_ignored(
    tiny_mixtral: Path, texts: Path, tmp_path: Path, capsys
) -> None:
    recipe, out = analyzed(tiny_mixtral, texts, tmp_path)
    values = json.loads((out / "shapley.json").read_text())["values"]
    (out / "shapley.game.json").write_text("{corrupt")  # left by an older version: not read
    capsys.readouterr()
    assert main(["analyze", str(recipe), "--out", str(out)]) == 0
    assert "(0 evaluated now, 26 from the checkpoint)" in capsys.readouterr().out
    assert json.loads((out / "shapley.json").read_text())["values"] == values
    assert not (out / "shapley.game.json").exists()


def test_an_unreadable_checkpoint_fails_before_anything_is_written(
    tiny_mixtral: Path, texts: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "shapley.ckpt").write_bytes(b"not a checkpoint")
    recipe = write(tmp_path / "r.yaml", small_recipe(tiny_mixtral, texts))
    assert main(["run", str(recipe), "--out", str(out)]) == 2
    assert "is not a readable msa_edit checkpoint" in one_error(capsys)
    assert sorted(p.name for p in out.iterdir()) == ["shapley.ckpt"]


# --------------------------------------------------------------------------- plans


@pytest.fixture(scope="module")
def planned(tiny_mixtral: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory analysed and planned (no edit yet)."""
    root = tmp_path_factory.mktemp("planned")
    recipe = write(root / "r.yaml", small_recipe(tiny_mixtral))
    for stage in ("analyze", "plan"):
        assert main([stage, str(recipe), "--out", str(root / "out")]) == 0
    return root


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda p: p | {"action": "scale", "alpha": {p["units"][0]: float("nan")}}, "NaN"),
        (lambda p: p | {"action": "scale", "alpha": {p["units"][0]: 1e308}}, "1000"),
        (lambda p: p | {"units": p["units"] * 2}, "twice"),
        (lambda p: p | {"units": None}, "units"),
    ],
    ids=["nan alpha", "huge alpha", "duplicate units", "null units"],
)
def test_a_hand_edited_plan_is_refused_before_the_edit(
    edit: Any, expected: str, planned: Path, tmp_path: Path, capsys
) -> None:
    out = Path(shutil.copytree(planned / "out", tmp_path / "out"))
    plan = json.loads((out / "plan.json").read_text())
    (out / "plan.json").write_text(json.dumps(edit(plan)))  # json.dumps writes NaN literally
    capsys.readouterr()
    assert main(["edit", str(planned / "r.yaml"), "--out", str(out)]) == 2
    assert expected in one_error(capsys)
    assert not (out / "model").exists() and not stale_paths(out)


def test_another_models_recipe_is_refused(
    planned: Path, tiny_mixtral: Path, tmp_path: Path, capsys
) -> None:
    other = Path(shutil.copytree(tiny_mixtral, tmp_path / "other"))
    recipe = write(tmp_path / "other.yaml", small_recipe(other))
    out = Path(shutil.copytree(planned / "out", tmp_path / "out"))
    capsys.readouterr()
    assert main(["edit", str(recipe), "--out", str(out)]) == 2
    err = one_error(capsys)
    assert "differs from the run directory's" in err and "in model.path" in err
    (out / "recipe.yaml").unlink()  # without the saved recipe, plan.json's base model decides
    assert main(["edit", str(recipe), "--out", str(out)]) == 2
    assert f"was made for base model '{tiny_mixtral}'" in one_error(capsys)
    assert not (out / "model").exists()


# --------------------------------------------------------------------------- the run directory


def hold_lock(out: Path) -> subprocess.Popen[str]:
    """Another process holding the run directory's lock until killed."""
    code = (
        "import sys, time\nfrom msa_edit.rundir import locked\n"
        f"with locked({str(out)!r}):\n    print('held', flush=True)\n    time.sleep(600)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_run_on_a_held_directory_is_refused_then_runs_after_a_kill(
    tiny_mixtral: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "out"
    recipe = write(tmp_path / "r.yaml", small_recipe(tiny_mixtral))
    holder = hold_lock(out)
    try:
        assert main(["run", str(recipe), "--out", str(out)]) == 2
        err = one_error(capsys)
        assert f"is in use by process {holder.pid} on " in err and "another --out" in err
        assert sorted(p.name for p in out.iterdir()) == [LOCK]
    finally:
        holder.kill()  # kill -9: no cleanup runs, the kernel drops the lock
        holder.wait()
    assert main(["run", str(recipe), "--out", str(out)]) == 0
    assert (out / "model" / "config.json").is_file() and not (out / LOCK).exists()


def test_two_concurrent_runs_never_mix(tiny_mixtral: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    recipe = write(tmp_path / "r.yaml", small_recipe(tiny_mixtral))
    command = [sys.executable, "-m", "msa_edit.cli", "run", str(recipe), "--out", str(out)]
    runs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]  # fmt: skip
    results = [(r.wait(timeout=600), r.stderr.read()) for r in runs if r.stderr]
    codes = sorted(code for code, _ in results)
    if codes == [0, 0]:  # the first finished before the second started: both whole runs
        return
    assert codes == [0, 2], results
    err = next(e for code, e in results if code == 2).strip().splitlines()
    assert len(err) == 1 and "is in use by " in err[0]  # its pid, once the holder wrote it
    assert (out / "model" / "config.json").is_file() and not stale_paths(out)


def test_out_that_is_a_file(tiny_mixtral: Path, tmp_path: Path, capsys) -> None:
    (tmp_path / "out").write_text("mine")
    recipe = write(tmp_path / "r.yaml", small_recipe(tiny_mixtral))
    assert main(["run", str(recipe), "--out", str(tmp_path / "out")]) == 2
    assert "is a file; give a directory path" in one_error(capsys)
    assert (tmp_path / "out").read_text() == "mine"


def test_a_planted_symlink_at_a_temp_name_is_never_written_through(
    planned: Path, tmp_path: Path
) -> None:
    out = Path(shutil.copytree(planned / "out", tmp_path / "out"))
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    for name in ("shapley.ckpt.tmp", ".plan.json.tmp", ".shapley.json.tmp"):
        (out / name).symlink_to(victim)
    assert main(["run", str(planned / "r.yaml"), "--out", str(out)]) == 0
    assert victim.read_text() == "precious"


def test_a_kill_between_exports_steps_never_loses_model(
    planned: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = Path(shutil.copytree(planned / "out", tmp_path / "out"))
    recipe = str(planned / "r.yaml")
    assert main(["edit", recipe, "--out", str(out)]) == 0
    first = (out / "model" / "README.md").read_text()

    def killed(path: Any, *args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt  # dies right after the new model/ is swapped in

    monkeypatch.setattr(atomic.shutil, "rmtree", killed)
    (out / "eval.json").write_text(json.dumps({"before": {"nll/en": 1.0}, "after": {}}))
    with pytest.raises(KeyboardInterrupt):
        main(["edit", recipe, "--out", str(out)])
    monkeypatch.undo()
    assert (out / "model" / "config.json").is_file()
    assert [p.name.startswith(".model.tmp-") for p in stale_paths(out)] == [True]
    assert (out / "model" / "README.md").read_text() == first  # same plan, same card
    with locked(out):  # the next stage starts by removing what the kill left
        assert not stale_paths(out)


def test_a_set_aside_model_is_put_back(planned: Path, tmp_path: Path) -> None:
    """Where no atomic swap exists, a kill between the two renames leaves `.model.old-*`."""
    out = Path(shutil.copytree(planned / "out", tmp_path / "out"))
    (out / ".model.old-1234").mkdir()
    (out / ".model.old-1234" / "config.json").write_text("{}")
    (out / ".shapley.json.abc.tmp").write_text("half")
    with locked(out):
        assert (out / "model" / "config.json").read_text() == "{}"
        assert not stale_paths(out)


def test_the_fallback_replacement_keeps_model(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    out = tmp_path / "model"
    for version in ("one", "two"):
        with atomic.staged_dir(out) as tmp:
            (tmp / "v.txt").write_text(version)
    assert (out / "v.txt").read_text() == "two" and sorted(os.listdir(tmp_path)) == ["model"]


# --------------------------------------------------------------------------- tracebacks


def test_disk_full_is_one_line(
    tiny_mixtral: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    def full(*args: Any, **kwargs: Any) -> None:
        raise OSError(28, "No space left on device", str(tmp_path / "out" / "shapley.json"))

    monkeypatch.setattr("msa_edit.recipes.runner.write_json", full)
    recipe = write(tmp_path / "r.yaml", small_recipe(tiny_mixtral))
    assert main(["run", str(recipe), "--out", str(tmp_path / "out")]) == 2
    err = one_error(capsys)
    assert "No space left on device" in err and "free space or choose another --out" in err


def test_model_code_runs_only_with_trust_remote_code(
    tiny_mixtral: Path, tmp_path: Path, capsys
) -> None:
    model = Path(shutil.copytree(tiny_mixtral, tmp_path / "model"))
    marker = tmp_path / "ran.txt"
    (model / "evil.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import MixtralConfig\n"
        "class Evil(MixtralConfig):\n    model_type = 'evil-moe'\n"
    )
    config = json.loads((model / "config.json").read_text())
    config |= {"model_type": "evil-moe", "auto_map": {"AutoConfig": "evil.Evil"}}
    (model / "config.json").write_text(json.dumps(config))
    recipe = write(tmp_path / "r.yaml", small_recipe(model))
    assert main(["run", str(recipe), "--out", str(tmp_path / "out")]) == 2
    assert "cannot load model" in one_error(capsys) and not marker.exists()
    args = ["--set", "model.trust_remote_code=true"]
    assert main(["run", str(recipe), "--out", str(tmp_path / "out"), *args]) == 2
    assert marker.exists()  # the recipe asked for it: the folder's code ran
