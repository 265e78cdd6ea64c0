"""Heal a pruned model: fine-tune a LoRA on a calibration batch and merge it, keeping pruned
(all-zero) input columns at zero.

>>> # healed = heal_lora(pruned, calibration_ids, steps=50, lr=1e-3)
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers.pytorch_utils import Conv1D

from msa_edit.errors import MsaEditError
from msa_edit.units import in_dim, out_dim


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
        conv1d = any(isinstance(m, Conv1D) for m in model.modules())  # GPT-2's [in, out] weights
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
            keep = (module.weight != 0).any(dim=out_dim(module))
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
        weight.mul_(mask if in_dim(module) == 1 else mask[:, None])
