"""Export a scaling edit as a PEFT IA³ adapter, so it can be loaded, stacked or removed.

IA³ multiplies a Linear's input (a "feedforward" module) or its output by a vector. That is
exactly `msa_edit.lesions.scaled` for:

- heads: the attention output projection's input, alpha repeated over the head's channels;
- neurons: the MLP down projection's input, alpha at the neuron's channel;
- shared experts: the shared MLP down projection's input, alpha over the expert's share;
- layers with alpha 0: the outputs of the attention output and MLP down projections (bias included),
  so the layer adds nothing to the residual stream.

It cannot express experts (fused `experts.down_proj` is an `nn.Parameter`, not a Linear, and
PEFT's IA³ has no `target_parameters`), layers in MoE blocks, or layer alphas other than 0 and 1;
for those, bake the edit with `msa_edit.edit.scale_units`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from peft import IA3Config, PeftModel, get_peft_model
from peft.tuners.ia3 import IA3Layer
from torch import nn

from msa_edit.errors import MsaEditError
from msa_edit.lesions import Lesion
from msa_edit.units import (
    Unit,
    architecture,
    decoder_layers,
    in_dim,
    mlp_width,
    moe_block,
    out_width,
    submodule,
)

ADAPTER_NAME = "default"


def ia3_adapter(
    model: nn.Module, factors: Mapping[Unit, float], out_dir: str | Path | None = None
) -> PeftModel:
    """Wrap `model` (in place, as PEFT does) in an IA³ adapter computing `scaled(model, factors)`.

    The vectors are set, not trained. `peft_model.disable_adapter()` and `peft_model.unload()` give
    back the unedited model; with `out_dir` the adapter is also saved there, for
    `PeftModel.from_pretrained(base, out_dir)`.

    >>> # peft_model = ia3_adapter(model, {Unit(1, "heads", 2): 0.0}, "adapters/no-head-1.2")
    """
    inputs, outputs = ia3_vectors(model, factors)
    peft_model = get_peft_model(model, ia3_config(model, inputs, outputs))
    _set_vectors(peft_model, {**inputs, **outputs})
    peft_model.eval()
    if out_dir is not None:
        peft_model.save_pretrained(str(out_dir))
    return peft_model


def ia3_config(
    model: nn.Module, inputs: Mapping[str, torch.Tensor], outputs: Mapping[str, torch.Tensor]
) -> IA3Config:
    """An IA³ config scaling the inputs of modules `inputs` and the outputs of `outputs`."""
    targets = sorted({*inputs, *outputs})
    if not targets:
        raise MsaEditError("no unit has a factor other than 1; there is nothing to export")
    return IA3Config(
        target_modules=targets,
        feedforward_modules=sorted(inputs),
        fan_in_fan_out=in_dim(model.get_submodule(targets[0])) == 0,  # GPT-2 Conv1D
        init_ia3_weights=True,
    )


def ia3_vectors(
    model: nn.Module, factors: Mapping[Unit, float]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Module name -> IA³ vector: (input-scaling vectors, output-scaling vectors).

    A module whose layer is zeroed scales its output by 0; other modules scale their input.
    """
    _validate(model, factors)
    names = {module: name for name, module in model.named_modules()}
    zeroed = {u.layer for u, alpha in factors.items() if u.spec.segment is None and alpha == 0.0}
    inputs: dict[str, torch.Tensor] = {}
    for unit, alpha in sorted(factors.items()):
        if unit.spec.segment is None or unit.layer in zeroed or alpha == 1.0:
            continue
        layer = decoder_layers(model)[unit.layer]
        module = unit.spec.site(model, layer)
        vector = inputs.setdefault(names[module], torch.ones(mlp_width(module)))
        width = len(vector) // unit.spec.count(model, layer)
        vector[unit.index * width : (unit.index + 1) * width] = float(alpha)
    outputs = {names[m]: torch.zeros(out_width(m)) for i in zeroed for m in _writers(model, i)}
    return inputs, outputs


def _validate(model: nn.Module, factors: Mapping[Unit, float]) -> None:
    """Raise before any change for units IA³ cannot scale, or units the model lacks."""
    Lesion(model, list(factors), "zero")  # checks that the units exist
    fix = "bake the edit into weights with msa_edit.edit.scale_units instead"
    for unit, alpha in factors.items():
        if unit.spec.routed:
            raise MsaEditError(
                f"IA³ cannot scale {unit}: fused experts are an nn.Parameter, not a Linear, and "
                f"PEFT's IA³ has no target_parameters; {fix}"
            )
        if unit.spec.segment is None and alpha not in (0.0, 1.0):
            raise MsaEditError(
                f"IA³ cannot scale {unit} by {alpha} (its MLP would see the scaled attention "
                f"update); use alpha 0 or 1, scale its heads and neurons, or {fix}"
            )
        layer = decoder_layers(model)[unit.layer]
        if unit.spec.segment is None and alpha == 0.0 and moe_block(model, layer) is not None:
            raise MsaEditError(f"IA³ cannot zero {unit}: its MoE block has fused experts; {fix}")


def _writers(model: nn.Module, layer_idx: int) -> list[nn.Module]:
    """The layer's residual writers: attention output and MLP down projections."""
    arch = architecture(model)
    layer = decoder_layers(model)[layer_idx]
    found = [submodule(layer, arch.attn_out), submodule(layer, arch.mlp_down)]
    return [m for m in found if m is not None]


@torch.no_grad()
def _set_vectors(peft_model: PeftModel, vectors: Mapping[str, torch.Tensor]) -> None:
    """Copy each vector into the IA³ layer that wraps the module of that name."""
    found = 0
    for name, module in peft_model.get_base_model().named_modules():
        if isinstance(module, IA3Layer) and name in vectors:
            param = module.ia3_l[ADAPTER_NAME]
            param.copy_(vectors[name].reshape(param.shape))
            found += 1
    assert found == len(vectors), (found, sorted(vectors))
