"""Coalition batches evaluated by Ray actors, each holding its own copy of the game (model).

The driver keeps the sampler, the `CoalitionCache` and its checkpoint. `RayPool.map` takes the
cache's batches — the same batches a local run makes, so the values are bit-identical on the same
hardware — and hands them to `workers` actors, each of which built the game once from a picklable
`GameSpec` (e.g. loaded the model from a path, 4-bit if asked), keeping two batches in flight per
actor. A batch whose actor dies (killed, out of memory, node lost) goes back to the front of the
queue and a fresh actor takes the dead one's place, so no coalition is lost, and none is stored
twice: results are stored in batch order, once each.

Where the workers run is Ray's business: the cluster `ray.init` already joined in this process,
else the one named by `RAY_ADDRESS` (e.g. `RAY_ADDRESS=auto` on a node of a cluster started with
`ray start --head` / `ray start --address=HEAD:6379`), else a local instance on this machine that
lives as long as the pool. Every node needs `msa-edit[ray]` installed and must see the paths the
game spec loads from.

>>> from msa_edit.shapley import estimate
>>> from msa_edit.shapley.toys import mlp_game
>>> res = estimate(mlp_game(), 10, backend="ray", workers=2)  # doctest: +SKIP
>>> with RayPool(spec, RayBackend(workers=4)) as pool:  # doctest: +SKIP
...     runs = [estimate(pool, n, budget=4000, seed=s) for s in range(3)]  # models loaded once
"""

from __future__ import annotations

import itertools
import logging
import os
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch

from msa_edit import optional
from msa_edit.errors import MsaEditError
from msa_edit.shapley.cache import BatchPool, Game, GameSpec

log = logging.getLogger(__name__)

IN_FLIGHT = 2
"""Batches queued on each actor: it starts the next one while the driver stores the last."""
PATIENCE_S = 300.0
"""Seconds without a finished batch before a warning that the workers may not be scheduled."""


def require_ray() -> ModuleType:
    """The `ray` module, or a one-line error saying how to install it."""
    return optional.require("ray", 'backend="ray"')


@dataclass(frozen=True)
class RayBackend:
    """How `estimate` spreads coalition batches over a Ray cluster.

    `workers`: actors, one game (model replica) each; None = as many as the cluster's GPUs (or,
    without GPUs, its CPUs) hold. `cpus_per_worker`: CPUs reserved per actor, also its torch
    thread count (for the lesion games tested, 1 and 2 threads give the same bits; another CPU
    or GPU kind or torch build may not). `gpus_per_worker`: None = 1 when the cluster has GPUs,
    else 0. `max_attempts`: how many actors one batch may take down before the run stops.

    >>> RayBackend(workers=2).cpus_per_worker
    1
    """

    workers: int | None = None
    cpus_per_worker: int = 1
    gpus_per_worker: float | None = None
    max_attempts: int = 3

    def __post_init__(self) -> None:
        for name in ("workers", "cpus_per_worker", "max_attempts"):
            value = getattr(self, name)
            if value is None and name == "workers":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise MsaEditError(f"{name} must be a positive int, got {value!r}")
        gpus = self.gpus_per_worker
        if gpus is not None and (isinstance(gpus, bool) or not gpus >= 0):
            raise MsaEditError(f"gpus_per_worker must be a number >= 0, got {gpus!r}")


@dataclass(frozen=True)
class _Given:
    """A ready game as a `GameSpec` (it is pickled to every worker as it is)."""

    game: Game

    def build(self) -> Game:
        return self.game


class _Worker:
    """One Ray actor: builds the game once, then evaluates the batches it is sent."""

    def __init__(self, spec: GameSpec, threads: int) -> None:
        torch.set_num_threads(threads)
        self.error: Exception | None = None
        self.game: Game | None = None
        try:  # reported with the first batch: an actor that raises here looks like a crash
            self.game = spec.build()
        except Exception as exc:
            self.error = exc

    def ready(self) -> None:
        if self.error is not None:
            raise self.error

    def evaluate(self, coalitions: torch.Tensor) -> Any:
        self.ready()
        assert self.game is not None
        out = self.game(coalitions)
        return out.detach().cpu() if isinstance(out, torch.Tensor) else out


class RayPool(BatchPool):
    """`workers` Ray actors, each holding the game built from `game` (a `GameSpec`, or a game
    pickled to each), that evaluate coalition batches; `estimate(pool, ...)` uses it as it is."""

    def __init__(self, game: Game | GameSpec, backend: RayBackend) -> None:
        self._ray = ray = require_ray()
        self.actors: list[Any] = []
        self.deaths = 0
        """Actors that died and were replaced."""
        self.exact_ends: int | None = getattr(game, "exact_ends", None)
        """The game's `exact_ends` (None: all its values are exact)."""
        self._started = not ray.is_initialized()
        if self._started:  # honours RAY_ADDRESS; else a local instance for this pool only
            ray.init(**({} if os.environ.get("RAY_ADDRESS") else {"include_dashboard": False}))
        try:
            self.workers, cpus, gpus = _fit(backend, ray.cluster_resources())
            spec = game if isinstance(game, GameSpec) else _Given(game)
            self._actor = ray.remote(_Worker).options(
                num_cpus=cpus, num_gpus=gpus, max_restarts=0, max_task_retries=0
            )
            self._spec = ray.put(spec)  # one copy in the object store, whatever the workers
            self._threads = cpus
            self.max_attempts = backend.max_attempts
            self.actors = [self._start() for _ in range(self.workers)]
        except BaseException:
            self.close()
            raise

    def _start(self) -> Any:
        return self._actor.remote(self._spec, self._threads)

    def ready(self) -> RayPool:
        """Wait until every worker has built its game (raising the error of one that could not)."""
        try:
            self._ray.get([actor.ready.remote() for actor in self.actors])
        except self._ray.exceptions.RayTaskError as exc:
            raise _cause(exc) from None
        return self

    def map(self, batches: Sequence[torch.Tensor]) -> Iterator[torch.Tensor]:
        ray = self._ray
        queue = deque(range(len(batches)))
        running: dict[Any, tuple[int, int, int]] = {}  # ref -> (actor slot, batch, submission)
        done: dict[int, torch.Tensor] = {}
        attempts = [0] * len(batches)
        order = itertools.count()
        next_out = 0
        while next_out < len(batches):
            for _ in range(IN_FLIGHT):  # one batch per idle actor per pass: spread, then queue
                for slot, actor in enumerate(self.actors):
                    busy = sum(1 for s, _, _ in running.values() if s == slot)
                    if queue and busy < IN_FLIGHT:
                        index = queue.popleft()
                        running[actor.evaluate.remote(batches[index])] = (slot, index, next(order))
            ready, _ = ray.wait(list(running), num_returns=1, timeout=PATIENCE_S)
            if not ready:
                log.warning(
                    "no batch finished in %.0f s: are the Ray workers waiting for free CPUs or "
                    "GPUs (see `ray status`), or is one batch that slow?",
                    PATIENCE_S,
                )
                continue
            ref = ready[0]
            slot, index, submitted = running.pop(ref)
            try:
                done[index] = ray.get(ref)
            except ray.exceptions.RayActorError:
                lost = [(submitted, index)]
                for other in [r for r, (s, _, _) in running.items() if s == slot]:
                    _, i, n = running.pop(other)
                    lost.append((n, i))
                self._replace(slot, lost, queue, attempts, batches)
            except ray.exceptions.RayTaskError as exc:  # the game raised: not a crash, no retry
                raise _cause(exc) from None
            while next_out in done:
                yield done.pop(next_out)
                next_out += 1

    def _replace(
        self,
        slot: int,
        lost: list[tuple[int, int]],
        queue: deque[int],
        attempts: list[int],
        batches: Sequence[torch.Tensor],
    ) -> None:
        """Requeue a dead actor's batches (first in line) and start a new actor in its slot."""
        culprit = min(lost)[1]  # the oldest batch was the one running when the actor died
        attempts[culprit] += 1
        if attempts[culprit] >= self.max_attempts:
            raise MsaEditError(
                f"a batch of {len(batches[culprit])} coalitions crashed its Ray worker "
                f"{attempts[culprit]} times (out of memory?); lower batch_size or rows per forward"
            )
        queue.extendleft(sorted((i for _, i in lost), reverse=True))
        self.deaths += 1
        log.warning("Ray worker %d died; %d batches requeued, starting a new one", slot, len(lost))
        self._ray.kill(self.actors[slot], no_restart=True)
        self.actors[slot] = self._start()

    def close(self) -> None:
        if self._ray.is_initialized():
            for actor in self.actors:
                self._ray.kill(actor, no_restart=True)
            if self._started:
                self._ray.shutdown()
        self.actors = []


def _cause(exc: Any) -> BaseException:
    """What a worker raised: an `MsaEditError` as it is (one line), else with Ray's traceback."""
    return exc.cause if isinstance(exc.cause, MsaEditError) else exc.as_instanceof_cause()


def _fit(backend: RayBackend, resources: dict[str, float]) -> tuple[int, int, float]:
    """Workers, CPUs and GPUs per worker; an error if the cluster cannot hold them all."""
    have_cpus, have_gpus = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
    cpus = backend.cpus_per_worker
    gpus = backend.gpus_per_worker
    if gpus is None:
        gpus = 1.0 if have_gpus >= 1 else 0.0
    workers = backend.workers
    if workers is None:
        workers = max(1, int(have_gpus // gpus) if gpus else int(have_cpus // cpus))
    if workers * cpus > have_cpus or workers * gpus > have_gpus:
        raise MsaEditError(
            f"{workers} Ray workers x ({cpus} CPU, {gpus:g} GPU) do not fit the cluster's "
            f"{have_cpus:g} CPUs and {have_gpus:g} GPUs; lower workers or the per-worker resources"
        )
    return workers, cpus, gpus
