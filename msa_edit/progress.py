"""Progress that shows wherever the output goes: a bar on a terminal, timestamped lines elsewhere.

On a terminal (a TTY with a width) `Progress` draws a `tqdm` bar. Anywhere else (stderr redirected
to a file, `nohup`, a scheduler, CI, a 0-column pty) it prints a plain line to stderr at most every
`every_s` seconds and once at the end, e.g.

    2026-12-02 18:01:02 coalitions 120/512 (23%), 4.1 coal/s, ETA 1m35s, max stderr 0.012

`MSA_EDIT_PROGRESS_EVERY` (seconds) overrides `every_s` everywhere (e.g. `=0` for a line per
update, `=600` for quiet logs). Progress only reads the clock: it never touches an RNG, so runs
give the same bits with it on or off.
"""

from __future__ import annotations

import math
import os
import sys
import time
from types import TracebackType
from typing import TextIO

from tqdm import tqdm

from msa_edit.errors import MsaEditError

__all__ = ["EVERY_ENV", "Progress", "format_duration", "note"]

EVERY_ENV = "MSA_EDIT_PROGRESS_EVERY"
"""Environment variable: seconds between progress lines when not on a terminal."""


def format_duration(seconds: float) -> str:
    """A short human duration.

    >>> [format_duration(s) for s in (0.42, 42, 95, 3 * 3600 + 125)]
    ['0.4s', '42s', '1m35s', '3h02m']
    """
    if seconds < 10:
        return f"{seconds:.1f}s"
    whole = round(seconds)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"


def _timestamp() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")


def note(message: str, *, stream: TextIO | None = None) -> None:
    """Print `message` as one timestamped line to stderr (or `stream`), flushed at once.

    >>> import io
    >>> out = io.StringIO()
    >>> note("tiny-moe: done", stream=out)
    >>> out.getvalue().endswith(" tiny-moe: done\\n")
    True
    """
    stream = sys.stderr if stream is None else stream
    print(f"{_timestamp()} {message}", file=stream, flush=True)


def _every(every_s: float) -> float:
    """`every_s`, or the seconds `MSA_EDIT_PROGRESS_EVERY` gives."""
    raw = os.environ.get(EVERY_ENV, "").strip()
    if not raw:
        return every_s
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not value >= 0 or math.isinf(value):
        raise MsaEditError(
            f"{EVERY_ENV}={raw!r} is not a number of seconds >= 0; set it to e.g. 30, or unset it"
        )
    return value


def _terminal_columns(stream: TextIO) -> int:
    """The width of the terminal `stream` writes to; 0 when it is not a terminal."""
    try:
        if not stream.isatty():
            return 0
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError):
        return 0


def _format_value(value: float | str) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


class Progress:
    """Progress of `total` steps (None: unknown): a bar on a terminal, timestamped lines elsewhere.

    `enabled=False` is silent; `None` (auto) and `True` show progress: a `tqdm` bar when the
    stream (default stderr) is a terminal with columns > 0, otherwise a line at most every
    `every_s` seconds (`MSA_EDIT_PROGRESS_EVERY` overrides it) and one when closed. `initial`
    counts steps done before (e.g. resumed); rates and ETAs count only this run's.
    `set_postfix(name=value)` adds running numbers (`max_stderr=0.012` prints as
    `max stderr 0.012`).

    >>> import io
    >>> out = io.StringIO()
    >>> with Progress(4, "coalitions", "coal", every_s=3600, stream=out) as bar:
    ...     bar.update(3)
    ...     bar.set_postfix(max_stderr=0.0123)
    ...     bar.update()
    >>> line = out.getvalue().splitlines()[-1]
    >>> line[20:].split(", ")[0], line.endswith("max stderr 0.0123")
    ('coalitions 4/4 (100%)', True)
    """

    def __init__(
        self,
        total: int | None,
        desc: str,
        unit: str = "it",
        *,
        enabled: bool | None = None,
        every_s: float = 30.0,
        stream: TextIO | None = None,
        initial: int = 0,
    ) -> None:
        self.total = total
        self.desc = desc
        self.unit = unit
        self.n = initial
        self.every_s = every_s if enabled is False else _every(every_s)
        self._initial = initial
        self._stream = sys.stderr if stream is None else stream
        self._postfix: dict[str, float | str] = {}
        self._start = self._last = time.monotonic()
        self._printed: tuple[int, dict[str, float | str]] | None = None
        self._closed = enabled is False
        self._bar: tqdm | None = None
        if not self._closed and _terminal_columns(self._stream) > 0:
            self._bar = tqdm(
                total=total, initial=initial, desc=desc, unit=unit, file=self._stream,
                dynamic_ncols=True, leave=False,
            )  # fmt: skip

    @property
    def enabled(self) -> bool:
        """Whether anything is (still) shown."""
        return not self._closed

    @property
    def lines(self) -> bool:
        """Whether progress goes out as plain lines (not a terminal bar)."""
        return self.enabled and self._bar is None

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        """Count `n` more steps done; prints a line if `every_s` has passed since the last."""
        if self._closed:
            return
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.monotonic()
        if now - self._last >= self.every_s:
            self._print(now, final=False)

    def set_postfix(self, **numbers: float | str) -> None:
        """Show running numbers beside the count (replacing the previous ones)."""
        if self._closed:
            return
        self._postfix = dict(numbers)
        if self._bar is not None:
            shown = {k.replace("_", " "): _format_value(v) for k, v in numbers.items()}
            self._bar.set_postfix(shown, refresh=False)

    def close(self) -> None:
        """Close the bar, or print the last line (unless the last one printed said the same)."""
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        elif self.n != self._initial and self._printed != (self.n, self._postfix):
            self._print(time.monotonic(), final=True)

    def _line(self, now: float, *, final: bool) -> str:
        """The text of a progress line (without the timestamp)."""
        elapsed = now - self._start
        done = self.n - self._initial
        count = f"{self.desc} {self.n}"
        if self.total:
            count += f"/{self.total} ({100 * self.n // self.total}%)"
        parts = [count]
        rate = done / elapsed if done > 0 and elapsed > 0 else 0.0
        if rate >= 1:
            parts.append(f"{rate:.1f} {self.unit}/s")
        elif rate > 0:
            parts.append(f"{1 / rate:.1f} s/{self.unit}")
        if final or (self.total is not None and self.n >= self.total):
            parts.append(f"elapsed {format_duration(elapsed)}")
        elif self.total is not None and rate > 0:
            parts.append(f"ETA {format_duration((self.total - self.n) / rate)}")
        parts += [f"{k.replace('_', ' ')} {_format_value(v)}" for k, v in self._postfix.items()]
        return ", ".join(parts)

    def _print(self, now: float, *, final: bool) -> None:
        note(self._line(now, final=final), stream=self._stream)
        self._last = now
        self._printed = (self.n, self._postfix)
