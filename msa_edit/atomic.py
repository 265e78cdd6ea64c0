"""Atomic file writes: a reader sees the old file or the new one, never half of one.

>>> import tempfile
>>> with tempfile.TemporaryDirectory() as d:
...     p = write_json(Path(d) / "a.json", {"x": 1})
...     p.read_text(), sorted(q.name for q in Path(d).iterdir())
('{\\n  "x": 1\\n}\\n', ['a.json'])
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from msa_edit.errors import MsaEditError


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary path beside `path` to write to; renamed onto `path` (mode 0644) when the block
    succeeds, deleted when it raises."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        tmp.chmod(0o644)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """Write `obj` as indented strict JSON (NaN and infinity are refused) to `path` atomically."""
    try:
        text = json.dumps(obj, indent=2, allow_nan=False) + "\n"
    except ValueError as exc:
        raise MsaEditError(f"{path}: {exc}; strict JSON holds finite numbers only") from None
    return write_text(path, text)
