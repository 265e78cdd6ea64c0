"""`estimate(..., backend="ray")`: bit-identical to a local run, a killed worker loses nothing and
duplicates nothing, a resumed run evaluates only what is missing, and errors are one line."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import VOCAB
from tiny_models import build as build_tiny

from msa_edit.errors import MsaEditError
from msa_edit.games import LesionGame, MeanNLL, Targets
from msa_edit.shapley import ShapleyResult, estimate
from msa_edit.shapley.cache import Game, pack_keys
from msa_edit.shapley.ray_backend import RayBackend, RayPool
from msa_edit.units import select

ray = pytest.importorskip("ray")

N = 10
ARGS = {"method": "adjusted", "budget": 200, "seed": 3, "batch_size": 16, "progress": False}


def toy_game() -> Game:
    """A nonlinear game with 3 outputs: v(S) = tanh(mask(S) @ W) @ U, fixed random W and U.

    The products are written as broadcast sums so each row's bits do not depend on the batch
    it is evaluated in: MKL's matmul picks kernels by the number of rows, so `c @ w` can differ
    in the last bit between batches of 16 and 7 (seen on AVX-512), and a resumed run, which
    batches only the missing coalitions, would then differ from a clean one for that reason.
    """
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(N, 16, generator=gen, dtype=torch.float64)
    u = torch.randn(16, 3, generator=gen, dtype=torch.float64)
    return lambda c: (torch.tanh((c.double()[:, :, None] * w).sum(1))[:, :, None] * u).sum(1)


@dataclass(frozen=True)
class Logged:
    """`toy_game` that logs every batch it evaluates (one file per process) and, with `die_on`,
    exits its process at its `die_on`-th batch — once per `log_dir` when `once`."""

    log_dir: str
    die_on: int | None = None
    once: bool = True

    def build(self) -> Game:
        game = toy_game()
        log = Path(self.log_dir)
        calls = [0]

        def logged(coalitions: torch.Tensor) -> torch.Tensor:
            calls[0] += 1
            if calls[0] == self.die_on and (not self.once or _first(log / "died")):
                os._exit(1)  # a crash: no exception, no cleanup
            with open(log / f"{os.getpid()}.rows", "a") as fh:
                fh.writelines(key.hex() + "\n" for key in pack_keys(coalitions))
            return game(coalitions)

        return logged


def _first(marker: Path) -> bool:
    """True for exactly one caller (across processes) per marker file."""
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        return False
    return True


@dataclass(frozen=True)
class TinyMixtral:
    """Expert players of the seeded tiny Mixtral of `tiny_models`, reroute lesions, mean NLL
    per target set: each worker builds the same model from its config and seed."""

    def build(self) -> Game:
        model = build_tiny("mixtral", seed=0)
        ids = torch.randint(0, VOCAB, (6, 16), generator=torch.Generator().manual_seed(0))
        targets = Targets.from_dict({"a": ids[:3], "b": ids[3:]})
        units = select(model, "layers.*.experts.*")
        return LesionGame(model, units, targets, MeanNLL(), "reroute", max_rows=12)


@dataclass(frozen=True)
class Broken:
    def build(self) -> Game:
        raise MsaEditError("model folder /nowhere does not exist; fix model.path")


@pytest.fixture(scope="module", autouse=True)
def cluster() -> Iterator[None]:
    """A local Ray instance with 4 logical CPUs (2 for `toy_pool`, 2 for the tests' own pools);
    the test module and `tiny_models` travel to the workers by value."""
    import tiny_models

    for module in (sys.modules[__name__], tiny_models):
        ray.cloudpickle.register_pickle_by_value(module)
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def same(a: ShapleyResult, b: ShapleyResult) -> bool:
    return all(
        torch.equal(getattr(a, f), getattr(b, f)) for f in ("values", "stderr", "v_full", "v_empty")
    ) and (a.n_evaluations, a.n_samples, a.stopped) == (b.n_evaluations, b.n_samples, b.stopped)


def stored(checkpoint: Path) -> tuple[np.ndarray, torch.Tensor]:
    state = torch.load(checkpoint, weights_only=True)
    return state["keys"].numpy(), state["values"]


def logged_rows(log_dir: Path) -> dict[str, list[str]]:
    """Rows each worker process evaluated, by process id."""
    return {p.stem: p.read_text().split() for p in log_dir.glob("*.rows")}


@pytest.fixture(scope="module")
def toy_pool(tmp_path_factory) -> Iterator[tuple[RayPool, Path]]:
    """Two workers holding a `Logged`, shared by the tests that need no crash, and its logs."""
    log = tmp_path_factory.mktemp("logs")
    with RayPool(Logged(str(log)), RayBackend(workers=2)) as pool:
        yield pool.ready(), log


def fresh(log_dir: Path) -> Path:
    for path in log_dir.glob("*.rows"):
        path.unlink()
    return log_dir


def test_two_workers_give_the_local_bits(toy_pool: tuple[RayPool, Path], tmp_path: Path) -> None:
    pool, log = toy_pool
    game = toy_game()
    local = estimate(game, N, **ARGS, checkpoint=tmp_path / "local.pt", checkpoint_every=0)
    fresh(log)
    remote = estimate(pool, N, **ARGS, checkpoint=tmp_path / "ray.pt", checkpoint_every=0)
    assert same(remote, local) and remote.values.shape == (N, 3)
    rows = logged_rows(log)
    assert len(rows) == 2 and all(rows.values()) and str(os.getpid()) not in rows  # 2 workers
    assert sum(len(r) for r in rows.values()) == remote.n_evaluations == 200
    keys, values = stored(tmp_path / "ray.pt")
    local_keys, local_values = stored(tmp_path / "local.pt")
    assert np.array_equal(keys, local_keys) and torch.equal(values, local_values)


def test_a_resumed_run_evaluates_only_the_missing_coalitions(
    toy_pool: tuple[RayPool, Path], tmp_path: Path
) -> None:
    pool, log = toy_pool
    args = ARGS | {"method": "permutation", "checkpoint": tmp_path / "c.pt"}
    fresh(log)
    first = estimate(pool, N, **args | {"budget": 80})  # a run that stopped half way
    before = {k for r in logged_rows(log).values() for k in r}
    fresh(log)
    resumed = estimate(pool, N, **args)
    now = [k for r in logged_rows(log).values() for k in r]
    clean = estimate(toy_game(), N, **args | {"checkpoint": None})
    assert same(resumed, clean)
    assert len(before) == first.n_evaluations and not before & set(now)
    assert len(now) == len(set(now)) == clean.n_evaluations - first.n_evaluations > 0


def test_a_pool_is_used_as_it_is(toy_pool: tuple[RayPool, Path]) -> None:
    with pytest.raises(MsaEditError, match="has its workers already; leave backend and workers"):
        estimate(toy_pool[0], N, **ARGS, backend="ray", workers=2)


def test_a_spec_gives_the_same_bits_locally_and_on_ray() -> None:
    args = ARGS | {"budget": 120, "batch_size": 8}
    local = estimate(TinyMixtral(), 12, **args)  # driver: default torch threads; workers: 1
    remote = estimate(TinyMixtral(), 12, **args, backend=RayBackend(workers=2))
    assert same(remote, local) and remote.values.shape == (12, 2)
    assert remote.values.abs().sum() > 0


def test_a_killed_worker_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    local = estimate(toy_game(), N, **ARGS, checkpoint=tmp_path / "l.pt")
    logs = tmp_path / "logs"
    logs.mkdir()
    remote = estimate(
        Logged(str(logs), die_on=2), N, **ARGS, checkpoint=tmp_path / "r.pt",
        backend="ray", workers=2,
    )  # fmt: skip
    assert (logs / "died").exists()  # a worker did die mid-run
    rows = logged_rows(logs)
    assert len(rows) in (2, 3)  # two workers, maybe the dead one's replacement
    every = [key for r in rows.values() for key in r]
    assert len(every) == len(set(every)) == 200  # each coalition evaluated exactly once
    assert same(remote, local)
    keys, values = stored(tmp_path / "r.pt")
    local_keys, local_values = stored(tmp_path / "l.pt")
    assert np.array_equal(keys, local_keys) and torch.equal(values, local_values)
    assert {k.tobytes().hex() for k in keys} == set(every)


def test_a_batch_that_always_crashes_its_worker_stops_the_run(tmp_path: Path) -> None:
    spec = Logged(str(tmp_path), die_on=1, once=False)
    with pytest.raises(MsaEditError, match=r"crashed its Ray worker 2 times.*lower batch_size"):
        estimate(spec, N, **ARGS, backend=RayBackend(workers=1, max_attempts=2))


def test_a_worker_that_cannot_build_the_game_reports_why() -> None:
    with pytest.raises(MsaEditError, match=r"^model folder /nowhere does not exist"):
        estimate(Broken(), N, **ARGS, backend="ray", workers=1)


def test_too_many_workers_for_the_cluster() -> None:
    with pytest.raises(MsaEditError, match=r"5 Ray workers .* do not fit the cluster's 4 CPUs"):
        estimate(toy_game(), N, **ARGS, backend="ray", workers=5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"workers": 2}, r"workers=2 is only used with backend='ray'"),
        ({"backend": "dask"}, r"unknown backend 'dask'; choose one of local, ray"),
        ({"backend": RayBackend(workers=2), "workers": 2}, r"not both"),
        ({"backend": "ray", "workers": 0}, r"workers must be a positive int, got 0"),
    ],
)
def test_bad_backend_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(MsaEditError, match=message):
        estimate(toy_game(), N, **ARGS, **kwargs)


def test_without_ray_the_error_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    with pytest.raises(MsaEditError) as info:
        estimate(toy_game(), N, **ARGS, backend="ray", workers=2)
    assert str(info.value) == (
        "backend=\"ray\" needs ray, which is not installed; pip install -e '.[ray]' in a clone "
        "(or pip install ray)"
    )
