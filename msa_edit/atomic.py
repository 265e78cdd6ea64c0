"""Atomic file writes: a reader sees the old file or the new one, never half of one.

>>> import tempfile
>>> with tempfile.TemporaryDirectory() as d:
...     p = write_json(Path(d) / "a.json", {"x": 1})
...     p.read_text(), sorted(q.name for q in Path(d).iterdir())
('{\\n  "x": 1\\n}\\n', ['a.json'])
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from msa_edit.errors import MsaEditError

TMP_SUFFIX = ".tmp"
TMP_INFIX = ".tmp-"
"""`.NAME.tmp-*`: a folder being written (`staged_dir`)."""
OLD_INFIX = ".old-"
"""`.NAME.old-*`: a replaced folder set aside (only where no atomic swap exists)."""


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A fresh temporary path beside `path` to write to; fsynced and renamed onto `path` (mode
    0644, directory fsynced) when the block succeeds, deleted when it raises.

    The temporary name is unique and created exclusively (`mkstemp`), so a file or symlink
    planted at a predictable name is never written through; its `.NAME.*.tmp` form is what
    `rundir.clean_stale` removes after a killed write.
    """
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=TMP_SUFFIX)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        tmp.chmod(0o644)
        fsync_path(tmp)
        os.replace(tmp, out)
        fsync_path(out.parent)
    finally:
        tmp.unlink(missing_ok=True)


def fsync_path(path: str | os.PathLike[str]) -> None:
    """Flush a file's or a directory's contents to disk (what makes a rename durable)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) * Path(path).is_dir())
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str | os.PathLike[str]) -> None:
    """fsync every file and directory under `root` (before a staged folder is renamed in)."""
    for folder, _, files in os.walk(root):
        for name in files:
            fsync_path(Path(folder) / name)
        fsync_path(folder)


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


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux `renameat2(RENAME_EXCHANGE)`); False where the
    system or file system cannot."""
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    rc = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def replace_dir(new: str | os.PathLike[str], out: str | os.PathLike[str]) -> Path:
    """Put the finished folder `new` at `out`, never leaving a moment without `out`.

    An existing `out` is swapped with `new` in one atomic step and its old contents, now at
    `new`, are deleted (a kill before that leaves them under `new`'s hidden temporary name, for
    `rundir.clean_stale`). Where no atomic swap exists the old folder is set aside as
    `.NAME.old-*` first, which `rundir.clean_stale` puts back if a kill left no `out`.
    """
    new, out = Path(new), Path(out)
    fsync_tree(new)
    if not out.exists():
        os.replace(new, out)
    elif _exchange(new, out):
        shutil.rmtree(new, ignore_errors=True)
    else:
        old = out.parent / f".{out.name}{OLD_INFIX}{os.urandom(4).hex()}"
        os.replace(out, old)
        try:
            os.replace(new, out)
        except BaseException:
            os.replace(old, out)
            raise
        shutil.rmtree(old, ignore_errors=True)
    fsync_path(out.parent)
    return out


@contextmanager
def staged_dir(out: str | os.PathLike[str]) -> Iterator[Path]:
    """A fresh hidden folder beside `out` to fill; it replaces `out` (`replace_dir`) when the
    block succeeds and is deleted when it raises."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}{TMP_INFIX}", dir=out.parent))
    try:
        yield tmp
        tmp.chmod(0o755)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class _NotFinite(ValueError):
    """A JSON NaN or Infinity literal."""


def _no_constant(name: str) -> Any:
    raise _NotFinite(name)


def read_json(path: str | os.PathLike[str], fix: str) -> Any:
    """Strict UTF-8 JSON from `path` (no NaN or Infinity); any problem is one `MsaEditError` line
    ending in `fix`.

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as d:
    ...     _ = (Path(d) / "a.json").write_text('{"x": NaN}')
    ...     try:
    ...         read_json(Path(d) / "a.json", "fix it")
    ...     except MsaEditError as exc:
    ...         print(str(exc).split(": ", 1)[1])
    NaN is not a finite number (strict JSON); fix it
    """
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        reason = exc.strerror or exc.__class__.__name__
        raise MsaEditError(f"cannot read {path} ({reason}); {fix}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MsaEditError(
            f"cannot read {path}: not UTF-8 text (byte {exc.start}); {fix}"
        ) from None
    try:
        return json.loads(text, parse_constant=_no_constant)
    except _NotFinite as exc:
        raise MsaEditError(
            f"cannot read {path}: {exc} is not a finite number (strict JSON); {fix}"
        ) from None
    except json.JSONDecodeError as exc:
        raise MsaEditError(
            f"cannot read {path}: not valid JSON at line {exc.lineno}, column {exc.colno} "
            f"({exc.msg}); {fix}"
        ) from None
    except RecursionError:
        raise MsaEditError(f"cannot read {path}: nested too deeply; {fix}") from None
    except ValueError as exc:  # e.g. an integer of more digits than Python converts
        raise MsaEditError(f"cannot read {path} ({str(exc).split(':')[0]}); {fix}") from None
