"""`estimate`: the one entry point for Shapley values (modes) of a batched game."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Protocol

import torch

from msa_edit.errors import MsaEditError
from msa_edit.fingerprint import Value
from msa_edit.shapley.adjusted import AdjustedSampler
from msa_edit.shapley.cache import BatchPool, CoalitionCache, Game, GameSpec, as_rows, pack_keys
from msa_edit.shapley.exact import CHUNK, EXACT_MAX_PLAYERS, accumulate_exact, all_coalitions
from msa_edit.shapley.kernel import KernelSampler, min_pairs
from msa_edit.shapley.ray_backend import RayBackend, RayPool
from msa_edit.shapley.result import ShapleyResult, TracePoint
from msa_edit.shapley.sampling import PermutationSampler

METHODS = ("auto", "exact", "permutation", "antithetic", "kernel", "adjusted")
BACKENDS = ("local", "ray")
AUTO_EXACT_MAX_PLAYERS = 10
"""`auto` without a budget enumerates exactly up to this many players (2^10 = 1024 coalitions)."""
FIRST_ROUND = 16
"""Samples in the first round; later rounds add a quarter of the samples so far (trace points
are spaced geometrically), so the rounds, and hence the results, never depend on `batch_size`."""
TOPK_PATIENCE = 3
"""Rounds in a row the top-k ranking must stay the same before `topk` stops sampling."""
TRACE_MAX_NUMEL = 1 << 20


class Sampler(Protocol):
    """What the sampled estimators share: fixed coalitions, then blocks of coalitions per sample."""

    @property
    def n_samples(self) -> int: ...

    def fixed(self) -> torch.Tensor: ...

    def set_fixed(self, values: torch.Tensor) -> None: ...

    def draw(self, count: int) -> list[torch.Tensor]: ...

    def add(self, blocks: list[torch.Tensor], values: list[torch.Tensor]) -> None: ...

    def estimate(self) -> tuple[torch.Tensor, torch.Tensor]: ...


def min_budget(method: str, n_players: int) -> int:
    """Fewest distinct coalitions `method` needs for a first estimate with a finite standard error
    (the kernel: the 2n + 2 enumerated coalitions and `kernel.min_pairs(n)` = ceil(n / 2) sampled
    pairs; with fewer its standard error is infinite).

    >>> min_budget("permutation", 10), min_budget("kernel", 10), min_budget("exact", 10)
    (20, 32, 1024)
    """
    n = n_players
    return {
        "exact": 1 << n if n < 63 else 1 << 62,
        "permutation": min(2 * n, 1 << n),
        "antithetic": min(4 * n - 2, 1 << n),
        "kernel": min(2 * n + 2 + 2 * min_pairs(n), 1 << n),
        "adjusted": min(2 * n + 2 + 2 * min_pairs(n), 1 << n),
    }[method]


def default_budget(n_players: int) -> int:
    """Budget of a sampled method when none is given and no stopping rule is set: 64 (n+1)."""
    return min(64 * (n_players + 1), 1 << min(n_players, 62))


def resolve_method(
    method: str, n_players: int, budget: int | None, exact_ends: int | None = None
) -> str:
    """The estimator `auto` stands for: exact when 2^n fits the budget, else regression-adjusted
    Monte Carlo on the paired kernel's coalitions (it falls back to kernel regression when no
    surrogate lowers the variance; least error per coalition in `evals/bench_estimators.py`),
    else plain permutations when the budget is below what the kernel needs. Never exact for a
    game whose values are exact only near the ends (`exact_ends`, a row-sampled game).

    >>> [resolve_method("auto", n, b) for n, b in [(8, None), (12, 500), (30, 61)]]
    ['exact', 'adjusted', 'permutation']
    >>> resolve_method("auto", 8, None, exact_ends=1)
    'adjusted'
    """
    if method != "auto":
        return method
    exact_ok = exact_ends is None
    if budget is None:
        return "exact" if exact_ok and n_players <= AUTO_EXACT_MAX_PLAYERS else "adjusted"
    if exact_ok and n_players <= EXACT_MAX_PLAYERS and budget >= 1 << n_players:
        return "exact"
    return "adjusted" if budget >= min_budget("adjusted", n_players) else "permutation"


def check_request(
    n_players: int,
    method: str = "auto",
    budget: int | None = None,
    exact_ends: int | None = None,
) -> str:
    """The method `estimate` would run for `n_players` within `budget`; `MsaEditError` when the
    budget cannot pay for it, or when the game's values are not exact (`exact_ends`) and the
    method is not `adjusted` (the only one whose stderr counts their noise), so a caller can
    refuse before writing or evaluating anything.

    >>> check_request(8, "exact")
    'exact'
    """
    if method not in METHODS:
        raise MsaEditError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if method == "exact" and exact_ends is not None:
        raise MsaEditError(
            "method='exact' needs exact values but the game samples its rows (rows_per_set); "
            "use method 'auto', or leave rows_per_set unset"
        )
    resolved = resolve_method(method, n_players, budget, exact_ends)
    if exact_ends is not None and resolved != "adjusted":
        raise MsaEditError(
            f"with a game that samples its rows (rows_per_set) only the adjusted estimator counts "
            f"the rows' noise in its stderr, and it needs budget >= "
            f"{min_budget('adjusted', n_players)} for {n_players} players; got "
            f"method={method!r}, budget={budget}: use method 'auto' with such a budget"
        )
    least = min_budget("permutation", n_players)
    if method == "auto" and budget is not None and budget < least:
        raise MsaEditError(
            f"budget={budget} is too small for {n_players} players: the least any method needs "
            f"for values with a standard error is {least} distinct coalitions; raise the budget"
        )
    _check_budget(resolved, n_players, budget)
    return resolved


def _check_args(
    game: object,
    n_players: object,
    method: str,
    budget: object,
    seed: object,
    batch_size: object,
    tol: float | None,
    topk: int | None,
) -> None:
    if not (callable(game) or isinstance(game, (GameSpec, BatchPool))):
        raise MsaEditError(
            "game must be callable (bool [B, n] -> float [B, ...]), a GameSpec or a RayPool; "
            f"got {type(game).__name__}"
        )
    if isinstance(n_players, bool) or not isinstance(n_players, int) or n_players < 1:
        raise MsaEditError(f"n_players must be an int >= 1, got {n_players!r}")
    if method not in METHODS:
        raise MsaEditError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    for name, value in (("budget", budget), ("batch_size", batch_size)):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < 1
        ):
            raise MsaEditError(f"{name} must be a positive int, got {value!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise MsaEditError(f"seed must be an int >= 0, got {seed!r}")
    if tol is not None and not tol > 0:
        raise MsaEditError(f"tol must be > 0, got {tol!r}")
    if topk is not None and not 1 <= topk <= n_players:
        raise MsaEditError(f"topk must be between 1 and n_players={n_players}, got {topk!r}")


def _check_groups(groups: Sequence[int] | None, n_players: int) -> None:
    if groups is None:
        return
    if (
        isinstance(groups, (str, bytes))
        or not isinstance(groups, Sequence)
        or not all(isinstance(g, int) and not isinstance(g, bool) for g in groups)
    ):
        raise MsaEditError("groups must be a list of ints, one group label per player (its layer)")
    if len(groups) != n_players:
        raise MsaEditError(
            f"groups has {len(groups)} labels but there are n_players={n_players}; "
            "give one per player"
        )


def _check_budget(method: str, n_players: int, budget: int | None) -> None:
    if method == "exact":
        if n_players > EXACT_MAX_PLAYERS:
            raise MsaEditError(
                f"method='exact' needs all 2^{n_players} coalitions; it is limited to "
                f"{EXACT_MAX_PLAYERS} players; use method='auto' (kernel regression) with a budget"
            )
        if budget is not None and budget < 1 << n_players:
            raise MsaEditError(
                f"method='exact' needs 2^{n_players} = {1 << n_players} coalitions "
                f"but budget={budget}; "
                "raise the budget or use method='auto'"
            )
        return
    need = min_budget(method, n_players)
    if budget is not None and budget < need:
        raise MsaEditError(
            f"budget={budget} is too small for method={method!r} with {n_players} players: "
            f"it needs at least {need} distinct coalitions; raise the budget"
            + ("" if method == "permutation" else
               f", or use method='permutation' (from {min_budget('permutation', n_players)})")
        )  # fmt: skip


def _evaluator(
    game: Game | GameSpec | BatchPool, backend: str | RayBackend, workers: int | None
) -> Game | BatchPool:
    """The game to call here (`backend="local"`), or the Ray workers that evaluate it."""
    if isinstance(backend, str) and backend not in BACKENDS:
        raise MsaEditError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if isinstance(game, BatchPool):
        if backend != "local" or workers is not None:
            raise MsaEditError("a RayPool has its workers already; leave backend and workers unset")
        return game
    if backend == "local":
        if workers is not None:
            raise MsaEditError(f"workers={workers} is only used with backend='ray'")
        return game.build() if isinstance(game, GameSpec) else game
    if isinstance(backend, RayBackend):
        if workers is not None:
            raise MsaEditError("give workers in RayBackend(...) or with backend='ray', not both")
    elif backend == "ray":
        backend = RayBackend(workers=workers)
    else:
        raise MsaEditError(f"backend must be 'local', 'ray' or a RayBackend, got {backend!r}")
    return RayPool(game, backend)


def estimate(
    game: Game | GameSpec | BatchPool,
    n_players: int,
    method: str = "auto",
    budget: int | None = None,
    seed: int = 0,
    batch_size: int = 64,
    *,
    tol: float | None = None,
    topk: int | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    checkpoint_every: float = 60.0,
    progress: bool | None = None,
    backend: str | RayBackend = "local",
    workers: int | None = None,
    fingerprint: Mapping[str, Value] | None = None,
    groups: Sequence[int] | None = None,
) -> ShapleyResult:
    """Shapley values of every player of `game`, shaped like the game's output (Shapley modes).

    `game(coalitions)` takes `bool [B, n_players]` (True = intact) and returns `float [B, *shape]`.
    `budget` caps the distinct coalitions evaluated; each is evaluated once, `batch_size` per call.
    Sampling stops early when every stderr is below `tol`, or when the top-`topk` players by |value|
    stay the same for 3 rounds. With `checkpoint`, evaluated coalitions are written there (at most
    every `checkpoint_every` seconds, atomically) and a rerun with the same arguments resumes
    without re-evaluating them and returns the same bits. Progress shows as a bar on a terminal
    and as timestamped lines elsewhere (`msa_edit.progress`); `progress=False` silences it.
    `fingerprint` (`msa_edit.fingerprint`: what the game's values depend on) is stored in the
    checkpoint, and a checkpoint made with another one is refused, naming what changed.

    `game` may also be a `GameSpec`, whose `build()` makes the game. `backend="ray"` evaluates
    the batches on `workers` Ray actors (a `RayBackend` sets their resources), each holding the
    game built from the spec (a plain game is pickled to each of them); this process keeps the
    sampler, the cache and the checkpoint, a dead worker's batch is retried on a fresh one, and
    the values are bit-identical to a local run on the same hardware. A `RayPool` passed as
    `game` is used as it is and left open, so several runs share workers that loaded the model
    once. See `ray_backend`.

    `groups` labels each player with its group (the runner passes each unit's layer): the
    `adjusted` estimator (what `auto` runs between exact and permutations) fits surrogates with
    interactions inside groups and between adjacent ones (`surrogate.ladder`); without it every
    player is in one group. It changes no coalition, only how their values are combined.

    A game whose values are exact only near the ends (an int attribute `exact_ends`, e.g.
    `LesionGame(rows_per_set=k)`: unbiased estimates elsewhere) is estimated by `adjusted` only,
    with only those sizes enumerated, a pair drawn twice kept in one fold and weighed by its
    copies in the variance (their noise is shared), so the stderr includes the values' noise;
    `exact` and methods that cannot count that noise are refused.

    >>> glove = lambda c: torch.minimum(c[:, 0], c[:, 1:].sum(1)).double()
    >>> res = estimate(glove, 3, method="exact", progress=False)
    >>> [round(x, 4) for x in res.values.tolist()]
    [0.6667, 0.1667, 0.1667]
    """
    _check_args(game, n_players, method, budget, seed, batch_size, tol, topk)
    _check_groups(groups, n_players)
    ends = exact_ends(game)
    resolved = check_request(n_players, method, budget, ends)
    adaptive = tol is not None or topk is not None
    if resolved != "exact" and budget is None and not adaptive:
        budget = default_budget(n_players)
    total = 1 << n_players if resolved == "exact" else budget
    evaluator = _evaluator(game, backend, workers)
    try:
        cache = CoalitionCache(
            evaluator,
            n_players,
            batch_size,
            checkpoint,
            checkpoint_every,
            progress,
            total,
            fingerprint=fingerprint,
        )
        try:
            if resolved == "exact":
                return _exact(cache, n_players, seed, budget)
            sampler: Sampler
            limit = budget or default_budget(n_players)
            if resolved == "kernel":
                sampler = KernelSampler(n_players, seed, limit, ends)
            elif resolved == "adjusted":
                sampler = AdjustedSampler(n_players, seed, limit, groups or [0] * n_players, ends)
            else:
                sampler = PermutationSampler(n_players, seed, antithetic=resolved == "antithetic")
            return _sampled(
                sampler, resolved, cache, n_players, seed, budget, tol, topk, exact=ends is None
            )
        finally:
            cache.close()
    finally:
        if isinstance(evaluator, BatchPool) and evaluator is not game:
            evaluator.close()


def exact_ends(game: object) -> int | None:
    """How close to either end a game's values are exact (`LesionGame.exact_ends`, also on a
    `GameSpec` or a `RayPool`); None, the default, when all of them are."""
    ends = getattr(game, "exact_ends", None)
    return ends if isinstance(ends, int) and not isinstance(ends, bool) else None


def _exact(cache: CoalitionCache, n: int, seed: int, budget: int | None) -> ShapleyResult:
    values, v_empty, v_full = exact_from_cache(cache, n)
    return ShapleyResult(
        values=values,
        stderr=torch.zeros_like(values),
        n_evaluations=1 << n,
        v_full=v_full,
        v_empty=v_empty,
        method="exact",
        seed=seed,
        budget=budget,
        n_samples=0,
        stopped="exact",
    )


def exact_from_cache(
    cache: CoalitionCache, n: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact values `[n, *shape]`, v(0) and v(N), evaluating whatever coalitions are missing."""
    phi: torch.Tensor | None = None
    for start in range(0, 1 << n, CHUNK):
        block = all_coalitions(n, start, min(1 << n, start + CHUNK))
        share = accumulate_exact(block, as_rows(cache.get(block)))
        phi = share if phi is None else phi + share
    assert phi is not None
    ends = cache.get(
        torch.stack([torch.zeros(n, dtype=torch.bool), torch.ones(n, dtype=torch.bool)])
    )
    shape = ends.shape[1:]
    return phi.reshape(n, *shape), ends[0], ends[1]


class _Budget:
    """The distinct coalitions one run uses, never more than `limit`."""

    def __init__(self, limit: int | None, n_players: int) -> None:
        self.limit = limit
        self.used: set[bytes] = set()
        self.everything = 1 << n_players if n_players < 63 else None

    def admit(self, keys: list[bytes]) -> bool:
        new = set(keys) - self.used
        if self.limit is not None and len(self.used) + len(new) > self.limit:
            return False
        self.used |= new
        return True

    @property
    def exhausted(self) -> bool:
        return self.everything is not None and len(self.used) >= self.everything


def _sampled(
    sampler: Sampler,
    method: str,
    cache: CoalitionCache,
    n: int,
    seed: int,
    budget: int | None,
    tol: float | None,
    topk: int | None,
    exact: bool = True,
) -> ShapleyResult:
    spent = _Budget(budget, n)
    fixed = sampler.fixed()
    if not spent.admit(pack_keys(fixed)):
        raise MsaEditError(f"budget={budget} is too small for method={method!r}; raise it")
    fixed_values = cache.get(fixed)
    shape = fixed_values.shape[1:]
    sampler.set_fixed(as_rows(fixed_values))
    trace: list[TracePoint] = []
    last_top: list[list[int]] | None = None
    stable = 0
    while True:
        count = max(FIRST_ROUND, sampler.n_samples // 4)
        blocks = sampler.draw(count)
        admitted = []
        for block in blocks:
            if not spent.admit(pack_keys(block)):
                break
            admitted.append(block)
        if admitted:
            values = as_rows(cache.get(torch.cat(admitted)))
            sampler.add(admitted, list(values.split([len(b) for b in admitted])))
        full = len(admitted) < len(blocks) or not blocks
        if spent.exhausted and exact:  # else the values are not exact: keep the sampler's
            phi, v_empty, v_full = exact_from_cache(cache, n)
            se = torch.zeros_like(phi)
            stopped = "exhausted"
            trace.append(_trace_point(len(spent.used), sampler.n_samples, phi, se))
            break
        phi_flat, se_flat = sampler.estimate()
        phi, se = phi_flat.reshape(n, *shape), se_flat.reshape(n, *shape)
        v_empty, v_full = fixed_values[0], fixed_values[1]
        trace.append(_trace_point(len(spent.used), sampler.n_samples, phi, se))
        cache.set_postfix(max_stderr=float(se.max()))
        if tol is not None and sampler.n_samples >= 2 and float(se_flat.max()) <= tol:
            stopped = "tol"
            break
        if topk is not None:
            top = torch.argsort(phi_flat.abs(), dim=0, descending=True, stable=True)[
                :topk
            ].T.tolist()
            stable = stable + 1 if top == last_top else 0
            last_top = top
            if stable >= TOPK_PATIENCE:
                stopped = "topk"
                break
        if full or spent.exhausted:
            stopped = "exhausted" if spent.exhausted else "budget"
            break
    return ShapleyResult(
        values=phi,
        stderr=se,
        n_evaluations=len(spent.used),
        v_full=v_full,
        v_empty=v_empty,
        method=method,
        seed=seed,
        budget=budget,
        n_samples=sampler.n_samples,
        stopped=stopped,
        trace=tuple(trace),
        surrogate=sampler.chosen if isinstance(sampler, AdjustedSampler) else "",
    )


def _trace_point(n_eval: int, n_samples: int, phi: torch.Tensor, se: torch.Tensor) -> TracePoint:
    if phi.numel() > TRACE_MAX_NUMEL:
        phi = phi.reshape(phi.shape[0], -1).norm(dim=1)
        se = se.reshape(se.shape[0], -1).norm(dim=1)
    return TracePoint(n_eval, n_samples, phi.float().clone(), se.float().clone())
