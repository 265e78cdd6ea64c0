"""`estimator.backend: ray` in a recipe: validated keys, and `msa-edit analyze` on two Ray workers
(each loading the tiny Mixtral from its folder) writes the same shapley.json as a local run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from tiny_models import LANGS, UD_TEXT

from msa_edit import optional
from msa_edit.cli import main
from msa_edit.errors import MsaEditError
from msa_edit.recipes import load_recipe


def recipe(model: str | Path, **estimator: Any) -> dict[str, Any]:
    """Exact Shapley values of the 8 experts on en/ru/zh, 2 blocks of 16 tokens each."""
    sets = {lang: {"path": str(UD_TEXT / f"{lang}.txt"), "n_seq": 2, "seq_len": 16}
            for lang in LANGS}  # fmt: skip
    return {
        "model": {"path": str(model)},
        "units": "layers.*.experts.*",
        "targets": {"sets": sets},
        "estimator": {"method": "exact", "batch_size": 16} | estimator,
    }


def write(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def test_ray_keys_validate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(optional, "available", lambda module: True)
    ok = load_recipe(write(tmp_path / "r.yaml", recipe("org/m", backend="ray", workers=4)))
    assert ok.estimator.ray_backend().workers == 4


@pytest.mark.parametrize(
    ("estimator", "expected"),
    [
        ({"workers": 2}, "estimator.workers: only used with backend 'ray' (backend is 'local')"),
        ({"gpus_per_worker": 1}, "estimator.gpus_per_worker: only used with backend 'ray'"),
        ({"backend": "dask"}, "estimator.backend: must be 'local' or 'ray'"),
        ({"backend": "ray", "workers": 0}, "estimator.workers: must be greater than 0"),
        ({"backend": "ray", "gpus_per_worker": -1}, "estimator.gpus_per_worker: must be greater"),
    ],
)
def test_bad_ray_keys_are_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, estimator: dict[str, Any], expected: str
) -> None:
    monkeypatch.setattr(optional, "available", lambda module: True)
    with pytest.raises(MsaEditError) as info:
        load_recipe(write(tmp_path / "r.yaml", recipe("org/m", **estimator)))
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_ray_backend_without_ray(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(optional, "available", lambda module: module != "ray")
    with pytest.raises(MsaEditError, match=r"estimator\.backend: .*pip install ray\)$"):
        load_recipe(write(tmp_path / "r.yaml", recipe("org/m", backend="ray")))


def test_analyze_on_ray_writes_the_local_shapley_json(
    tiny_mixtral: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("ray")
    path = write(tmp_path / "r.yaml", recipe(tiny_mixtral))
    assert main(["analyze", str(path), "--out", str(tmp_path / "local")]) == 0
    ray_args = ["--set", "estimator.backend=ray", "--set", "estimator.workers=2"]
    assert main(["analyze", str(path), "--out", str(tmp_path / "ray"), *ray_args]) == 0
    assert "each worker loads" in capsys.readouterr().out
    local = (tmp_path / "local" / "shapley.json").read_text()
    assert (tmp_path / "ray" / "shapley.json").read_text() == local
    assert '"n_evaluations": 256' in local
