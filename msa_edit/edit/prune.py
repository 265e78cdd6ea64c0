"""Prune heads, shared experts and neurons, and bake `scale` lesions into weights, in place.

- `remove_channels`: zero the units' input columns of the projection that carries them (heads:
  the attention output projection; shared experts: their share of the shared MLP's down
  projection); equals the `zero` lesion. transformers 5 dropped `prune_heads`/
  `config.pruned_heads`, so no family can save structurally smaller attention that plain
  `from_pretrained` reloads.
- `remove_neurons`: slice the neurons out of the MLP (smaller `intermediate_size`/`n_inner`) when
  every dense layer loses the same number and the family is Llama-like or GPT-2; otherwise zero
  their down-projection input. Both equal the `zero` lesion.
- `scale_units`: multiply what a unit writes by alpha, as `msa_edit.lesions.scaled` does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, cast

import torch
from torch import nn

from msa_edit.edit.record import EditRecord, n_params, names
from msa_edit.errors import MsaEditError
from msa_edit.lesions import Lesion
from msa_edit.units import (
    UNIT_KINDS,
    Unit,
    architecture,
    decoder_layers,
    in_dim,
    mlp_width,
    moe_block,
    moe_parts,
    out_dim,
    submodule,
)


def remove_channels(model: nn.Module, units: Sequence[Unit]) -> EditRecord:
    """Zero the units' input columns of the projection that carries them (the `zero` lesion):
    every kind whose `UnitKind.removal` is "zero" (heads, shared experts).

    >>> # record = remove_channels(copy.deepcopy(model), select(model, "layers.1.heads.2"))
    """
    _validate(model, units, {k.name for k in UNIT_KINDS.values() if k.removal == "zero"})
    before = n_params(model)
    scale_units(model, dict.fromkeys(units, 0.0))
    kinds = sorted({u.kind for u in units})
    note = (
        "zeroed their input columns; transformers 5 cannot save a smaller attention or shared MLP"
    )
    action = "prune_" + "+".join(kinds)
    return EditRecord(action, names(units), "zero", before, n_params(model), (note,))


def remove_neurons(model: nn.Module, units: Sequence[Unit]) -> EditRecord:
    """Remove MLP neurons: sliced out when uniform across dense layers, else zeroed (`zero`).

    >>> # record = remove_neurons(copy.deepcopy(model), select(model, "layers.*.mlp.neurons.7"))
    """
    _validate(model, units, {"neurons"})
    before = n_params(model)
    per_layer = _neurons_per_layer(model, units)
    if _can_slice(model, per_layer):
        for layer_idx, neurons in per_layer.items():
            _slice_neurons(model, layer_idx, neurons)
        width = mlp_width(_down(model, next(iter(per_layer))))
        setattr(model.config, str(architecture(model).mlp_width_key), width)
        note = f"sliced out of every dense MLP; width now {width}"
    else:
        scale_units(model, dict.fromkeys(units, 0.0))
        note = (
            "zeroed down-projection inputs (count differs per dense layer, or family unsliceable)"
        )
    return EditRecord("prune_neurons", names(units), "zero", before, n_params(model), (note,))


def scale_units(model: nn.Module, factors: Mapping[Unit, float]) -> EditRecord:
    """Bake `scaled(model, factors)` into weights: each unit's output times its alpha.

    Experts: `down_proj[e]` (and its bias); heads, neurons and shared experts: their input columns
    of the projection that carries them; layers: only alpha 0 (zero every residual write) or 1,
    since a scaled attention update would change what the layer's MLP sees.

    >>> # record = scale_units(copy.deepcopy(model), {Unit(1, "experts", 3): 0.5})
    """
    _validate(model, list(factors), set(UNIT_KINDS))
    for unit, alpha in factors.items():
        if unit.spec.segment is None and alpha not in (0.0, 1.0):
            raise MsaEditError(
                f"cannot bake scale {alpha} of {unit} into weights (its MLP would see the scaled "
                "attention update); use alpha 0 or 1, or scale its heads and neurons instead"
            )
    before = n_params(model)
    for unit, alpha in sorted(factors.items()):
        _scale(model, unit, float(alpha))
    alphas = tuple(f"{u}={factors[u]:g}" for u in sorted(factors))
    return EditRecord("scale", names(factors), "scale", before, n_params(model), alphas)


def _validate(model: nn.Module, units: Sequence[Unit], kinds: set[str]) -> None:
    """Raise before any change if a unit is of another kind, missing, or weights are not float."""
    wrong = [u for u in units if u.kind not in kinds]
    if wrong:
        raise MsaEditError(f"{wrong[0]} is not one of {', '.join(sorted(kinds))}; use its editor")
    Lesion(model, list(units), "zero")  # checks that the units exist
    for unit in units:
        for weight in _weights(model, unit):
            if not weight.is_floating_point():
                raise MsaEditError(
                    f"weights of {unit} are not floating point (quantized?); edit the "
                    "full-precision model and quantize afterwards"
                )


def _weights(model: nn.Module, unit: Unit) -> list[torch.Tensor]:
    """The weights through which `unit` writes."""
    layer = decoder_layers(model)[unit.layer]
    if unit.spec.segment is None:
        return [p for _, p in _layer_writers(model, unit.layer)]
    if unit.spec.routed:
        fused = _experts(model, layer)
        return [getattr(fused, name) for name in architecture(model).expert_out]
    return [cast(torch.Tensor, unit.spec.site(model, layer).weight)]


def _module(layer: nn.Module, path: str | None) -> Any:
    found = submodule(layer, path)
    assert found is not None, path
    return found


def _down(model: nn.Module, layer_idx: int) -> Any:
    return _module(decoder_layers(model)[layer_idx], architecture(model).mlp_down)


def _experts(model: nn.Module, layer: nn.Module) -> Any:
    return moe_parts(model, layer)[1]


@torch.no_grad()
def _scale(model: nn.Module, unit: Unit, alpha: float) -> None:
    """Multiply the weights through which `unit` writes by alpha."""
    layer = decoder_layers(model)[unit.layer]
    if unit.spec.segment is None:
        if alpha != 1.0:
            for _, param in _layer_writers(model, unit.layer):
                param.mul_(alpha)
    elif unit.spec.routed:
        for weight in _weights(model, unit):
            weight[unit.index] *= alpha
    else:
        site: Any = unit.spec.site(model, layer)
        width = mlp_width(site) // unit.spec.count(model, layer)
        site.weight.narrow(in_dim(site), unit.index * width, width).mul_(alpha)


def _layer_writers(model: nn.Module, layer_idx: int) -> list[tuple[str, Any]]:
    """Parameters of the layer's residual writers: attention output and MLP/expert outputs."""
    arch = architecture(model)
    layer = decoder_layers(model)[layer_idx]
    params: list[tuple[str, Any]] = list(_module(layer, arch.attn_out).named_parameters())
    block = moe_block(model, layer)
    if block is None:
        return params + list(_down(model, layer_idx).named_parameters())
    fused = _experts(model, layer)
    params += [(name, getattr(fused, name)) for name in arch.expert_out]
    shared = submodule(block, None if arch.shared is None else f"{arch.shared}.down_proj")
    return params + ([] if shared is None else list(shared.named_parameters()))


def _neurons_per_layer(model: nn.Module, units: Sequence[Unit]) -> dict[int, list[int]]:
    """Requested neurons per dense layer (every dense layer listed)."""
    arch = architecture(model)
    layers = decoder_layers(model)
    per_layer: dict[int, list[int]] = {
        i: []
        for i, layer in enumerate(layers)
        if moe_block(model, layer) is None and submodule(layer, arch.mlp_down) is not None
    }
    for unit in sorted(set(units)):
        per_layer[unit.layer].append(unit.index)
    return per_layer


def _can_slice(model: nn.Module, per_layer: dict[int, list[int]]) -> bool:
    """Structural removal fits the config: known family, same count per layer, width left."""
    counts = {len(n) for n in per_layer.values()}
    arch = architecture(model)
    if not arch.mlp_inputs or arch.mlp_width_key is None or len(counts) != 1:
        return False
    count = counts.pop()
    return 0 < count < min(mlp_width(_down(model, i)) for i in per_layer)


@torch.no_grad()
def _slice_neurons(model: nn.Module, layer_idx: int, neurons: list[int]) -> None:
    """Cut the neurons out of the layer's MLP input projections and down projection."""
    ups = architecture(model).mlp_inputs
    layer = decoder_layers(model)[layer_idx]
    down = _down(model, layer_idx)
    keep = torch.tensor([n for n in range(mlp_width(down)) if n not in set(neurons)])
    for path in ups:
        up = _module(layer, path)
        _take(up, "weight", out_dim(up), keep)
        if getattr(up, "bias", None) is not None:
            _take(up, "bias", 0, keep)
        _resize(up, "out_features" if hasattr(up, "out_features") else "nf", len(keep))
    _take(down, "weight", in_dim(down), keep)
    if hasattr(down, "in_features"):
        down.in_features = len(keep)
    mlp: Any = _module(layer, "mlp")
    if isinstance(getattr(mlp, "intermediate_size", None), int):
        mlp.intermediate_size = len(keep)


def _take(module: nn.Module, name: str, dim: int, keep: torch.Tensor) -> None:
    old = getattr(module, name)
    new = old.index_select(dim, keep.to(old.device)).clone()
    setattr(module, name, nn.Parameter(new, requires_grad=old.requires_grad))


def _resize(module: nn.Module, attr: str, size: int) -> None:
    if hasattr(module, attr):
        setattr(module, attr, size)
