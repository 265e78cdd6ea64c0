"""A run killed with SIGKILL resumes from its checkpoint: nothing stored recomputed, same bits."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from msa_edit.shapley import estimate
from msa_edit.shapley.toys import mlp_game

WORKER = Path(__file__).with_name("resume_worker.py")
N = 12


def worker_args() -> dict:
    spec = importlib.util.spec_from_file_location("resume_worker", WORKER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ARGS


def stored_rows(checkpoint: Path) -> set[str]:
    keys = torch.load(checkpoint, weights_only=True)["keys"].numpy()
    bits = np.unpackbits(keys, axis=1, count=N)
    return {"".join(map(str, row)) for row in bits}


def run(tmp: Path, tag: str, delay: float) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            str(WORKER),
            str(tmp / "ckpt.pt"),
            str(tmp / f"{tag}.log"),
            str(tmp / f"{tag}.out"),
            str(delay),
        ]
    )


def test_killed_run_resumes_without_recomputing(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt.pt"
    first = run(tmp_path, "first", delay=0.05)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not ckpt.exists() or len(stored_rows(ckpt)) < 150):
        assert first.poll() is None, "worker finished before it could be killed"
        time.sleep(0.05)
    first.kill()  # SIGKILL: no cleanup handlers run
    first.wait()
    stored = stored_rows(ckpt)
    assert 150 <= len(stored) < 600
    assert not list(tmp_path.glob("*.tmp")) or ckpt.exists()

    second = run(tmp_path, "second", delay=0.0)
    assert second.wait(timeout=300) == 0
    recomputed = set((tmp_path / "second.log").read_text().split())
    assert not recomputed & stored
    resumed = torch.load(tmp_path / "second.out", weights_only=True)

    clean = estimate(mlp_game(n_hidden=N), N, **worker_args(), progress=False)  # never killed
    assert resumed["n"] == clean.n_evaluations
    assert torch.equal(resumed["values"], clean.values)
    assert torch.equal(resumed["stderr"], clean.stderr)


def test_checkpoint_for_another_game_size_is_refused(tmp_path: Path) -> None:
    import pytest

    from msa_edit.errors import MsaEditError

    game = mlp_game(n_hidden=6)
    estimate(game, 6, checkpoint=tmp_path / "c.pt", progress=False)
    with pytest.raises(MsaEditError, match="written for 6 players"):
        estimate(mlp_game(n_hidden=7), 7, checkpoint=tmp_path / "c.pt", progress=False)
