"""IA³ export: the adapter computes `scaled(...)`, survives a save and load, comes off cleanly."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from tiny_models import build

from msa_edit.edit import scale_units
from msa_edit.edit.heal import heal_lora
from msa_edit.edit.peft_export import ia3_adapter, ia3_vectors
from msa_edit.errors import MsaEditError
from msa_edit.lesions import scaled
from msa_edit.units import Unit

DENSE = ["llama", "gpt2"]
FACTORS = {
    Unit(0, "heads", 1): 0.0,
    Unit(0, "heads", 2): 0.5,
    Unit(0, "neurons", 5): 0.0,
    Unit(0, "neurons", 9): 1.7,
    Unit(1, "layer"): 0.0,
    Unit(1, "heads", 3): 0.25,  # inside the zeroed layer: no effect
}


def _logits(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=tokens).logits


def _scaled_logits(model: torch.nn.Module, tokens: torch.Tensor, factors: dict) -> torch.Tensor:
    with scaled(model, factors):
        return _logits(model, tokens)


@pytest.mark.parametrize("family", DENSE)
def test_adapter_equals_scaled_lesion(family: str, tokens: torch.Tensor) -> None:
    model = build(family)
    want = _scaled_logits(model, tokens, FACTORS)
    peft_model = ia3_adapter(model, FACTORS)
    torch.testing.assert_close(_logits(peft_model, tokens), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", DENSE)
def test_adapter_comes_off_bit_identically(family: str, tokens: torch.Tensor) -> None:
    model = build(family)
    before = _logits(model, tokens)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    peft_model = ia3_adapter(model, FACTORS)
    assert not torch.equal(_logits(peft_model, tokens), before)
    with peft_model.disable_adapter():
        assert torch.equal(_logits(peft_model, tokens), before)
    base = peft_model.unload()
    assert torch.equal(_logits(base, tokens), before)
    after = base.state_dict()
    assert after.keys() == weights.keys()
    assert all(torch.equal(after[k], w) for k, w in weights.items())


@pytest.mark.parametrize("family", DENSE)
def test_adapter_round_trips_through_disk(family: str, tokens: torch.Tensor, tmp_path) -> None:
    model = build(family)
    want = _scaled_logits(model, tokens, FACTORS)
    ia3_adapter(model, FACTORS, tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(build(family), tmp_path / "adapter").eval()
    torch.testing.assert_close(_logits(loaded, tokens), want, atol=1e-5, rtol=0)


def test_two_adapters_stack(tokens: torch.Tensor, tmp_path) -> None:
    first, second = {Unit(0, "heads", 1): 0.5}, {Unit(0, "heads", 1): 0.5, Unit(1, "heads", 0): 0}
    ia3_adapter(build("llama"), second, tmp_path / "second")
    model = build("llama")
    want = _scaled_logits(model, tokens, {Unit(0, "heads", 1): 0.25, Unit(1, "heads", 0): 0})
    peft_model = ia3_adapter(model, first)
    peft_model.load_adapter(tmp_path / "second", adapter_name="second")
    peft_model.base_model.set_adapter(["default", "second"])
    torch.testing.assert_close(_logits(peft_model, tokens), want, atol=1e-5, rtol=0)


def test_heads_of_moe_model(tokens: torch.Tensor) -> None:
    model = build("mixtral")
    factors = {Unit(0, "heads", 1): 0.0, Unit(1, "heads", 2): 0.5}
    want = _scaled_logits(model, tokens, factors)
    peft_model = ia3_adapter(model, factors)
    torch.testing.assert_close(_logits(peft_model, tokens), want, atol=1e-5, rtol=0)


def test_head_vector_repeats_alpha_over_head_dim() -> None:
    inputs, outputs = ia3_vectors(build("llama"), {Unit(1, "heads", 2): 0.5})
    vector = inputs["model.layers.1.self_attn.o_proj"]
    assert outputs == {}
    assert torch.equal(vector[16:24], torch.full((8,), 0.5))
    assert int((vector == 1).sum()) == 24


@pytest.mark.parametrize(
    ("family", "factors", "message"),
    [
        ("mixtral", {Unit(0, "experts", 1): 0.0}, "scale_units"),
        ("olmoe", {Unit(1, "layer"): 0.0}, "scale_units"),
        ("llama", {Unit(1, "layer"): 0.5}, "alpha 0 or 1"),
        ("llama", {Unit(0, "heads", 1): 1.0}, "nothing to export"),
        ("llama", {Unit(0, "heads", 9): 0.0}, "does not exist"),
    ],
)
def test_inexpressible_edits_fail_before_wrapping(family: str, factors: dict, message: str) -> None:
    model = build(family)
    with pytest.raises(MsaEditError, match=message):
        ia3_adapter(model, factors)
    assert not any("ia3" in name for name, _ in model.named_modules())


def _pruned(family: str) -> torch.nn.Module:
    model = build(family)
    scale_units(model, {Unit(0, "heads", 1): 0.0, Unit(1, "neurons", 3): 0.0})
    return model


def _nll(model: torch.nn.Module, tokens: torch.Tensor) -> float:
    with torch.no_grad():
        return float(model(input_ids=tokens, labels=tokens).loss)


@pytest.mark.parametrize("family", DENSE)
def test_heal_lora_lowers_nll_and_keeps_pruning(family: str, tokens: torch.Tensor) -> None:
    model = _pruned(family)
    before = _nll(model, tokens)
    healed = heal_lora(model, tokens, steps=10, lr=1e-2, r=4)
    assert _nll(healed, tokens) < before - 0.05
    o_proj, down = (
        ("self_attn.o_proj", "mlp.down_proj")
        if family == "llama"
        else ("attn.c_proj", "mlp.c_proj")
    )
    layers = healed.model.layers if family == "llama" else healed.transformer.h
    in_dim = 1 if family == "llama" else 0
    assert not layers[0].get_submodule(o_proj).weight.narrow(in_dim, 8, 8).any()
    assert not layers[1].get_submodule(down).weight.narrow(in_dim, 3, 1).any()
    assert not any("lora" in name for name, _ in healed.named_modules())


def test_heal_lora_is_deterministic(tokens: torch.Tensor) -> None:
    first = heal_lora(_pruned("llama"), tokens, steps=3, lr=1e-2, seed=7).state_dict()
    second = heal_lora(_pruned("llama"), tokens, steps=3, lr=1e-2, seed=7).state_dict()
    assert all(torch.equal(first[k], v) for k, v in second.items())
