"""Editors: edited-then-reloaded model == the lesion it names; infeasible edits change nothing."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from tiny_models import MOE_FAMILIES, build
from transformers import AutoModelForCausalLM

from msa_edit.edit import EditRecord, remove_channels, remove_experts, remove_neurons, scale_units
from msa_edit.edit.record import n_params
from msa_edit.errors import MsaEditError
from msa_edit.lesions import lesioned, scaled
from msa_edit.units import Unit, moe_parts, n_experts

TOL = 1e-5


def logits(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits


def reloaded(model, tmp_path):
    """The model after save_pretrained -> plain from_pretrained (no custom code)."""
    model.save_pretrained(tmp_path)
    return AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)


def experts(layers_to_indices: dict[int, list[int]]) -> list[Unit]:
    return [Unit(la, "experts", e) for la, es in layers_to_indices.items() for e in es]


def expert_params(model) -> int:
    """Stored values one expert costs in one layer: its router row (biases, correction bias) and
    fused weights."""
    router, fused = moe_parts(model, model.model.layers[0])
    per_expert = [*router.state_dict().values(), *fused.state_dict().values()]
    return sum(p[0].numel() for p in per_expert if p.shape[0] == n_experts(model))


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_uniform_expert_removal_equals_reroute_and_reloads(family, tokens, tmp_path) -> None:
    model = build(family)
    units = experts({0: [1, 4], 1: [0, 5]})
    with lesioned(model, units, "reroute"):
        expected = logits(model, tokens)
    edited = copy.deepcopy(model)
    record = remove_experts(edited, units)
    assert record.matches == "reroute"
    assert record.params_saved == 4 * expert_params(model)
    assert (logits(edited, tokens) - expected).abs().max() <= TOL
    loaded = reloaded(edited, tmp_path)
    assert n_params(loaded) == record.params_after
    assert (logits(loaded, tokens) - expected).abs().max() <= TOL


def test_non_uniform_removal_slices_common_part_and_zeroes_the_rest(tokens, tmp_path) -> None:
    model = build("mixtral")
    units = experts({0: [1, 3, 4], 1: [2]})
    with pytest.raises(MsaEditError, match="non-uniform"):
        remove_experts(model, units)
    edited = copy.deepcopy(model)
    record = remove_experts(edited, units, extra="zero")
    assert record.matches == "reroute+zero"
    assert record.params_saved == 2 * expert_params(model)  # one expert sliced from each layer
    sliced, zeroed = experts({0: [1], 1: [2]}), experts({0: [3, 4]})
    with lesioned(model, sliced, "reroute"), lesioned(model, zeroed, "zero"):
        expected = logits(model, tokens)
    assert (logits(reloaded(edited, tmp_path), tokens) - expected).abs().max() <= TOL


@pytest.mark.parametrize(
    ("family", "units", "match"),
    [
        ("mixtral", experts({0: [0, 1, 2, 3, 4], 1: [0, 1, 2, 3, 4]}), "fewer than top-k=2"),
        ("mixtral", experts({0: [9]}), "layer 0 has 6 experts"),
        ("mixtral", [Unit(0, "heads", 1)], "experts only"),
        ("llama", experts({0: [0]}), "has no experts"),
    ],
)
def test_infeasible_expert_removal_changes_nothing(family, units, match) -> None:
    model = build(family)
    before = state(model)
    with pytest.raises(MsaEditError, match=match):
        remove_experts(model, units)
    assert_unchanged(model, before)


@pytest.mark.parametrize("family", ["llama", "gpt2", "mixtral", "deepseek_v3", "gpt_oss"])
def test_head_removal_equals_zero_lesion(family, tokens, tmp_path) -> None:
    model = build(family)
    units = [Unit(0, "heads", 1), Unit(1, "heads", 3), Unit(1, "heads", 0)]
    with lesioned(model, units, "zero"):
        expected = logits(model, tokens)
    edited = copy.deepcopy(model)
    record = remove_channels(edited, units)
    assert (record.matches, record.params_saved) == ("zero", 0)
    assert (logits(reloaded(edited, tmp_path), tokens) - expected).abs().max() <= TOL


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("uniform", [True, False])
def test_neuron_removal_equals_zero_lesion(family, uniform, tokens, tmp_path) -> None:
    model = build(family)
    picks = {0: [3, 17, 30], 1: [0, 5, 9]} if uniform else {0: [3, 17], 1: [9]}
    units = [Unit(la, "neurons", n) for la, ns in picks.items() for n in ns]
    with lesioned(model, units, "zero"):
        expected = logits(model, tokens)
    edited = copy.deepcopy(model)
    record = remove_neurons(edited, units)
    # llama: gate + up rows and a down column (no biases); gpt2: c_fc column + bias, c_proj row
    per_neuron = 3 * 32 if family == "llama" else 2 * 32 + 1
    assert record.params_saved == (len(units) * per_neuron if uniform else 0)
    assert record.matches == "zero"
    loaded = reloaded(edited, tmp_path)
    assert n_params(loaded) == record.params_after
    assert (logits(loaded, tokens) - expected).abs().max() <= TOL


@pytest.mark.parametrize("family", [*MOE_FAMILIES, "llama", "gpt2"])
def test_scaling_equals_scale_lesion(family, tokens, tmp_path) -> None:
    model = build(family)
    factors = {Unit(0, "heads", 2): 0.5, Unit(1, "heads", 0): 1.7, Unit(1, "layer"): 0.0}
    if family in MOE_FAMILIES:
        factors |= {Unit(0, "experts", 3): 0.25, Unit(1, "experts", 0): -0.5}
    else:
        factors |= {Unit(0, "neurons", 7): 0.3, Unit(0, "neurons", 8): 2.0}
    with scaled(model, factors):
        expected = logits(model, tokens)
    edited = copy.deepcopy(model)
    record = scale_units(edited, factors)
    assert (record.matches, record.params_saved) == ("scale", 0)
    assert (logits(reloaded(edited, tmp_path), tokens) - expected).abs().max() <= TOL


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda m: scale_units(m, {Unit(0, "layer"): 0.5}), "cannot bake scale 0.5"),
        (lambda m: scale_units(m, {Unit(0, "heads", 9): 0.5}), "has 4 heads"),
        (lambda m: remove_channels(m, [Unit(0, "neurons", 1)]), "is not one of heads"),
        (lambda m: remove_neurons(m, [Unit(0, "neurons", 400)]), "does not exist"),
        (lambda m: remove_neurons(m, [Unit(5, "neurons", 1)]), "the model has layers 0-1"),
    ],
)
def test_infeasible_edits_change_nothing(call, match) -> None:
    model = build("llama")
    before = state(model)
    with pytest.raises(MsaEditError, match=match):
        call(model)
    assert_unchanged(model, before)


def test_unsupported_architecture_is_refused() -> None:
    class Fake(torch.nn.Module):
        config = type("C", (), {"model_type": "mamba"})()

    with pytest.raises(MsaEditError, match="'mamba' is not supported"):
        remove_experts(Fake(), experts({0: [0]}))
    with pytest.raises(MsaEditError, match="'mamba' is not supported"):
        scale_units(Fake(), {Unit(0, "heads", 0): 0.5})


def test_record_round_trips_through_json() -> None:
    record = remove_experts(build("olmoe"), experts({0: [2], 1: [2]}))
    assert EditRecord.from_json(record.to_json()) == record
    assert json.loads(record.to_json())["params_saved"] == record.params_saved > 0


def test_grouped_router_removal_is_balanced_per_group_or_zeroed(tokens, tmp_path) -> None:
    # DeepSeek-V3 scores its 2 groups of 3 experts by their two best: slicing keeps that shape
    # only when every group of every layer loses the same number
    model = build("deepseek_v3")
    units = experts({0: [1, 2, 4], 1: [0, 5]})
    before = state(model)
    with pytest.raises(MsaEditError, match=r"layer 0: 2\+1 per group, layer 1: 1\+1 per group"):
        remove_experts(model, units)
    with pytest.raises(MsaEditError, match="fewer than 2 of its 3 experts"):
        remove_experts(model, experts({0: [0, 1, 3, 4], 1: [0, 1, 3, 4]}), extra="zero")
    assert_unchanged(model, before)
    edited = copy.deepcopy(model)
    record = remove_experts(edited, units, extra="zero")
    assert record.matches == "reroute+zero"
    assert record.params_saved == 4 * expert_params(model)  # one expert per group and layer
    sliced, zeroed = experts({0: [1, 4], 1: [0, 5]}), experts({0: [2]})
    with lesioned(model, sliced, "reroute"), lesioned(model, zeroed, "zero"):
        expected = logits(model, tokens)
    assert (logits(reloaded(edited, tmp_path), tokens) - expected).abs().max() <= TOL
    assert not torch.allclose(expected, logits(model, tokens), atol=1e-4)
