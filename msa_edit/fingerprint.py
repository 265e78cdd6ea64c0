"""Content fingerprints: what a game's coalition values depend on, so a stored value is reused only
for the same model weights, tokenizer, data and settings.

A fingerprint is a flat `{name: value}` dict of strings and numbers (`"model/model.safetensors":
"sha256:…"`, `"targets.fr.text": "sha256:…"`, `"setting.rows_per_forward": 8`); `changes(old, new)`
names the entries that differ, for the error that refuses a stale checkpoint.

>>> import tempfile
>>> with tempfile.TemporaryDirectory() as d:
...     _ = (Path(d) / "config.json").write_text("{}")
...     sorted(folder_digests(d, prefix="model/"))
['model/config.json']
>>> changes({"a": 1, "b": 2}, {"a": 1, "b": 3, "c": 4})
['b', 'c']
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TypeAlias

Value: TypeAlias = str | int | float | bool | None
Fingerprint = dict[str, Value]

FULL_HASH_LIMIT = 512 << 20
"""Files up to this size are hashed whole; larger ones (checkpoint shards) by their size and
`SAMPLES` evenly spaced windows, which a replaced or re-trained file changes almost surely."""
SAMPLES = 256
WINDOW = 64 << 10


def file_digest(path: str | os.PathLike[str]) -> str:
    """`sha256:<hex>` of a file's bytes (or `sampled-sha256:<hex>` of its size and windows when
    it is larger than `FULL_HASH_LIMIT`)."""
    p = Path(path)
    size = p.stat().st_size
    h = hashlib.sha256()
    with open(p, "rb") as fh:
        if size <= FULL_HASH_LIMIT:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
            return f"sha256:{h.hexdigest()}"
        h.update(str(size).encode())
        step = (size - WINDOW) // (SAMPLES - 1)
        for i in range(SAMPLES):
            fh.seek(i * step)
            h.update(fh.read(WINDOW))
    return f"sampled-sha256:{h.hexdigest()}"


def folder_digests(folder: str | os.PathLike[str], prefix: str = "") -> Fingerprint:
    """`{prefix + relative path: digest}` of every regular file under `folder` (hidden names and
    the model card, which does not change any output, excluded)."""
    root = Path(folder)
    out: Fingerprint = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or not path.is_file():
            continue
        if rel.name == "README.md":
            continue
        out[prefix + rel.as_posix()] = file_digest(path)
    return out


def flatten(obj: object, prefix: str) -> Fingerprint:
    """Nested settings as flat `{prefix.key: value}` entries (lists as JSON text).

    >>> flatten({"a": {"b": 1}, "c": [1, 2]}, "setting")
    {'setting.a.b': 1, 'setting.c': '[1, 2]'}
    """
    if isinstance(obj, Mapping):
        out: Fingerprint = {}
        for key, value in obj.items():
            out |= flatten(value, f"{prefix}.{key}")
        return out
    if isinstance(obj, (list, tuple)):
        return {prefix: json.dumps(obj, sort_keys=True)}
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return {prefix: obj}
    return {prefix: str(obj)}


def changes(old: Mapping[str, Value], new: Mapping[str, Value]) -> list[str]:
    """Names whose values differ (or that only one side has), sorted."""
    absent = object()
    return sorted(k for k in set(old) | set(new) if old.get(k, absent) != new.get(k, absent))


def describe_changes(names: list[str], limit: int = 4) -> str:
    """A short list of changed names for an error line.

    >>> describe_changes(["a", "b", "c", "d", "e", "f"])
    'a, b, c, d and 2 more'
    """
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def encode(fingerprint: Mapping[str, Value]) -> str:
    """Canonical JSON text of a fingerprint (what a checkpoint stores and its checksum covers)."""
    return json.dumps(dict(fingerprint), sort_keys=True, separators=(",", ":"))
