"""LAPE neurons and gradient x activation screens on a tiny Llama built in code."""

from __future__ import annotations

import copy
import functools
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from msa_edit.errors import MsaEditError
from msa_edit.lesions import scaled
from msa_edit.screens import (
    activation_probability,
    gate_attribution,
    lape_entropy,
    lape_select,
    specific_select,
)
from msa_edit.units import Unit, select

LANGS = ["a", "b"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=32,
    )
    return LlamaForCausalLM(config).float().eval()


@pytest.fixture(scope="module")
def blocks() -> dict[str, torch.Tensor]:
    """Language "a" uses token ids 0-31, "b" ids 32-63."""
    gen = torch.Generator().manual_seed(1)
    return {
        "a": torch.randint(0, 32, (3, 10), generator=gen),
        "b": torch.randint(32, 64, (3, 10), generator=gen),
    }


def _rms_norm(norm: LlamaRMSNorm, x: torch.Tensor) -> torch.Tensor:
    return norm.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)


def _float64(model: LlamaForCausalLM) -> LlamaForCausalLM:
    """A float64 copy whose RMS norms stay in float64 (HF's compute in float32), so finite
    differences with a small step are exact to ~1e-9."""
    model = copy.deepcopy(model).double()
    for module in model.modules():
        if isinstance(module, LlamaRMSNorm):
            module.forward = functools.partial(_rms_norm, module)  # type: ignore[method-assign]
    return model


def _mean_nll(model: torch.nn.Module, ids: torch.Tensor) -> float:
    """Mean next-token NLL in the model's dtype (float64 for the finite differences)."""
    logits = model(input_ids=ids, use_cache=False).logits
    logp = torch.log_softmax(logits[:, :-1], -1)
    return float(-logp.gather(-1, ids[:, 1:, None]).mean())


# -- activation_probability ---------------------------------------------------------------------
def test_activation_probability_matches_brute_force(llama, blocks):
    prob = activation_probability(llama, blocks, batch_size=2)  # 3 rows: two batches
    assert prob.shape == (2, 48, 2)
    for layer_idx, layer in enumerate(llama.model.layers):
        mlp = layer.mlp
        expected = []
        for lang in LANGS:
            inputs: list[torch.Tensor] = []
            handle = mlp.register_forward_pre_hook(
                lambda m, args, seen=inputs: seen.append(args[0])
            )
            try:
                with torch.no_grad():
                    llama(input_ids=blocks[lang])
            finally:
                handle.remove()
            with torch.no_grad():
                act = mlp.act_fn(mlp.gate_proj(inputs[0]))  # LAPE: act_fn output
            expected.append((act > 0).double().mean((0, 1)))
        torch.testing.assert_close(prob[layer_idx], torch.stack(expected, -1).float())
    assert 0 < float(prob.mean()) < 1


def test_planted_language_neuron_is_found(llama, blocks):
    """Neuron 7 of layer 0 fires exactly on language a's tokens; nothing else sees a vs b."""
    model = copy.deepcopy(llama)
    planted = 7
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        emb[:32, 0], emb[32:, 0] = 1.0, -1.0  # dimension 0: which language
        emb[:, 1] = 1.0  # dimension 1: on for every token
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.gate_proj.weight[:, 0] = 0.0
            layer.mlp.up_proj.weight[:, 0] = 0.0
        mlp = model.model.layers[0].mlp
        mlp.gate_proj.weight[planted] = 0.0
        mlp.gate_proj.weight[planted, 0] = 1.0  # silu(+) > 0 on a, silu(-) < 0 on b
        mlp.up_proj.weight[planted] = 0.0
        mlp.up_proj.weight[planted, 1] = 1.0  # > 0 everywhere
        mlp.down_proj.weight[:, planted] = 0.0  # no trace downstream
    prob = activation_probability(model, blocks)
    assert prob[0, planted].tolist() == [1.0, 0.0]
    entropy = lape_entropy(prob)
    assert float(entropy[0, planted]) == 0.0
    assert lape_select(prob, LANGS, "a", 1) == [Unit(0, "neurons", planted)]
    chosen_b = lape_select(prob, LANGS, "b", int((prob[..., 1] > prob[..., 0]).sum()))
    assert Unit(0, "neurons", planted) not in chosen_b


# -- lape_entropy / lape_select -----------------------------------------------------------------
def test_lape_entropy_closed_form():
    prob = torch.tensor(
        [[[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.2, 0.2, 0.0], [0.6, 0.2, 0.2], [0.0, 0.0, 0.0]]]
    )
    q = torch.tensor([0.6, 0.2, 0.2])
    expected = [0.0, math.log(2), math.log(2), float(-(q * q.log()).sum()), math.inf]
    torch.testing.assert_close(lape_entropy(prob)[0], torch.tensor(expected))


def test_lape_select_ranking_and_ties():
    # [layers=2, neurons=3, languages=2]
    prob = torch.tensor(
        [
            [[0.4, 0.0], [0.3, 0.1], [0.1, 0.9]],  # L0: H=0 (p .4), H>0, b-neuron
            [[0.8, 0.0], [0.3, 0.1], [0.5, 0.5]],  # L1: H=0 (p .8), same as L0.1, tie a=b
        ]
    )
    expected = [Unit(1, "neurons", 0), Unit(0, "neurons", 0), Unit(0, "neurons", 1)]
    expected.append(Unit(1, "neurons", 1))  # ties with layers.0.mlp.neurons.1: unit order
    assert lape_select(prob, LANGS, "a", 4) == expected
    with pytest.raises(MsaEditError, match="only 4 neurons"):
        lape_select(prob, LANGS, "a", 5)  # the a = b neuron is nobody's
    assert lape_select(prob, LANGS, "b", 1) == [Unit(0, "neurons", 2)]
    assert lape_select(prob, LANGS, "a", 1, min_probability=0.5) == [Unit(1, "neurons", 0)]
    with pytest.raises(MsaEditError, match="only 1 neurons"):
        lape_select(prob, LANGS, "a", 2, min_probability=0.5)
    assert lape_select(prob, LANGS, "a", 0) == []


def test_lape_select_too_few_is_one_line_error():
    prob = torch.tensor([[[0.4, 0.0], [0.1, 0.9], [0.5, 0.5]]])
    with pytest.raises(MsaEditError, match=r"only 1 neurons are most active on 'a' \(count=2\)"):
        lape_select(prob, LANGS, "a", 2)
    with pytest.raises(MsaEditError) as err:
        lape_select(prob, LANGS, "b", 3)
    assert "\n" not in str(err.value) and "lower count" in str(err.value)
    with pytest.raises(MsaEditError, match="not one of the languages"):
        lape_select(prob, LANGS, "c", 1)


# -- gate_attribution ---------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["heads", "neurons"])
def test_gate_attribution_matches_finite_difference(llama, blocks, kind):
    model = _float64(llama)
    units, scores = gate_attribution(model, blocks, kind, batch_size=2)
    assert units == select(model, f"layers.*.{'heads' if kind == 'heads' else 'mlp.neurons'}.*")
    assert scores.shape == (len(units), 2) and scores.dtype == torch.float32
    eps = 2.0**-10  # exact in the lesion's float32 factors
    for i in (0, len(units) // 2 + 1, len(units) - 1):
        for column, lang in enumerate(LANGS):
            with torch.no_grad(), scaled(model, {units[i]: 1 - eps}):
                down = _mean_nll(model, blocks[lang])
            with torch.no_grad(), scaled(model, {units[i]: 1 + eps}):
                up = _mean_nll(model, blocks[lang])
            finite = (down - up) / (2 * eps)  # ≈ -dL/dg
            assert float(scores[i, column]) == pytest.approx(finite, rel=1e-4, abs=1e-9)
    # the float32 model gives the same estimates to float32 precision
    _, scores32 = gate_attribution(llama, blocks, kind)
    torch.testing.assert_close(scores32, scores, rtol=1e-3, atol=1e-5)


def test_screens_leave_the_model_as_it_was(llama, blocks):
    model = copy.deepcopy(llama).train()  # dropout is 0: train mode must not change logits
    ids = blocks["a"]
    with torch.no_grad():
        before = model(input_ids=ids).logits
    activation_probability(model, blocks)
    for kind in ("heads", "neurons"):
        gate_attribution(model, blocks, kind)
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert torch.equal(before, after)
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    assert all(m.training for m in model.modules())
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())


def test_hooks_and_flags_restored_after_an_error(llama, blocks):
    model = copy.deepcopy(llama)
    bad = {"a": blocks["a"], "b": torch.full((2, 10), 999)}  # ids beyond the vocabulary
    for call in (
        lambda: activation_probability(model, bad),
        lambda: gate_attribution(model, bad, "heads"),
    ):
        with pytest.raises(IndexError):
            call()
        assert not any(m._forward_pre_hooks for m in model.modules())
        assert all(p.grad is None and p.requires_grad for p in model.parameters())
    with pytest.raises(MsaEditError, match="choose one of heads, neurons, shared_experts"):
        gate_attribution(model, blocks, "experts")  # type: ignore[arg-type]


# -- specific_select ----------------------------------------------------------------------------
def test_specific_select_by_target_minus_max_other():
    units = [Unit(0, "heads", h) for h in range(5)]
    scores = torch.tensor(
        [
            [3.0, 2.9, 0.0],  # 0.1: big for a but also for b
            [1.0, 0.0, 0.5],  # 0.5
            [0.5, -1.0, 0.0],  # 0.5: ties with unit 1 -> unit order
            [0.0, 2.0, 0.0],  # -2.0
            [0.9, 0.1, -5.0],  # 0.8
        ]
    )
    langs = ["a", "b", "c"]
    assert specific_select(scores, units, langs, "a", 4) == [units[4], units[1], units[2], units[0]]
    assert specific_select(scores, units, langs, "b", 1) == [units[3]]
    with pytest.raises(MsaEditError, match="only 5 units"):
        specific_select(scores, units, langs, "a", 6)
    with pytest.raises(MsaEditError, match="3 languages named but the scores have 2"):
        specific_select(scores[:, :2], units, langs, "a", 1)
