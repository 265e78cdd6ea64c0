"""A model's memory as stored: parameters and buffers, bitsandbytes' quantisation statistics too,
shared storage counted once.

>>> # footprint(load_quantized("path/to/mixtral", bits=4))   # bytes
"""

from __future__ import annotations

import torch
from torch import nn


def _quant_stats_bytes(param: nn.Parameter, module: nn.Module, seen: set[int]) -> int:
    """Bytes of the bnb statistics that belong to `param` (4-bit block scales, 8-bit row scales)."""
    tensors: list[torch.Tensor] = []
    state = getattr(param, "quant_state", None)
    while state is not None:
        tensors += [
            t for t in (state.absmax, state.code, getattr(state, "offset", None)) if t is not None
        ]
        state = getattr(state, "state2", None) if getattr(state, "nested", False) else None
    lt_state = getattr(module, "state", None)
    for scb in (getattr(param, "SCB", None), getattr(lt_state, "SCB", None)):
        if isinstance(scb, torch.Tensor):
            tensors.append(scb)
    return sum(_tensor_bytes(t, seen) for t in tensors)


def _tensor_bytes(tensor: torch.Tensor, seen: set[int]) -> int:
    """`tensor`'s storage bytes, counted once per storage (tied and shared tensors count once)."""
    if tensor.device.type == "meta":
        return 0
    key = tensor.untyped_storage().data_ptr()
    if key in seen:
        return 0
    seen.add(key)
    return tensor.untyped_storage().nbytes()


def footprint(model: nn.Module) -> int:
    """Bytes of `model`'s parameters and buffers as stored, quantised weights at their packed size.

    Counts each storage once (tied embeddings count once) and includes the bitsandbytes
    quantisation statistics (4-bit block scales and code books, 8-bit row scales).

    >>> footprint(torch.nn.Linear(4, 2, bias=False))
    32
    """
    seen: set[int] = set()
    total = 0
    for module in model.modules():
        for param in module.parameters(recurse=False):
            total += _tensor_bytes(param, seen) + _quant_stats_bytes(param, module, seen)
        for buffer in module.buffers(recurse=False):
            total += _tensor_bytes(buffer, seen)
    return total
