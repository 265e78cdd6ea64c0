"""The run directory: its file names, an exclusive lock while a stage works in it, and the cleanup
of what killed writes left behind.

`locked(out)` is held by every stage (`msa-edit run`, `analyze`, …, and the Python API): a second
process on the same directory is refused in one line naming the holder's pid. The lock is an
`flock` on `.msa-edit.lock`, so the kernel releases it when the holder dies, even by kill -9 —
a dead holder's lock is never "stale". On taking it, `clean_stale` deletes the hidden temporary
files and folders of writes that a kill interrupted and puts back a model folder that a kill
left set aside. A directory that `locked` created and that is still empty on an error is removed,
so a failed first stage leaves no trace.

>>> import tempfile
>>> with tempfile.TemporaryDirectory() as d:
...     with locked(Path(d) / "run") as out:
...         names = sorted(p.name for p in out.iterdir())
...     names, (Path(d) / "run").exists()
(['.msa-edit.lock'], True)
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from msa_edit.atomic import OLD_INFIX, TMP_INFIX, TMP_SUFFIX
from msa_edit.errors import MsaEditError

SHAPLEY_JSON = "shapley.json"
SHAPLEY_TENSOR = "shapley.safetensors"
CHECKPOINT = "shapley.ckpt"
SEARCH_CHECKPOINT = "search.ckpt"
SCREEN_JSON = "screen.json"
PLAN_JSON = "plan.json"
EDIT_JSON = "edit.json"
EVAL_JSON = "eval.json"
MODEL_DIR = "model"
RECIPE_YAML = "recipe.yaml"
REPORT_MD = "report.md"
LOCK = ".msa-edit.lock"
OBSOLETE = ("shapley.game.json", "search.game.json")
"""Game keys kept beside checkpoints by older versions; the key now lives inside the checkpoint."""

_held: dict[Path, int] = {}


@contextmanager
def locked(out: str | os.PathLike[str]) -> Iterator[Path]:
    """Hold the run directory `out` (created if missing) for this process; re-entrant.

    >>> # with locked("runs/demo") as out: ...
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise MsaEditError(f"--out {out} is a file; give a directory path for the run")
    key = out.resolve()
    if key in _held:
        _held[key] += 1
        try:
            yield out
        finally:
            _held[key] -= 1
        return
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MsaEditError(
            f"cannot create run directory {out} ({exc.strerror}); choose another --out"
        ) from None
    fd = _acquire(out, created)
    _held[key] = 1
    failed = False
    try:
        clean_stale(out)
        yield out
    except BaseException:
        failed = True
        raise
    finally:
        del _held[key]
        (out / LOCK).unlink(missing_ok=True)
        os.close(fd)  # unlink first: a waiter that opened the old file retries on the new one
        if failed and created:
            _remove_if_empty(out)


def _acquire(out: Path, created: bool) -> int:
    """Open and `flock` the lock file, writing our pid into it; refuse if another process holds
    it."""
    path = out / LOCK
    for _ in range(10):
        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | os.O_CLOEXEC
        try:
            fd = os.open(path, flags, 0o644)
        except OSError as exc:
            raise MsaEditError(
                f"cannot create the lock file {path} ({exc.strerror}); check the run directory"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _holder(fd)
            for _ in range(20):  # the holder writes its pid just after it locks: wait for it
                if holder != UNKNOWN_HOLDER:
                    break
                time.sleep(0.01)
                holder = _holder(fd)
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise MsaEditError(
                f"run directory {out} is in use by {holder}; wait for it to finish or use "
                "another --out"
            ) from None
        try:  # the holder before us may have unlinked the file after we opened it
            same = os.path.samestat(os.fstat(fd), os.stat(path, follow_symlinks=False))
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
            return fd
        os.close(fd)
    raise MsaEditError(f"could not lock {path}: it keeps changing; is another run starting?")


UNKNOWN_HOLDER = "another process"


def _holder(fd: int) -> str:
    """`process PID on HOST` from a held lock file's text."""
    try:
        text = os.pread(fd, 200, 0).decode(errors="replace").split()
    except OSError:
        text = []
    if len(text) >= 2 and text[0].isdigit():
        return f"process {text[0]} on {text[1][:64]}"
    return UNKNOWN_HOLDER


def _remove_if_empty(out: Path) -> None:
    with suppress(OSError):
        out.rmdir()


def stale_paths(out: str | os.PathLike[str]) -> list[Path]:
    """Hidden temporary files and folders of interrupted writes directly in `out`.

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as d:
    ...     for name in (".plan.json.x1.tmp", ".model.tmp-ab", "plan.json"):
    ...         _ = (Path(d) / name).write_text("")
    ...     [p.name for p in stale_paths(d)]
    ['.model.tmp-ab', '.plan.json.x1.tmp']
    """
    found = []
    for path in sorted(Path(out).iterdir()):
        name = path.name
        if not name.startswith(".") or name == LOCK:
            continue
        if name.endswith(TMP_SUFFIX) or TMP_INFIX in name or OLD_INFIX in name:
            found.append(path)
    return found


def clean_stale(out: str | os.PathLike[str]) -> list[Path]:
    """Delete what interrupted writes left in `out`; returns what was deleted. A model folder set
    aside by a replacement that a kill interrupted (`.model.old-*` with no `model/`) is put back.
    """
    out = Path(out)
    model = out / MODEL_DIR
    removed = []
    for path in stale_paths(out):
        if OLD_INFIX in path.name and path.name.startswith(f".{MODEL_DIR}.") and not model.exists():
            os.replace(path, model)
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    for name in OBSOLETE:
        (out / name).unlink(missing_ok=True)
    return removed
