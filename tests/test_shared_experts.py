"""Shared experts as units (`layers.L.shared_experts.S`): one registry entry, and lesions, edits,
IA³ vectors and plans follow from it. Ground truth: the shared MLP's output removed by hand."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import build

from msa_edit.edit import remove_channels, scale_units
from msa_edit.edit.peft_export import ia3_vectors
from msa_edit.lesions import lesioned, scaled, unit_means
from msa_edit.units import Unit, discover, select

SHARED = {"deepseek_v3": 2, "glm4_moe": 1, "qwen2_moe": 1}
"""Shared experts per MoE layer of each tiny family (DeepSeek's MLP is two experts wide)."""


def logits(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits


def shared_mlp(model, layer: int) -> torch.nn.Module:
    mlp = model.model.layers[layer].mlp
    return mlp.shared_experts if hasattr(mlp, "shared_experts") else mlp.shared_expert


@pytest.mark.parametrize("family", sorted(SHARED))
def test_discovered_per_moe_layer(family: str) -> None:
    model = build(family)
    found = discover(model, ["shared_experts"])
    assert found == [Unit(la, "shared_experts", s) for la in (0, 1) for s in range(SHARED[family])]
    assert select(model, "layers.1.shared_experts.*") == found[len(found) // 2 :]
    assert not discover(build("mixtral"), ["shared_experts"])


@pytest.mark.parametrize("family", sorted(SHARED))
def test_zero_lesion_of_all_is_the_shared_mlp_removed_by_hand(family: str, tokens) -> None:
    model = build(family)
    units = select(model, "layers.1.shared_experts.*")
    with lesioned(model, units, "zero"):
        lesion = logits(model, tokens)
    handle = shared_mlp(model, 1).register_forward_hook(lambda m, args, out: torch.zeros_like(out))
    try:
        by_hand = logits(model, tokens)
    finally:
        handle.remove()
    assert (lesion - by_hand).abs().max() <= 1e-5
    assert not torch.allclose(lesion, logits(model, tokens), atol=1e-4)


def test_one_of_two_is_its_half_of_the_shared_mlp(tokens) -> None:
    # DeepSeek's shared MLP of width 2 x moe_intermediate_size is the sum of two experts' MLPs
    model = build("deepseek_v3")
    with lesioned(model, [Unit(0, "shared_experts", 1)], "zero"):
        lesion = logits(model, tokens)
    edited = copy.deepcopy(model)
    down = shared_mlp(edited, 0).down_proj
    with torch.no_grad():
        down.weight[:, model.config.moe_intermediate_size :] = 0
    assert (lesion - logits(edited, tokens)).abs().max() <= 1e-5


@pytest.mark.parametrize("family", sorted(SHARED))
def test_edits_equal_their_lesions(family: str, tokens) -> None:
    model = build(family)
    units = discover(model, ["shared_experts"])
    with lesioned(model, units[:1], "zero"):
        zeroed = logits(model, tokens)
    edited = copy.deepcopy(model)
    assert remove_channels(edited, units[:1]).action == "prune_shared_experts"
    assert (logits(edited, tokens) - zeroed).abs().max() <= 1e-5
    factors = {units[0]: 0.5, units[-1]: 1.5}
    with scaled(model, factors):
        want = logits(model, tokens)
    edited = copy.deepcopy(model)
    scale_units(edited, factors)
    assert (logits(edited, tokens) - want).abs().max() <= 1e-5


def test_mean_lesion_and_ia3_vector(tokens) -> None:
    model = build("deepseek_v3")
    unit = Unit(1, "shared_experts", 0)
    means = unit_means(model, [unit], tokens)
    width = model.config.moe_intermediate_size
    assert means[unit].shape == (width,)
    with lesioned(model, [unit], "mean", means=means):
        lesion = logits(model, tokens)
    edited = copy.deepcopy(model)
    down = shared_mlp(edited, 1).down_proj
    with torch.no_grad():  # a constant input on the expert's channels = its mean's output
        down.weight[:, :width] = 0
        bias = shared_mlp(model, 1).down_proj.weight[:, :width] @ means[unit].float()
    handle = down.register_forward_hook(lambda m, args, out: out + bias)
    try:
        assert (lesion - logits(edited, tokens)).abs().max() <= 1e-5
    finally:
        handle.remove()
    inputs, _ = ia3_vectors(model, {unit: 0.0})
    vector = inputs["model.layers.1.mlp.shared_experts.down_proj"]
    assert vector[:width].eq(0).all() and vector[width:].eq(1).all()
