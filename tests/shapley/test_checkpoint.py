"""The coalition checkpoint refuses anything that is not exactly what this game stored: flipped
bits, non-finite or integer values, another game's fingerprint, the old unfingerprinted format."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from msa_edit.errors import MsaEditError
from msa_edit.shapley import estimate
from msa_edit.shapley.cache import CoalitionCache
from msa_edit.shapley.checkpoint import checksum, read_checkpoint, write_checkpoint

N = 6
GAME = {"model/model.safetensors": "sha256:aa", "targets.en.text": "sha256:bb"}


def game(c: torch.Tensor) -> torch.Tensor:
    weights = torch.arange(1, N + 1, dtype=torch.float64)
    return torch.stack([c.double() @ weights, c.double().sum(1) ** 2], 1)


@pytest.fixture
def stored(tmp_path: Path) -> Path:
    path = tmp_path / "g.ckpt"
    estimate(game, N, "exact", checkpoint=path, fingerprint=GAME, progress=False)
    return path


def test_a_clean_checkpoint_resumes_every_coalition(stored: Path) -> None:
    calls = []

    def counted(c: torch.Tensor) -> torch.Tensor:
        calls.append(len(c))
        return game(c)

    res = estimate(counted, N, "exact", checkpoint=stored, fingerprint=GAME, progress=False)
    assert calls == [] and res.n_evaluations == 1 << N
    fresh = estimate(game, N, "exact", progress=False)
    assert torch.equal(res.values, fresh.values)


def test_every_flipped_bit_is_refused(stored: Path) -> None:
    data = bytearray(stored.read_bytes())
    positions = range(0, len(data) * 8, max(1, len(data) * 8 // 400))
    for bit in positions:  # ~400 single-bit flips spread over the whole file
        flipped = bytearray(data)
        flipped[bit // 8] ^= 1 << (bit % 8)
        stored.write_bytes(bytes(flipped))
        try:
            keys, values = read_checkpoint(stored, N, GAME)
        except MsaEditError as exc:
            assert "\n" not in str(exc) and "start fresh" in str(exc)
            continue
        # a flip the file format ignores (zip padding, a comment) must leave the data intact
        stored.write_bytes(bytes(data))
        same_keys, same_values = read_checkpoint(stored, N, GAME)
        assert np.array_equal(keys, same_keys) and torch.equal(values, same_values), bit


def rewrite(path: Path, **changes: object) -> None:
    """Change fields of a stored checkpoint, keeping its checksum consistent (a crafted file)."""
    state = torch.load(path, weights_only=True)
    state |= changes
    keys = state["keys"].numpy()
    state["sha256"] = checksum(N, keys, state["values"], state["game"])
    torch.save(state, path)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda s: {"values": s["values"].clone().index_fill_(0, torch.tensor([3]), float("nan"))},
         "NaN or infinite"),
        (lambda s: {"values": s["values"].long()}, "torch.int64 values"),
        (lambda s: {"values": s["values"][:5]}, "for 64 coalitions"),
        (lambda s: {"keys": torch.cat([s["keys"][:1], s["keys"][:-1]])}, "a coalition twice"),
        (lambda s: {"game": '{"model/model.safetensors": "sha256:zz"}'},
         "changed: model/model.safetensors, targets.en.text"),
        (lambda s: {"version": 1}, "format version 1"),
        (lambda s: {"n_players": 7}, "written for 7 players"),
    ],
    ids=["nan row", "int64", "short values", "duplicate key", "other game", "old", "players"],
)  # fmt: skip
def test_crafted_checkpoints_are_refused(stored: Path, change, expected: str) -> None:
    rewrite(stored, **change(torch.load(stored, weights_only=True)))
    with pytest.raises(MsaEditError, match="start fresh") as info:
        estimate(game, N, "exact", checkpoint=stored, fingerprint=GAME, progress=False)
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_a_changed_value_without_its_checksum_is_corrupt(stored: Path) -> None:
    state = torch.load(stored, weights_only=True)
    state["values"][0, 0] += 1e-3
    torch.save(state, stored)
    with pytest.raises(MsaEditError, match="is corrupt"):
        read_checkpoint(stored, N, GAME)


def test_a_planted_symlink_at_any_temp_name_is_not_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious")
    path = tmp_path / "run" / "g.ckpt"
    path.parent.mkdir()
    for name in ("g.ckpt.tmp", ".g.ckpt.tmp"):
        (path.parent / name).symlink_to(victim)
    cache = CoalitionCache(game, N, checkpoint=path, progress=False, fingerprint=GAME)
    cache.get(torch.ones(2, N, dtype=torch.bool))
    cache.close()
    assert victim.read_text() == "precious" and len(read_checkpoint(path, N, GAME)[0]) == 1


def test_write_then_read_round_trips(tmp_path: Path) -> None:
    keys = np.array([[0b10100000], [0b01000000]], dtype=np.uint8)
    values = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
    write_checkpoint(tmp_path / "c", 3, keys, values, None)
    got_keys, got_values = read_checkpoint(tmp_path / "c", 3, None)
    assert np.array_equal(got_keys, keys) and torch.equal(got_values, values)
    with pytest.raises(MsaEditError, match="made without a game fingerprint"):
        read_checkpoint(tmp_path / "c", 3, GAME)
