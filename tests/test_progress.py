"""`Progress`: timestamped lines when not on a terminal (files, pipes, 0-column ptys), a bar on a
terminal, silence when disabled; and the lines the coalition cache, tiny-MoE training and the
held-out NLL evaluation print with stderr redirected."""

from __future__ import annotations

import io
import os
import re
import sys
import time
import types
from pathlib import Path

import pytest
import torch
from tiny_models import write_texts

import msa_edit.progress as progress_module
from msa_edit.errors import MsaEditError
from msa_edit.evaluate.language import language_nll
from msa_edit.progress import EVERY_ENV, Progress
from msa_edit.shapley import estimate
from msa_edit.shapley.cache import CoalitionCache
from msa_edit.tiny_moe import TinyMoeConfig, build_tiny_moe, heldout_texts, load_tiny_moe

STAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d "
TINY = TinyMoeConfig(
    layers=1, experts=2, top_k=1, hidden=16, intermediate=16, heads=2, vocab=300, seq_len=16,
    batch_size=2, steps=3,
)  # fmt: skip


@pytest.fixture
def clock(monkeypatch) -> list[float]:
    """A hand-moved clock for `msa_edit.progress` (set `clock[0]`); wall-clock stamps stay real."""
    now = [0.0]
    fake = types.SimpleNamespace(monotonic=lambda: now[0], strftime=time.strftime)
    monkeypatch.setattr(progress_module, "time", fake)
    return now


@pytest.fixture(autouse=True)
def no_env(monkeypatch) -> None:
    monkeypatch.delenv(EVERY_ENV, raising=False)


def lines_of(text: str, *, only_ours: bool = False) -> list[str]:
    """The progress lines without their timestamps (each must have one, unless `only_ours`:
    then other lines, e.g. `datasets`' own bars, are left out)."""
    out = []
    for line in text.splitlines():
        if only_ours and not re.match(STAMP, line):
            continue
        assert re.match(STAMP, line), line
        out.append(line[20:])
    return out


def test_a_line_per_update_with_count_rate_and_eta(clock) -> None:
    out = io.StringIO()
    with Progress(4, "coalitions", "coal", every_s=0, stream=out) as bar:
        clock[0] = 2.0
        bar.update()
        clock[0] = 4.0
        bar.set_postfix(max_stderr=0.01234)
        bar.update(2)
        clock[0] = 5.0
        bar.update()
    assert lines_of(out.getvalue()) == [
        "coalitions 1/4 (25%), 2.0 s/coal, ETA 6.0s",
        "coalitions 3/4 (75%), 1.3 s/coal, ETA 1.3s, max stderr 0.0123",
        "coalitions 4/4 (100%), 1.2 s/coal, elapsed 5.0s, max stderr 0.0123",
    ]  # the last update already said 4/4: no repeated line at close


def test_lines_at_most_every_every_s_and_once_at_the_end(clock) -> None:
    out = io.StringIO()
    bar = Progress(100, "tiny-moe training", "step", every_s=10, stream=out)
    for t in (1, 5, 9, 11, 15, 20):
        clock[0] = t
        bar.update(10)
    assert lines_of(out.getvalue()) == ["tiny-moe training 40/100 (40%), 3.6 step/s, ETA 16s"]
    bar.close()
    bar.close()  # closing twice prints once
    bar.update()  # and updates after close are ignored
    assert lines_of(out.getvalue())[1:] == [
        "tiny-moe training 60/100 (60%), 3.0 step/s, elapsed 20s"
    ]


def test_unknown_total_and_resumed_steps(clock) -> None:
    out = io.StringIO()
    with Progress(None, "blocks", every_s=0, stream=out) as bar:
        clock[0] = 0.5
        bar.update(3)
    with Progress(10, "coalitions", "coal", every_s=0, stream=out, initial=6) as bar:
        clock[0] = 2.5
        bar.update(2)
    assert lines_of(out.getvalue()) == [
        "blocks 3, 6.0 it/s",
        "coalitions 8/10 (80%), 1.0 coal/s, ETA 2.0s",  # rate counts this run's steps only
    ]


def test_nothing_done_prints_nothing(capsys) -> None:
    Progress(5, "coalitions", every_s=0).close()
    assert capsys.readouterr().err == ""


def test_disabled_prints_nothing(capsys) -> None:
    out = io.StringIO()
    with Progress(3, "coalitions", enabled=False, every_s=0, stream=out) as bar:
        bar.update(3)
        bar.set_postfix(loss=1.0)
    with Progress(3, "coalitions", enabled=False, every_s=0) as bar:
        bar.update(3)
    assert out.getvalue() == "" and capsys.readouterr() == ("", "")


def test_env_overrides_every_s(monkeypatch) -> None:
    out = io.StringIO()
    monkeypatch.setenv(EVERY_ENV, "0")
    with Progress(3, "steps", every_s=3600, stream=out) as bar:
        bar.update()
        bar.update()
    assert [line.split(",")[0] for line in lines_of(out.getvalue())] == [
        "steps 1/3 (33%)",
        "steps 2/3 (66%)",
    ]
    monkeypatch.setenv(EVERY_ENV, "soon")
    with pytest.raises(MsaEditError, match="MSA_EDIT_PROGRESS_EVERY='soon' is not a number"):
        Progress(3, "steps")
    Progress(3, "steps", enabled=False).close()  # silent progress never reads it


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs a Linux pty")
def test_bar_on_a_terminal_lines_on_a_zero_column_pty(clock) -> None:
    import fcntl
    import pty
    import select
    import struct
    import termios

    master, slave = pty.openpty()
    try:
        with os.fdopen(slave, "w", closefd=False) as tty:
            fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 0, 0, 0))
            with Progress(2, "zero", every_s=0, stream=tty) as bar:
                assert bar.lines
                bar.update(2)
            fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
            with Progress(2, "wide", every_s=0, stream=tty) as bar:
                assert not bar.lines
                bar.update(2)
        chunks = []
        while select.select([master], [], [], 0.5)[0]:
            chunks.append(os.read(master, 1 << 16))
        shown = b"".join(chunks).decode()
    finally:
        os.close(master)
        os.close(slave)
    assert re.search(STAMP + r"zero 2/2 \(100%\)", shown)
    assert re.search(r"\rwide: +\d+%", shown) and not re.search(STAMP + "wide", shown)


def count(c: torch.Tensor) -> torch.Tensor:
    return c.sum(1, keepdim=True).double()


def test_coalition_cache_prints_lines_when_stderr_is_redirected(capsys, monkeypatch) -> None:
    monkeypatch.setenv(EVERY_ENV, "0")
    everything = torch.tensor([[bool(i >> j & 1) for j in range(4)] for i in range(16)])
    cache = CoalitionCache(count, 4, batch_size=4, progress=None, total=16)
    cache.get(everything[:8])
    cache.set_postfix(max_stderr=0.25)
    cache.get(everything)
    cache.close()
    lines = lines_of(capsys.readouterr().err)
    assert [line.split(",")[0] for line in lines] == [
        f"coalitions {n}/16 ({100 * n // 16}%)" for n in (4, 8, 12, 16)
    ]
    assert "coal/s" in lines[0] and "ETA" in lines[0]
    assert lines[-1].endswith("max stderr 0.25") and "elapsed" in lines[-1]
    quiet = CoalitionCache(count, 4, progress=False, total=16)
    quiet.get(everything)
    quiet.close()
    assert capsys.readouterr().err == ""


def test_estimate_prints_lines_and_the_same_bits(capsys, monkeypatch) -> None:
    game = lambda c: c.double() @ torch.arange(1.0, 7.0, dtype=torch.float64)  # noqa: E731
    quiet = estimate(game, 6, method="kernel", budget=40, batch_size=8, progress=False)
    assert capsys.readouterr().err == ""
    monkeypatch.setenv(EVERY_ENV, "0")
    shown = estimate(game, 6, method="kernel", budget=40, batch_size=8)
    lines = lines_of(capsys.readouterr().err)
    assert lines and all(line.startswith("coalitions ") for line in lines)
    assert "/40 (" in lines[-1] and "max stderr" in lines[-1]
    assert torch.equal(quiet.values, shown.values) and torch.equal(quiet.stderr, shown.stderr)


@pytest.fixture(scope="module")
def texts(tmp_path_factory) -> dict[str, Path]:
    return write_texts(tmp_path_factory.mktemp("texts"), ("en", "de"), 60)


def test_tiny_moe_training_prints_progress_and_where_the_model_is(
    texts, tmp_path, capsys, monkeypatch
) -> None:
    rng = torch.get_rng_state()
    quiet = build_tiny_moe(texts, tmp_path / "quiet", config=TINY)
    first, summary = lines_of(capsys.readouterr().err)  # 30 s between lines by default
    assert first.startswith("tiny-moe training 3/3 (100%), ") and ", elapsed " in first
    assert summary.startswith("tiny-moe: trained in ") and f", saved to {quiet}; " in summary
    monkeypatch.setenv(EVERY_ENV, "0")
    monkeypatch.setenv("MSA_EDIT_CACHE", str(tmp_path / "cache"))
    cached = build_tiny_moe(texts, config=TINY)
    lines = lines_of(capsys.readouterr().err)
    assert [line.split(",")[0] for line in lines[:3]] == [
        f"tiny-moe training {n}/3 ({100 * n // 3}%)" for n in (1, 2, 3)
    ]
    assert all(re.search(r", loss \d", line) for line in lines[:3])
    assert cached.parent == tmp_path / "cache" / "tiny-moe"
    assert re.fullmatch(
        rf"tiny-moe: trained in \S+, cached in {re.escape(str(cached))}; steps 3, "
        r"train loss \d+\.\d{3} -> \d+\.\d{3}, held-out NLL de \d+\.\d{3} en \d+\.\d{3}",
        lines[-1],
    ), lines[-1]
    assert build_tiny_moe(texts, config=TINY) == cached
    (again,) = lines_of(capsys.readouterr().err)
    assert again.startswith(f"tiny-moe: reusing the model cached in {cached}; steps 3, train loss")
    assert torch.equal(torch.get_rng_state(), rng), "progress must not touch the global RNG"
    assert (quiet / "model.safetensors").read_bytes() == (cached / "model.safetensors").read_bytes()


def test_language_nll_counts_blocks(texts, tmp_path, capsys, monkeypatch) -> None:
    path = build_tiny_moe(texts, tmp_path / "m", config=TINY)
    model, tokenizer, _ = load_tiny_moe(path)
    held = {lang: path / "heldout" / f"{lang}.txt" for lang in heldout_texts(path)}
    capsys.readouterr()
    kwargs = {"n_seq": 3, "seq_len": 8, "batch_size": 2}
    quiet = language_nll(model, tokenizer, held, progress=False, **kwargs)
    assert lines_of(capsys.readouterr().err, only_ours=True) == []
    monkeypatch.setenv(EVERY_ENV, "0")
    assert language_nll(model, tokenizer, held, **kwargs) == quiet
    lines = lines_of(capsys.readouterr().err, only_ours=True)
    assert [line.split(",")[0] for line in lines] == [
        f"language NLL {n}/6 ({100 * n // 6}%)" for n in (2, 3, 5, 6, 6)
    ]  # the last line adds the last language's NLL
    assert lines[-1].endswith(f"nll de {quiet['nll/de']:.3f} en {quiet['nll/en']:.3f}")
