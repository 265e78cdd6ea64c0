"""Coalition cache: every distinct coalition is evaluated once, in batches, and can be checkpointed.

A coalition is a row of a `torch.bool` mask (True = unit intact). The cache keys rows by their
packed bitmask, calls the game on the missing rows `batch_size` at a time, validates what comes
back, and (optionally) writes itself atomically to a checkpoint file so a killed run loses nothing
it stored. The batches run in this process, or in a `BatchPool` (e.g. Ray workers) that returns
their values in order; either way the batches, and hence the stored values, are the same.
"""

from __future__ import annotations

import abc
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from msa_edit.errors import MsaEditError
from msa_edit.fingerprint import Value
from msa_edit.progress import Progress
from msa_edit.shapley.checkpoint import checkpoint_size, read_checkpoint, write_checkpoint

__all__ = ["BatchPool", "CoalitionCache", "Game", "GameSpec", "checkpoint_size"]

Game = Callable[[torch.Tensor], torch.Tensor]
"""A game maps coalitions `bool [B, n]` (True = intact) to values `float [B, *output_shape]`."""


@runtime_checkable
class GameSpec(Protocol):
    """A picklable recipe for a game: `build()` makes the game where it runs (e.g. loads the model
    from a path), so another process or machine can hold its own copy.

    >>> from dataclasses import dataclass
    >>> @dataclass(frozen=True)
    ... class Count:
    ...     def build(self) -> Game:
    ...         return lambda c: c.sum(1).double()
    >>> isinstance(Count(), GameSpec), Count().build()(torch.ones(1, 3, dtype=torch.bool)).item()
    (True, 3.0)
    """

    def build(self) -> Game:
        """The game, ready to evaluate coalitions."""
        ...


class BatchPool(abc.ABC):
    """Evaluates batches of coalitions somewhere else (e.g. `ray_backend.RayPool`)."""

    @abc.abstractmethod
    def map(self, batches: Sequence[torch.Tensor]) -> Iterator[torch.Tensor]:
        """The game's output for each of `batches` (`bool [B_i, n]`), in the order given."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the workers."""

    def __enter__(self) -> BatchPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_coalitions(coalitions: torch.Tensor, n_players: int) -> None:
    """Raise `MsaEditError` unless `coalitions` is a `torch.bool` tensor `[B, n_players]`.

    >>> check_coalitions(torch.ones(2, 3, dtype=torch.bool), 3)
    """
    if not isinstance(coalitions, torch.Tensor):
        raise MsaEditError(
            f"coalitions must be a torch.bool tensor [B, {n_players}]; "
            f"got {type(coalitions).__name__}"
        )
    if coalitions.dtype != torch.bool:
        raise MsaEditError(
            f"coalitions must be a torch.bool mask (True = intact), got dtype {coalitions.dtype}; "
            "convert with `mask.bool()`"
        )
    if coalitions.dim() != 2 or coalitions.shape[1] != n_players:
        raise MsaEditError(
            f"coalitions must have shape [B, {n_players}], got {list(coalitions.shape)}"
        )


def as_rows(values: torch.Tensor) -> torch.Tensor:
    """View values `[B, *shape]` as `[B, D]` (D = 1 for scalar games)."""
    return values.reshape(values.shape[0], -1)


def pack_keys(coalitions: torch.Tensor) -> list[bytes]:
    """One hashable key per row: the row's bits packed into bytes.

    >>> pack_keys(torch.tensor([[True, False, True]]))
    [b'\\xa0']
    """
    packed = np.packbits(coalitions.cpu().numpy(), axis=1)
    return [row.tobytes() for row in packed]


class CoalitionCache:
    """Values of the coalitions seen so far, keyed by bitmask; evaluates misses in batches.

    >>> count = lambda m: m.sum(1, keepdim=True).double()
    >>> cache = CoalitionCache(count, n_players=3, progress=False)
    >>> cache.get(torch.tensor([[True, True, False], [True, True, False]])).flatten().tolist()
    [2.0, 2.0]
    >>> len(cache), cache.n_game_rows
    (1, 1)
    """

    def __init__(
        self,
        game: Game | BatchPool,
        n_players: int,
        batch_size: int = 64,
        checkpoint: str | os.PathLike[str] | None = None,
        checkpoint_every: float = 60.0,
        progress: bool | None = None,
        total: int | None = None,
        fingerprint: Mapping[str, Value] | None = None,
    ) -> None:
        if batch_size < 1:
            raise MsaEditError(f"batch_size must be >= 1, got {batch_size}")
        self.game = game
        self.n_players = n_players
        self.batch_size = batch_size
        self.checkpoint = Path(checkpoint) if checkpoint is not None else None
        self.checkpoint_every = checkpoint_every
        self.fingerprint = dict(fingerprint) if fingerprint is not None else None
        """What the values depend on (`msa_edit.fingerprint`): stored in the checkpoint, and a
        checkpoint made for another game is refused."""
        self._index: dict[bytes, int] = {}
        self._keys = np.zeros((0, (n_players + 7) // 8), dtype=np.uint8)
        self._values: torch.Tensor | None = None
        self._size = 0
        self._dirty = False
        self._last_write = time.monotonic()
        self.n_game_rows = 0
        """Rows this process sent through the game (cache hits and resumed rows excluded)."""
        if self.checkpoint is not None and self.checkpoint.exists():
            self._load(self.checkpoint)
        self._bar = Progress(
            total, "coalitions", "coal", enabled=progress,
            initial=min(self._size, total) if total else self._size,
        )  # fmt: skip

    def __len__(self) -> int:
        return self._size

    def __contains__(self, key: bytes) -> bool:
        return key in self._index

    @property
    def output_shape(self) -> tuple[int, ...] | None:
        """Shape of one coalition's value, known after the first evaluation."""
        return None if self._values is None else tuple(self._values.shape[1:])

    def get(self, coalitions: torch.Tensor) -> torch.Tensor:
        """Values `float64 [B, *output_shape]` of `coalitions` `bool [B, n]`; evaluates misses."""
        check_coalitions(coalitions, self.n_players)
        keys = pack_keys(coalitions)
        missing: dict[bytes, int] = {}
        for row, key in enumerate(keys):
            if key not in self._index and key not in missing:
                missing[key] = row
        rows = list(missing.values())
        chunks = [
            rows[start : start + self.batch_size] for start in range(0, len(rows), self.batch_size)
        ]
        batches = [coalitions[chunk] for chunk in chunks]
        for chunk, batch, out in zip(chunks, batches, self._map(batches), strict=True):
            self._store(batch, [keys[r] for r in chunk], out)
        assert self._values is not None
        idx = torch.tensor([self._index[k] for k in keys], dtype=torch.long)
        return self._values[idx].double()

    def _map(self, batches: list[torch.Tensor]) -> Iterator[torch.Tensor]:
        """The game's output per batch, in order: from the pool, or computed here one by one."""
        if isinstance(self.game, BatchPool):
            return self.game.map(batches)
        game = self.game
        return (game(batch.clone()) for batch in batches)

    def _store(self, coalitions: torch.Tensor, keys: list[bytes], out: object) -> None:
        self._check_output(out, coalitions)
        assert isinstance(out, torch.Tensor)
        out = out.detach().to("cpu")
        self._append(keys, out)
        self.n_game_rows += len(keys)
        self._bar.update(len(keys))
        self._dirty = True
        if (
            self.checkpoint is not None
            and time.monotonic() - self._last_write >= self.checkpoint_every
        ):
            self.flush()

    def _check_output(self, out: object, coalitions: torch.Tensor) -> None:
        n = coalitions.shape[0]
        if not isinstance(out, torch.Tensor):
            raise MsaEditError(
                f"the game must return a torch.Tensor [B, *output_shape]; got {type(out).__name__}"
            )
        if out.dim() == 0 or out.shape[0] != n:
            got = "a 0-d tensor" if out.dim() == 0 else f"{out.shape[0]} rows"
            raise MsaEditError(
                f"the game returned {got} for a batch of {n} coalitions; "
                "it must return one row per coalition, shape [B, *output_shape]"
            )
        if not out.is_floating_point():
            raise MsaEditError(
                f"the game must return a floating-point tensor, got dtype {out.dtype}; "
                "cast it with `.float()`"
            )
        if self._values is not None and tuple(out.shape[1:]) != self.output_shape:
            raise MsaEditError(
                f"the game's output shape changed from {list(self.output_shape or ())} to "
                f"{list(out.shape[1:])}; every coalition must give the same shape"
            )
        finite = torch.isfinite(out.reshape(n, -1)).all(dim=1)
        if not bool(finite.all()):
            bad = coalitions[~finite.cpu()][0]
            lesioned = torch.nonzero(~bad).flatten().tolist()
            raise MsaEditError(
                f"the game returned NaN or inf for the coalition with players {lesioned} lesioned; "
                "make the objective finite for every coalition (e.g. clamp log-probabilities)"
            )

    def _append(self, keys: list[bytes], values: torch.Tensor) -> None:
        need = self._size + len(keys)
        self._reserve(need, values)
        assert self._values is not None
        self._values[self._size : need] = values.to(self._values.dtype)
        for offset, key in enumerate(keys):
            self._keys[self._size + offset] = np.frombuffer(key, dtype=np.uint8)
            self._index[key] = self._size + offset
        self._size = need

    def _reserve(self, need: int, like: torch.Tensor) -> None:
        """Grow key and value storage together (doubling) to hold `need` rows."""
        capacity = 0 if self._values is None else self._values.shape[0]
        if need <= capacity:
            return
        capacity = max(need, 2 * capacity, 64)
        values = torch.empty((capacity, *like.shape[1:]), dtype=like.dtype)
        keys = np.zeros((capacity, self._keys.shape[1]), dtype=np.uint8)
        if self._values is not None:
            values[: self._size] = self._values[: self._size]
            keys[: self._size] = self._keys[: self._size]
        self._values, self._keys = values, keys

    def flush(self) -> None:
        """Write the checkpoint atomically (unique temp file, fsync, rename) if anything changed."""
        if self.checkpoint is None or not self._dirty or self._values is None:
            return
        write_checkpoint(
            self.checkpoint, self.n_players, self._keys[: self._size], self._values[: self._size],
            self.fingerprint,
        )  # fmt: skip
        self._dirty = False
        self._last_write = time.monotonic()

    def _load(self, path: Path) -> None:
        keys, values = read_checkpoint(path, self.n_players, self.fingerprint)
        self._append([row.tobytes() for row in keys], values)

    def close(self) -> None:
        """Flush the checkpoint and close the progress (its last line, when not on a terminal)."""
        self.flush()
        self._bar.close()

    def set_postfix(self, **values: float) -> None:
        """Show running numbers (e.g. the largest stderr) beside the progress."""
        self._bar.set_postfix(**values)
