"""Read and write safetensors files a slab at a time, with plain file I/O (no memory map).

A safetensors file is an 8-byte little-endian header length, a JSON header (per tensor: dtype,
shape, `data_offsets` into the data section) and the raw little-endian data. Reading byte ranges
with `pread` and writing tensors as a stream of chunks keeps a process's resident memory at one
chunk, whatever the file size — a memory-mapped read would count every touched page of a
multi-GB shard in the process's RSS. Files written here load with `safetensors` and
`transformers` like any other.

>>> import tempfile
>>> t = torch.arange(6, dtype=torch.float32).reshape(3, 2)
>>> with tempfile.TemporaryDirectory() as d:
...     path = Path(d) / "a.safetensors"
...     _ = write_tensors(path, [Entry("t", "F32", (3, 2), lambda: iter([to_bytes(t)]))])
...     info = read_header(path)["t"]
...     back = to_tensor(read_range(path, info.begin, info.nbytes), info.dtype, info.shape)
>>> torch.equal(back, t), info.shape
(True, (3, 2))
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from msa_edit.errors import MsaEditError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
"""safetensors dtype names and their torch dtypes."""
CHUNK = 64 << 20
"""Bytes copied per read/write when a tensor is copied whole."""


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a file: dtype name, shape and absolute byte range in the file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def itemsize(self) -> int:
        return DTYPES[self.dtype].itemsize


@dataclass(frozen=True)
class Entry:
    """One tensor to write: its name, dtype name, shape and a producer of its bytes, in order."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    chunks: Callable[[], Iterator[bytes]]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPES[self.dtype].itemsize


def read_header(path: str | os.PathLike[str]) -> dict[str, TensorInfo]:
    """The tensors of a safetensors file, in file order (metadata left out)."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(size))
    except (OSError, struct.error, ValueError) as exc:
        raise MsaEditError(
            f"{path} is not a readable safetensors file ({exc.__class__.__name__}); "
            "check the checkpoint"
        ) from None
    start = 8 + size
    infos = [
        TensorInfo(name, meta["dtype"], tuple(meta["shape"]),
                   start + meta["data_offsets"][0], start + meta["data_offsets"][1])
        for name, meta in header.items()
        if name != "__metadata__"
    ]  # fmt: skip
    unknown = sorted({i.dtype for i in infos} - set(DTYPES))
    if unknown:
        raise MsaEditError(f"{path} holds tensors of dtype {unknown}, which msa_edit cannot copy")
    return {i.name: i for i in sorted(infos, key=lambda i: i.begin)}


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The file's `__metadata__` (string pairs; `{}` when absent)."""
    with open(path, "rb") as fh:
        (size,) = struct.unpack("<Q", fh.read(8))
        return dict(json.loads(fh.read(size)).get("__metadata__") or {})


def read_range(path: str | os.PathLike[str], begin: int, length: int) -> bytes:
    """`length` bytes of the file from offset `begin`."""
    fd = os.open(path, os.O_RDONLY)
    try:
        out = os.pread(fd, length, begin)
    finally:
        os.close(fd)
    if len(out) != length:
        raise MsaEditError(f"{path} is truncated (wanted {length} bytes at {begin})")
    return out


def copy_chunks(path: str | os.PathLike[str], info: TensorInfo) -> Iterator[bytes]:
    """A whole tensor's bytes, `CHUNK` at a time."""
    for start in range(info.begin, info.end, CHUNK):
        yield read_range(path, start, min(CHUNK, info.end - start))


def to_bytes(tensor: torch.Tensor) -> bytes:
    """A tensor's raw little-endian bytes (C order)."""
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def to_tensor(raw: bytes, dtype: str, shape: Sequence[int]) -> torch.Tensor:
    """The tensor stored in `raw`."""
    flat = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    return flat.view(DTYPES[dtype]).reshape(tuple(shape))


def dtype_name(dtype: torch.dtype) -> str:
    """The safetensors name of a torch dtype."""
    names = {v: k for k, v in DTYPES.items()}
    if dtype not in names:
        raise MsaEditError(f"dtype {dtype} cannot be written to safetensors here")
    return names[dtype]


def write_tensors(
    path: str | os.PathLike[str],
    entries: Sequence[Entry],
    metadata: Mapping[str, str] | None = None,
) -> int:
    """Write `entries` to a new safetensors file, streaming each entry's chunks; returns the bytes
    of tensor data written. The file is fsynced; a producer yielding the wrong number of bytes is
    an error (and the partial file is removed)."""
    header: dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for e in entries:
        header[e.name] = {"dtype": e.dtype, "shape": list(e.shape),
                          "data_offsets": [offset, offset + e.nbytes]}  # fmt: skip
        offset += e.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    path = Path(path)
    try:
        with open(path, "xb") as fh:
            fh.write(struct.pack("<Q", len(text)) + text)
            for e in entries:
                written = 0
                for chunk in e.chunks():
                    fh.write(chunk)
                    written += len(chunk)
                if written != e.nbytes:
                    raise MsaEditError(f"{e.name}: wrote {written} bytes, expected {e.nbytes}")
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return offset
