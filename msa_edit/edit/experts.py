"""Remove MoE experts from fused-expert models (Mixtral, Qwen2/3-MoE, OLMoE) in place.

Uniform removal (the same number of experts from every MoE layer) slices the experts out of the
router and the fused expert weights and lowers the config's expert count: the model equals the
`reroute` lesion of those experts and reloads with plain `AutoModelForCausalLM.from_pretrained`.

A checkpoint has one expert count for all layers, and a router without a bias cannot send an
expert's logit to -inf, so non-uniform removal cannot be saved as `reroute`. With
`extra="zero"` the editor slices out the per-layer minimum (the lowest-numbered requested experts
of each layer) and zeroes the weights of the rest: the model then equals the `reroute` lesion of
the sliced experts nested with the `zero` lesion of the zeroed ones (the record lists both).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import nn

from msa_edit.edit.record import EditRecord, n_params, names
from msa_edit.errors import MsaEditError
from msa_edit.lesions import Lesion
from msa_edit.units import (
    Unit,
    architecture,
    decoder_layers,
    expert_groups,
    moe_block,
    moe_parts,
    n_experts,
)

Extra = Literal["refuse", "zero"]


def remove_experts(
    model: nn.Module, units: Sequence[Unit], *, extra: Extra = "refuse"
) -> EditRecord:
    """Slice `units` (experts) out of `model`; checks feasibility before changing anything.

    >>> # record = remove_experts(copy.deepcopy(model), select(model, "layers.*.experts.3"))
    >>> # record.matches -> 'reroute'; model.save_pretrained(out) reloads without custom code
    """
    per_layer = _plan(model, units, extra)
    removed, zeroed = split_layout(per_layer, n_experts(model), expert_groups(model.config))
    before = n_params(model)
    for layer_idx, experts in zeroed.items():
        _zero(model, layer_idx, experts)
    count = n_experts(model) - len(next(iter(removed.values()), []))
    if count < n_experts(model):
        for layer_idx, experts in removed.items():
            _slice(model, layer_idx, experts)
        _set_count(model, count)
    sliced = [Unit(la, "experts", e) for la, es in removed.items() for e in es]
    zeros = [Unit(la, "experts", e) for la, es in zeroed.items() for e in es]
    notes = [f"sliced out {len(sliced)} experts: {', '.join(names(sliced)) or 'none'}"]
    if zeros:
        notes.append(f"zeroed {len(zeros)} experts (zero lesion): {', '.join(names(zeros))}")
    return EditRecord(
        "remove_experts",
        names(units),
        "reroute+zero" if zeros else "reroute",
        before,
        n_params(model),
        tuple(notes),
    )


def check_removal(model: nn.Module, units: Sequence[Unit], extra: Extra = "refuse") -> None:
    """Raise `MsaEditError` if `remove_experts(model, units, extra=extra)` would be refused."""
    _plan(model, units, extra)


def _plan(model: nn.Module, units: Sequence[Unit], extra: Extra) -> dict[int, list[int]]:
    """Requested experts per MoE layer (every MoE layer listed); raises if infeasible."""
    if extra not in ("refuse", "zero"):
        raise MsaEditError(f"unknown extra={extra!r}; use 'refuse' or 'zero'")
    Lesion(model, list(units), "reroute")  # validates kind, layer and expert indices
    _check_weights(model)
    layers = decoder_layers(model)
    moe_layers = [i for i, layer in enumerate(layers) if moe_block(model, layer) is not None]
    top_k = int(_config(model).num_experts_per_tok)
    groups = expert_groups(model.config)
    return removal_layout(units, moe_layers, n_experts(model), top_k, extra, groups=groups)


def removal_layout(
    units: Sequence[Unit],
    moe_layers: Sequence[int],
    total: int,
    top_k: int,
    extra: Extra,
    *,
    groups: int = 1,
) -> dict[int, list[int]]:
    """Requested experts per MoE layer (every MoE layer listed), checked against the rules every
    expert editor follows: at least top-k experts stay (and two per group where the router
    scores `groups` expert groups by their two best), and non-uniform removal — a different
    number per layer, or per group — needs `extra="zero"`. Raises `MsaEditError` otherwise.

    >>> removal_layout([Unit(1, "experts", 3)], [0, 1], 8, 2, "zero")
    {0: [], 1: [3]}
    >>> removal_layout([Unit(0, "experts", 0), Unit(0, "experts", 1)], [0], 8, 2, "refuse",
    ...                groups=2)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    msa_edit.errors.MsaEditError: non-uniform expert removal (layer 0: 2+0 per group) ...
    """
    if extra not in ("refuse", "zero"):
        raise MsaEditError(f"unknown extra={extra!r}; use 'refuse' or 'zero'")
    per_layer: dict[int, list[int]] = {i: [] for i in moe_layers}
    for unit in sorted(set(units)):
        if not unit.spec.routed or unit.layer not in per_layer or not 0 <= unit.index < total:
            raise MsaEditError(
                f"{unit} is not an expert of this model (MoE layers {list(moe_layers)}, "
                f"{total} experts each)"
            )
        per_layer[unit.layer].append(unit.index)
    for layer_idx, experts in per_layer.items():
        if total - len(experts) < top_k:
            raise MsaEditError(
                f"layer {layer_idx} would keep {total - len(experts)} experts, fewer than "
                f"top-k={top_k}; remove at most {total - top_k} experts per layer"
            )
    size = total // groups
    per_group = {i: [sum(e // size == g for e in es) for g in range(groups)]
                 for i, es in per_layer.items()}  # fmt: skip
    counts = {n for ns in per_group.values() for n in ns}
    if len(counts) > 1 and extra == "refuse":
        spread = ", ".join(
            f"layer {i}: {'+'.join(map(str, ns)) + ' per group' if groups > 1 else ns[0]}"
            for i, ns in per_group.items()
        )
        same = "the same number per layer" + (" and per expert group" if groups > 1 else "")
        raise MsaEditError(
            f"non-uniform expert removal ({spread}) cannot be saved as reroute; remove {same}, "
            "or pass extra='zero' to zero the extra experts (zero lesion)"
        )
    if groups > 1 and size - min(counts) < 2:  # the sliced part; zeroed experts stay routable
        raise MsaEditError(
            f"an expert group would keep fewer than 2 of its {size} experts; the router scores "
            f"each of its {groups} groups by its two best, so remove at most {size - 2} per group"
        )
    return per_layer


def _check_weights(model: nn.Module) -> None:
    """Refuse models whose expert weights are not plain floating-point tensors."""
    for layer_idx, layer in enumerate(decoder_layers(model)):
        if moe_block(model, layer) is None:
            continue
        gate, experts = _parts(model, layer_idx)
        tensors = [gate.weight, experts.gate_up_proj, experts.down_proj]
        if not all(isinstance(t, torch.Tensor) and t.is_floating_point() for t in tensors):
            raise MsaEditError(
                "expert weights are not floating-point tensors (quantized?); edit the "
                "full-precision model and quantize afterwards"
            )


def split_layout(
    per_layer: dict[int, list[int]], total: int, groups: int = 1
) -> tuple[dict[int, list[int]], dict[int, list[int]]]:
    """(sliced, zeroed) experts per layer: in every layer and each of its `groups` expert groups
    (of `total // groups`), the lowest `common` requested indices are sliced, `common` being the
    fewest any layer's group asks for; the rest are zeroed.

    >>> split_layout({0: [1, 2, 4], 1: [0, 5]}, 6, groups=2)
    ({0: [1, 4], 1: [0, 5]}, {0: [2]})
    """
    size = total // groups
    split = {i: [sorted(e for e in es if e // size == g) for g in range(groups)]
             for i, es in per_layer.items()}  # fmt: skip
    common = min((len(g) for gs in split.values() for g in gs), default=0)
    sliced = {i: sorted(e for g in gs for e in g[:common]) for i, gs in split.items()}
    zeroed = {i: sorted(e for g in gs for e in g[common:]) for i, gs in split.items()}
    return sliced, {i: es for i, es in zeroed.items() if es}


def _per_expert(module: nn.Module, total: int) -> list[tuple[str, torch.Tensor]]:
    """The module's own parameters and buffers whose first axis runs over its `total` experts."""
    tensors = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
    return [(name, t) for name, t in tensors if t.dim() and t.shape[0] == total]


@torch.no_grad()
def _zero(model: nn.Module, layer_idx: int, experts: list[int]) -> None:
    """Zero the experts' weights and biases: their output is 0, their routing unchanged (zero
    lesion)."""
    _, fused = _parts(model, layer_idx)
    for _, tensor in _per_expert(fused, n_experts(model)):
        tensor[experts] = 0


@torch.no_grad()
def _slice(model: nn.Module, layer_idx: int, experts: list[int]) -> None:
    """Cut the experts out of every per-expert tensor of the layer's router and fused experts
    (router rows, bias and correction bias; fused weights and biases)."""
    gate, fused = _parts(model, layer_idx)
    total = int(gate.weight.shape[0])
    keep = [e for e in range(total) if e not in set(experts)]
    for module in (gate, fused):
        for name, old in _per_expert(module, total):
            if isinstance(old, nn.Parameter):
                new: torch.Tensor = nn.Parameter(old[keep].clone(), requires_grad=old.requires_grad)
            else:
                new = old[keep].clone()
            setattr(module, name, new)
        if hasattr(module, "num_experts"):
            setattr(module, "num_experts", len(keep))  # noqa: B010


def _set_count(model: nn.Module, count: int) -> None:
    """Write the new expert count into the config and every module that caches it."""
    old = n_experts(model)
    attr = architecture(model).n_experts
    assert attr is not None
    setattr(model.config, attr, count)
    for module in model.modules():
        if getattr(module, "num_experts", None) == old:
            setattr(module, "num_experts", count)  # noqa: B010


def _config(model: nn.Module) -> Any:
    return model.config


def _parts(model: nn.Module, layer_idx: int) -> tuple[Any, Any]:
    """(router, fused experts) of MoE layer `layer_idx`, untyped for weight surgery."""
    return moe_parts(model, decoder_layers(model)[layer_idx])
