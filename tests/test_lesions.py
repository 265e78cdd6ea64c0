"""Lesions: reversible, reroute = slicing the expert out, batched = serial, exact edits."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import build, tiny_config
from transformers import AutoModelForCausalLM

from msa_edit.errors import MsaEditError
from msa_edit.lesions import Lesion, lesioned, scaled, unit_means
from msa_edit.units import (
    ARCHITECTURES,
    Unit,
    decoder_layers,
    discover,
    expert_groups,
    n_experts,
    select,
)


def logits(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits


def kinds_for(model) -> list[tuple[str, str]]:
    """(glob, lesion kind) pairs that apply to this model."""
    globs = ["layers.*.heads.*", "layers.*"]
    if any(u.kind == "experts" for u in discover(model)):
        globs.append("layers.*.experts.*")
    else:
        globs.append("layers.*.mlp.neurons.*")
    pairs = [(g, k) for g in globs for k in ("zero", "mean", "scale")]
    if "layers.*.experts.*" in globs:
        pairs.append(("layers.*.experts.*", "reroute"))
    return pairs


def test_lesions_change_outputs_then_restore_bits(any_model, tokens) -> None:
    before = logits(any_model, tokens)
    for glob, kind in kinds_for(any_model):
        units = select(any_model, glob)[::3]
        means = unit_means(any_model, units, tokens) if kind == "mean" else None
        with Lesion(any_model, units, kind, alpha=0.5, means=means) as lesion:
            lesion.set_coalitions(torch.zeros(1, len(units), dtype=torch.bool))
            inside = logits(any_model, tokens)
        assert not torch.allclose(inside, before), (glob, kind)
        assert torch.equal(logits(any_model, tokens), before), (glob, kind)


def test_no_hook_left_after_an_exception(moe_model, tokens) -> None:
    units = select(moe_model, "layers.*.experts.*")
    before = logits(moe_model, tokens)
    with pytest.raises(RuntimeError, match="boom"), lesioned(moe_model, units[:3], "reroute"):
        raise RuntimeError("boom")
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in moe_model.modules())
    assert torch.equal(logits(moe_model, tokens), before)


def sliced(model, removed: set[int]):
    """A copy of an MoE model with the `removed` experts cut out of router and expert weights."""
    config = copy.deepcopy(model.config)
    attr = ARCHITECTURES[config.model_type].n_experts
    total = getattr(config, attr)
    keep = [e for e in range(total) if e not in removed]
    setattr(config, attr, len(keep))
    small = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    state = {}
    for name, tensor in model.state_dict().items():
        if ".mlp." in name and tensor.dim() and tensor.shape[0] == total:  # router and experts
            tensor = tensor[keep]
        state[name] = tensor
    small.load_state_dict(state)
    return small


@pytest.mark.parametrize("removed", [{0}, {1, 4}, {0, 2, 5}])
def test_reroute_equals_slicing_the_experts_out(moe_model, tokens, removed) -> None:
    groups = expert_groups(moe_model.config)
    size = n_experts(moe_model) // groups
    if len({sum(e // size == g for e in removed) for g in range(groups)}) > 1:
        pytest.skip("a grouped router has a sliced equivalent only for equal removal per group")
    units = [Unit(layer, "experts", e) for layer in (0, 1) for e in sorted(removed)]
    with lesioned(moe_model, units, "reroute"):
        lesion_logits = logits(moe_model, tokens)
    edit_logits = logits(sliced(moe_model, removed), tokens)
    assert (lesion_logits - edit_logits).abs().max() <= 1e-5
    assert not torch.allclose(lesion_logits, logits(moe_model, tokens), atol=1e-4)


@pytest.mark.parametrize("kind", ["reroute", "zero", "mean"])
def test_batched_equals_serial(moe_model, tokens, kind) -> None:
    units = select(moe_model, "layers.*.experts.*")
    means = unit_means(moe_model, units, tokens) if kind == "mean" else None
    gen = torch.Generator().manual_seed(1)
    coalitions = torch.rand(4, len(units), generator=gen) < 0.6
    n = tokens.shape[0]
    with Lesion(moe_model, units, kind, means=means) as lesion:
        lesion.set_coalitions(coalitions.repeat_interleave(n, dim=0))
        batched = logits(moe_model, tokens.repeat(4, 1)).reshape(4, n, *tokens.shape[1:], -1)
        for b in range(4):
            lesion.set_coalitions(coalitions[b : b + 1])
            serial = logits(moe_model, tokens)
            assert (batched[b] - serial).abs().max() <= 1e-5


def test_scaling_an_expert_equals_scaling_its_down_projection(tokens) -> None:
    model = build("mixtral")
    unit = Unit(1, "experts", 3)
    with scaled(model, {unit: 0.25}):
        hooked = logits(model, tokens)
    edited = copy.deepcopy(model)
    with torch.no_grad():
        decoder_layers(edited)[1].mlp.experts.down_proj[3] *= 0.25
    assert (hooked - logits(edited, tokens)).abs().max() <= 1e-5


def test_mean_lesion_of_a_neuron_equals_folding_its_mean_into_the_bias(tokens) -> None:
    model = build("gpt2")
    unit = Unit(0, "neurons", 17)
    means = unit_means(model, [unit], tokens)
    with lesioned(model, [unit], "mean", means=means):
        hooked = logits(model, tokens)
    edited = copy.deepcopy(model)
    proj = decoder_layers(edited)[0].mlp.c_proj  # Conv1D: weight [in, out]
    with torch.no_grad():
        proj.bias += means[unit].to(proj.weight.dtype) * proj.weight[17]
        proj.weight[17] = 0
    assert (hooked - logits(edited, tokens)).abs().max() <= 1e-5


def test_zeroing_a_head_equals_zeroing_its_output_columns(tokens) -> None:
    model = build("llama")
    with lesioned(model, [Unit(1, "heads", 2)]):
        hooked = logits(model, tokens)
    edited = copy.deepcopy(model)
    head_dim = tiny_config("llama").hidden_size // 4
    with torch.no_grad():
        decoder_layers(edited)[1].self_attn.o_proj.weight[:, 2 * head_dim : 3 * head_dim] = 0
    assert (hooked - logits(edited, tokens)).abs().max() <= 1e-6


def test_zeroing_a_layer_skips_it(tokens) -> None:
    model = build("llama")
    with lesioned(model, [Unit(0, "layer")]):
        hooked = logits(model, tokens)
    edited = copy.deepcopy(model)
    del edited.model.layers[0]
    for i, layer in enumerate(edited.model.layers):
        layer.self_attn.layer_idx = i
    edited.config.num_hidden_layers = 1
    assert (hooked - logits(edited, tokens)).abs().max() <= 1e-5


@pytest.mark.parametrize(
    ("units", "kind", "match"),
    [
        ([Unit(0, "heads", 0)], "reroute", "experts only"),
        ([Unit(0, "experts", 9)], "zero", "layer 0 has 6 experts"),
        ([Unit(7, "heads", 0)], "zero", "the model has layers 0-1"),
        ([Unit(0, "neurons", 0)], "zero", "has no dense MLP"),
        ([Unit(0, "heads", 0)], "mean", "needs the units' mean outputs"),
        ([Unit(0, "heads", 0)], "dropout", "unknown lesion 'dropout'"),
    ],
)
def test_bad_lesions(units, kind, match) -> None:
    with pytest.raises(MsaEditError, match=match):
        Lesion(build("mixtral"), units, kind)


def test_unknown_architecture_lists_supported() -> None:
    class Fake(torch.nn.Module):
        config = type("C", (), {"model_type": "mamba"})()

    supported = "'mamba' is not supported; supported model types: deepseek_v3, glm4_moe, gpt2"
    with pytest.raises(MsaEditError, match=supported):
        discover(Fake())
