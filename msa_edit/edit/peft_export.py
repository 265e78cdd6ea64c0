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

`heal_lora` fine-tunes a LoRA on a calibration batch after pruning and merges it, keeping
pruned (all-zero) input columns at zero.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from peft import IA3Config, LoraConfig, PeftModel, get_peft_model
from peft.tuners.ia3 import IA3Layer
from torch import nn
from transformers.pytorch_utils import Conv1D

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


def heal_lora(
    model: nn.Module, input_ids: torch.Tensor, steps: int, lr: float, r: int = 8, seed: int = 0
) -> nn.Module:
    """Fine-tune a rank-`r` LoRA on `input_ids` (next-token loss), merge it, return the model.

    Edits `model` in place and deterministically for a given `seed`; dropout stays off. Input
    columns that are all zero (pruned heads and neurons) are masked during training and stay
    zero after the merge, so the pruning survives the healing.

    >>> # healed = heal_lora(pruned, calibration_ids, steps=50, lr=1e-3)
    """
    if steps < 1 or lr <= 0 or r < 1:
        raise MsaEditError(
            f"heal_lora needs steps >= 1, lr > 0 and r >= 1 (got {steps}, {lr}, {r})"
        )
    masks = _zero_column_masks(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        conv1d = any(isinstance(m, Conv1D) for m in model.modules())
        config = LoraConfig(
            r=r, lora_alpha=r, lora_dropout=0.0, target_modules="all-linear", fan_in_fan_out=conv1d
        )
        peft_model = get_peft_model(model, config)
    with _masked_inputs(peft_model.get_base_model(), masks):
        _train(peft_model, input_ids, steps, lr)
    merged = peft_model.merge_and_unload()
    _apply_masks(merged, masks)
    return merged.eval()


def _train(model: nn.Module, input_ids: torch.Tensor, steps: int, lr: float) -> None:
    """Plain AdamW on the trainable (LoRA) parameters, in eval mode (no dropout)."""
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    for _ in range(steps):
        loss = model(input_ids=input_ids, labels=input_ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def _zero_column_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """Linear/Conv1D name -> input mask, 0 where the weight's input column is all zero."""
    masks = {}
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, Conv1D)):
            keep = (module.weight != 0).any(dim=0 if isinstance(module, nn.Linear) else 1)
            if not bool(keep.all()):
                masks[name] = keep.to(module.weight.dtype)
    return masks


@contextmanager
def _masked_inputs(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Multiply each masked module's input by its mask while the block runs."""

    def hook(mask: torch.Tensor) -> Any:
        return lambda module, args: (args[0] * mask.to(args[0]), *args[1:])

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(m)) for n, m in masks.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def _apply_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    """Zero the masked input columns of each module's (merged) weight."""
    for name, mask in masks.items():
        module = model.get_submodule(name)
        weight = module.weight
        assert isinstance(weight, torch.Tensor)
        weight.mul_(mask if isinstance(module, nn.Linear) else mask[:, None])
