"""A model's checkpoint on disk: its folder (local, or a Hub snapshot), its safetensors shards,
and its tensor names as the transformers 5 module tree names them.

>>> # shards = checkpoint_shards(model_folder("path/to/mixtral"))
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from msa_edit.errors import MsaEditError
from msa_edit.units import ARCHITECTURES

_WEIGHTS_INDEX = "model.safetensors.index.json"
_WEIGHTS_FILE = "model.safetensors"


def model_folder(path_or_id: str | Path) -> Path:
    """A local model directory: `path_or_id` itself or a Hub snapshot (configs, safetensors)."""
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return path
    if path.exists() or str(path_or_id).count("/") > 1:
        raise MsaEditError(
            f"{path_or_id} is not a model directory; pass a directory with config.json"
        )
    try:
        from huggingface_hub import snapshot_download

        patterns = ["*.json", "*.safetensors", "*.model", "*.txt"]
        return Path(snapshot_download(str(path_or_id), allow_patterns=patterns))
    except Exception as exc:
        raise MsaEditError(
            f"could not find {path_or_id!r} locally or on the Hub ({type(exc).__name__}); "
            "pass a local model directory or check the id and network"
        ) from exc


def checkpoint_shards(folder: Path) -> list[Path]:
    """The safetensors files of the checkpoint in `folder`, in index order."""
    index = folder / _WEIGHTS_INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [folder / f for f in dict.fromkeys(weight_map.values())]
    if (folder / _WEIGHTS_FILE).is_file():
        return [folder / _WEIGHTS_FILE]
    raise MsaEditError(
        f"{folder} has no safetensors weights; "
        "re-save the model with save_pretrained (safetensors is its default)"
    )


def iter_checkpoint(shards: list[Path]) -> Iterator[tuple[str, Any]]:
    """(key, safetensors handle) for every tensor of every shard, one shard open at a time."""
    from safetensors import safe_open

    for shard in shards:
        with safe_open(str(shard), framework="pt", device="cpu") as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                yield key, handle


def checkpoint_key(key: str, model_type: str) -> str:
    """A checkpoint's tensor name as the transformers 5 module tree names it (older Mixtral
    checkpoints say `block_sparse_moe` where transformers 5 says `mlp`)."""
    arch = ARCHITECTURES.get(model_type)
    for old, new in arch.checkpoint_renames if arch is not None else ():
        key = key.replace(old, new)
    return key
