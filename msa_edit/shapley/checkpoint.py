"""The coalition checkpoint file: evaluated coalitions, the game they belong to, and a checksum.

A checkpoint holds packed coalition keys `uint8 [M, ceil(n/8)]`, their values `float [M, *shape]`,
the game's fingerprint (`msa_edit.fingerprint`: model files, data, settings) and a SHA-256 of all
of it. `read_checkpoint` checks everything a fresh evaluation is checked for (floating, finite,
one row per key, no duplicate key) plus the checksum and the fingerprint, and refuses anything
else in one line, so a flipped bit or another game's file can never become a Shapley value.

>>> import tempfile
>>> keys = np.array([[0b10100000]], dtype=np.uint8)
>>> with tempfile.TemporaryDirectory() as d:
...     path = write_checkpoint(Path(d) / "c.ckpt", 3, keys, torch.tensor([[1.5]]), {"m": "x"})
...     k, v = read_checkpoint(path, 3, {"m": "x"})
...     try:
...         read_checkpoint(path, 3, {"m": "y"})
...     except MsaEditError as exc:
...         print(str(exc).split("(")[1].split(")")[0])
changed: m
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from msa_edit.atomic import atomic_path
from msa_edit.errors import MsaEditError, short
from msa_edit.fingerprint import Value, changes, describe_changes, encode

CHECKPOINT_VERSION = 2
_FRESH = "delete it or use another checkpoint path (or --out) to start fresh"


def checksum(
    n_players: int, keys: np.ndarray, values: torch.Tensor, game: str
) -> str:  # fmt: skip
    """SHA-256 over everything a checkpoint stores."""
    h = hashlib.sha256()
    h.update(f"{CHECKPOINT_VERSION}|{n_players}|{values.dtype}|{list(values.shape)}|".encode())
    h.update(np.ascontiguousarray(keys).tobytes())
    h.update(values.contiguous().numpy().tobytes())
    h.update(game.encode())
    return h.hexdigest()


def write_checkpoint(
    path: str | os.PathLike[str],
    n_players: int,
    keys: np.ndarray,
    values: torch.Tensor,
    fingerprint: Mapping[str, Value] | None,
) -> Path:
    """Store `keys`/`values` with the game's fingerprint and a checksum, atomically and durably."""
    game = encode(fingerprint) if fingerprint is not None else ""
    keys = np.ascontiguousarray(keys)
    values = values.detach().cpu().contiguous().clone()
    state = {
        "version": CHECKPOINT_VERSION,
        "n_players": n_players,
        "keys": torch.from_numpy(keys.copy()),
        "values": values,
        "game": game,
        "sha256": checksum(n_players, keys, values, game),
    }
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        torch.save(state, fh)
    return Path(path)


def read_checkpoint(
    path: str | os.PathLike[str], n_players: int, fingerprint: Mapping[str, Value] | None
) -> tuple[np.ndarray, torch.Tensor]:
    """The keys and values of a checkpoint written for this game; `MsaEditError` otherwise."""
    path = Path(path)
    state = _load(path)
    if state.get("version") != CHECKPOINT_VERSION:
        version = state.get("version")
        raise MsaEditError(
            f"checkpoint {path} has format version {short(version)}, not {CHECKPOINT_VERSION} "
            f"(older files carry no game fingerprint); {_FRESH}"
        )
    keys, values, game, digest = (state.get(k) for k in ("keys", "values", "game", "sha256"))
    if state.get("n_players") != n_players:
        raise MsaEditError(
            f"checkpoint {path} was written for {short(state.get('n_players'))} players, not "
            f"{n_players}; {_FRESH}"
        )
    width = (n_players + 7) // 8
    if not (
        isinstance(keys, torch.Tensor) and keys.dtype == torch.uint8 and keys.dim() == 2
        and keys.shape[1] == width and isinstance(values, torch.Tensor)
        and isinstance(game, str) and isinstance(digest, str)
    ):  # fmt: skip
        raise MsaEditError(f"checkpoint {path} is malformed (keys, values or checksum); {_FRESH}")
    if not values.is_floating_point() or values.dim() < 1 or values.shape[0] != keys.shape[0]:
        raise MsaEditError(
            f"checkpoint {path} holds {values.dtype} values of shape {list(values.shape)} for "
            f"{keys.shape[0]} coalitions; a checkpoint holds one floating row per coalition; "
            f"{_FRESH}"
        )
    keys_np = keys.numpy()
    if checksum(n_players, keys_np, values, game) != digest:
        raise MsaEditError(f"checkpoint {path} is corrupt (its checksum does not match); {_FRESH}")
    _check_game(path, game, fingerprint)
    if not bool(torch.isfinite(values).all()):
        raise MsaEditError(f"checkpoint {path} holds NaN or infinite values; {_FRESH}")
    if len({row.tobytes() for row in keys_np}) != len(keys_np):
        raise MsaEditError(f"checkpoint {path} lists a coalition twice; {_FRESH}")
    return keys_np, values


def checkpoint_size(path: str | os.PathLike[str]) -> int:
    """Coalitions stored in the checkpoint at `path`: 0 when there is none (or it is unreadable,
    which `read_checkpoint` reports)."""
    try:
        return len(torch.load(Path(path), weights_only=True, mmap=True)["keys"])
    except Exception:
        return 0


def _load(path: Path) -> dict[str, Any]:
    try:
        state = torch.load(path, weights_only=True)
    except Exception as exc:  # a foreign or corrupt file: say so instead of a traceback
        raise MsaEditError(
            f"checkpoint {path} is not a readable msa_edit checkpoint "
            f"({exc.__class__.__name__}); {_FRESH}"
        ) from None
    if not isinstance(state, dict):
        raise MsaEditError(f"checkpoint {path} has an unknown format; {_FRESH}")
    return state


def _check_game(path: Path, game: str, fingerprint: Mapping[str, Value] | None) -> None:
    """Refuse a checkpoint made for another game, naming what changed."""
    expected = encode(fingerprint) if fingerprint is not None else ""
    if game == expected:
        return
    if not game or not expected:
        which = "without" if not game else "with"
        raise MsaEditError(
            f"checkpoint {path} was made {which} a game fingerprint and this run is not; {_FRESH}"
        )
    try:
        stored = json.loads(game)
    except json.JSONDecodeError:
        stored = {}
    changed = changes(stored, dict(fingerprint or {}))
    raise MsaEditError(
        f"checkpoint {path} was made for another game (changed: "
        f"{describe_changes(changed) or 'its encoding'}); {_FRESH}"
    )
