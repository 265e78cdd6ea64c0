"""Remove MoE experts from a checkpoint on disk, one tensor slab at a time (the model is never
built): the same edit as `remove_experts` on a loaded model, for checkpoints too large to load in
full precision (Mixtral-8x7B is ~93 GB in bf16).

Expert removal is pure slicing: every tensor whose first axis runs over a layer's experts — the
router's rows (`{moe}.gate.weight`, and any other per-expert router tensor: biases, DeepSeek's
correction bias), the fused expert weights and biases of transformers 5
(`{moe}.experts.gate_up_proj [E, 2I, H]`, `down_proj [E, H, I]`) — keeps the rows of the kept
experts; per-expert tensors of older checkpoints
(`{moe}.experts.{e}.w1|w2|w3.weight`, `gate_proj|up_proj|down_proj`) of removed experts are
dropped and the rest renumbered. Each output shard is written as a stream of slabs (one expert
matrix at most), so resident memory stays at one slab, not one shard. The layout rules are
`removal_layout`'s: at least top-k experts stay per layer, and non-uniform removal needs
`extra="zero"`, which slices the per-layer minimum and zeroes the rest (= the `reroute` lesion of
the sliced experts nested with the `zero` lesion of the others, as the in-memory editor).

>>> # record = slice_checkpoint("mixtral-8x7b/", select(model, "layers.*.experts.7"), "out/")
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from msa_edit.checkpoints import checkpoint_key, checkpoint_shards
from msa_edit.edit.experts import Extra, removal_layout, split_layout
from msa_edit.edit.record import EditRecord, names
from msa_edit.edit.tensorfile import (
    Entry,
    TensorInfo,
    copy_chunks,
    read_header,
    read_metadata,
    read_range,
    write_tensors,
)
from msa_edit.errors import MsaEditError
from msa_edit.progress import Progress
from msa_edit.units import ARCHITECTURES, Architecture, Unit, expert_groups

INDEX = "model.safetensors.index.json"


def slice_checkpoint(
    src: str | os.PathLike[str],
    units: Sequence[Unit],
    dst: str | os.PathLike[str],
    *,
    extra: Extra = "refuse",
) -> EditRecord:
    """Write the checkpoint of `src` (a local model folder) without the experts `units` into the
    empty folder `dst`: shards, index and `config.json` (other files are the caller's). Every
    check runs before anything is written."""
    src, dst = Path(src), Path(dst)
    config = _config(src)
    arch = ARCHITECTURES[config["model_type"]]
    assert arch.n_experts is not None and arch.moe is not None
    total, top_k = int(config[arch.n_experts]), int(config["num_experts_per_tok"])
    shards = checkpoint_shards(src)
    headers = {shard: read_header(shard) for shard in shards}
    roles = {
        key: _role(checkpoint_key(key, config["model_type"]), arch, info, total)
        for header in headers.values()
        for key, info in header.items()
    }
    moe_layers = sorted({role[1] for role in roles.values() if role[0] == "router"})
    groups = expert_groups(config)
    per_layer = removal_layout(units, moe_layers, total, top_k, extra, groups=groups)
    sliced, zeroed = split_layout(per_layer, total, groups)
    common = min((len(e) for e in sliced.values()), default=0)
    if any(os.scandir(dst)):
        raise MsaEditError(f"{dst} is not empty; slice_checkpoint writes into an empty folder")
    before = after = 0
    weight_map: dict[str, str] = {}
    with Progress(len(headers), "edit: shards", "shard") as bar:
        for shard, header in headers.items():
            entries = []
            for key, info in header.items():
                entry = _entry(shard, key, info, roles[key], sliced, zeroed)
                if entry is not None:
                    entries.append(entry)
                    weight_map[entry.name] = shard.name
                    after += math.prod(entry.shape)
                before += math.prod(info.shape)
            write_tensors(dst / shard.name, entries, read_metadata(shard) or None)
            bar.set_postfix(kept=f"{after / 1e6:.1f}M params")
            bar.update()
    if (src / INDEX).is_file():
        index = json.loads((src / INDEX).read_text())
        size = sum((dst / s.name).stat().st_size for s in shards)
        index = {"metadata": {**index.get("metadata", {}), "total_size": size},
                 "weight_map": dict(sorted(weight_map.items()))}  # fmt: skip
        (dst / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    config[arch.n_experts] = total - common
    (dst / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    cut = [Unit(la, "experts", e) for la, es in sliced.items() for e in es]
    zeros = [Unit(la, "experts", e) for la, es in zeroed.items() for e in es]
    notes = [f"sliced out {len(cut)} experts: {', '.join(names(cut)) or 'none'}",
             f"streamed from {len(shards)} shard(s) of {src}"]  # fmt: skip
    if zeros:
        notes.insert(1, f"zeroed {len(zeros)} experts (zero lesion): {', '.join(names(zeros))}")
    matches = "reroute+zero" if zeros else "reroute"
    return EditRecord("remove_experts", names(units), matches, before, after, tuple(notes))


def _config(src: Path) -> dict[str, Any]:
    path = src / "config.json"
    if not path.is_file():
        raise MsaEditError(f"{src} has no config.json; pass a model folder")
    config = dict(json.loads(path.read_text()))
    model_type = config.get("model_type")
    arch = ARCHITECTURES.get(str(model_type))
    if arch is None or arch.moe is None or arch.n_experts is None:
        moe = sorted(k for k, a in ARCHITECTURES.items() if a.moe is not None)
        raise MsaEditError(
            f"{src}: model type {model_type!r} has no experts msa_edit can remove; "
            f"supported: {', '.join(moe)}"
        )
    if config.get("quantization_config"):
        raise MsaEditError(
            f"{src} holds a quantised checkpoint; expert surgery needs the full-precision shards"
        )
    return config


Role = tuple[str, int, int]
"""(what, layer, expert) of a tensor: what is "router" or "fused" (first axis = experts),
"expert" (one expert's tensor; expert = its index) or "other" (copied as it is)."""


def _role(name: str, arch: Architecture, info: TensorInfo, total: int) -> Role:
    """What a (transformers-5-named) tensor is to expert removal."""
    assert arch.moe is not None
    base = rf"(?:^|\.)layers\.(\d+)\.{re.escape(arch.moe)}"
    if m := re.search(base + r"\.experts\.(\d+)\.", name):
        return ("expert", int(m[1]), int(m[2]))
    per_expert_rows = bool(info.shape) and info.shape[0] == total
    if (m := re.search(base + rf"\.{arch.router}\.\w+$", name)) and per_expert_rows:
        return ("router", int(m[1]), -1)
    if (m := re.search(base + r"\.experts\.[A-Za-z_]\w*$", name)) and per_expert_rows:
        return ("fused", int(m[1]), -1)
    return ("other", -1, -1)


def _entry(
    shard: Path,
    key: str,
    info: TensorInfo,
    role: Role,
    sliced: dict[int, list[int]],
    zeroed: dict[int, list[int]],
) -> Entry | None:
    """The output tensor for one input tensor (None when the tensor goes)."""
    what, layer, expert = role
    gone, zero = set(sliced.get(layer, ())), set(zeroed.get(layer, ()))
    if what == "other" or (what in ("router", "fused") and not gone and not zero):
        return Entry(key, info.dtype, info.shape, lambda: copy_chunks(shard, info))
    if what == "expert":
        if expert in gone:
            return None
        new = expert - sum(e < expert for e in gone)
        name = re.sub(rf"\.experts\.{expert}\.", f".experts.{new}.", key, count=1)
        if expert in zero:
            return Entry(name, info.dtype, info.shape, lambda: _zeros(info.nbytes))
        return Entry(name, info.dtype, info.shape, lambda: copy_chunks(shard, info))
    keep = [e for e in range(info.shape[0]) if e not in gone]
    blank = zero if what == "fused" else set()  # routing is unchanged for zeroed experts
    return Entry(
        key, info.dtype, (len(keep), *info.shape[1:]), lambda: _rows(shard, info, keep, blank)
    )


def _rows(shard: Path, info: TensorInfo, keep: list[int], blank: set[int]) -> Iterator[bytes]:
    """The kept rows of a tensor whose first axis runs over experts, zeros for `blank` ones."""
    row = info.nbytes // info.shape[0]
    for e in keep:
        yield bytes(row) if e in blank else read_range(shard, info.begin + e * row, row)


def _zeros(nbytes: int, chunk: int = 64 << 20) -> Iterator[bytes]:
    for start in range(0, nbytes, chunk):
        yield bytes(min(chunk, nbytes - start))
