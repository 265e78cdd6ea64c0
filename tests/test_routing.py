"""Router statistics (REAP saliency, selection frequency) against a hand computation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny_models import MOE_FAMILIES, VOCAB, build

from msa_edit.errors import MsaEditError
from msa_edit.routing import routing_stats
from msa_edit.units import Unit, decoder_layers, moe_parts, n_experts


@torch.no_grad()
def by_hand(model, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Frequency and REAP `[layers * experts]` from the MoE blocks' inputs, with plain matmuls."""
    inputs: list[torch.Tensor] = []
    handles = [
        moe_parts(model, layer)[0].register_forward_hook(
            lambda m, args, out: inputs.append(args[0].reshape(-1, args[0].shape[-1]))
        )
        for layer in decoder_layers(model)
    ]
    model(ids)
    for h in handles:
        h.remove()
    width = n_experts(model)
    freq, reap = [], []
    for layer, x in zip(decoder_layers(model), inputs, strict=True):
        gate, experts = moe_parts(model, layer)
        logits = x @ gate.weight.T + (gate.bias if getattr(gate, "bias", None) is not None else 0)
        sigmoid = hasattr(gate, "e_score_correction_bias")  # DeepSeek-V3, GLM-4 MoE
        probs = logits.sigmoid() if sigmoid else F.softmax(logits, dim=-1)  # the reference gate
        chosen = gate(x)[2]  # the family's own selection
        for e in range(width):
            tokens = (chosen == e).any(-1)
            out = expert_by_hand(experts, x[tokens], e)
            freq.append(float(tokens.sum()))
            reap.append(float((probs[tokens, e] * out.norm(dim=-1)).mean()) if tokens.any() else 0)
    return torch.tensor(freq, dtype=torch.float64), torch.tensor(reap, dtype=torch.float64)


def expert_by_hand(experts, x: torch.Tensor, e: int) -> torch.Tensor:
    """Expert e's unweighted output: SwiGLU, or gpt-oss's clamped, interleaved GLU with biases."""
    if not hasattr(experts, "gate_up_proj_bias"):
        g, u = (x @ experts.gate_up_proj[e].T).chunk(2, dim=-1)
        return (F.silu(g) * u) @ experts.down_proj[e].T
    h = x @ experts.gate_up_proj[e] + experts.gate_up_proj_bias[e]
    g, u = h[:, ::2].clamp(max=experts.limit), h[:, 1::2].clamp(-experts.limit, experts.limit)
    glu = (u + 1) * g * torch.sigmoid(experts.alpha * g)
    return glu @ experts.down_proj[e] + experts.down_proj_bias[e]


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_reap_and_frequency_equal_a_hand_computation(family: str) -> None:
    model = build(family)
    ids = torch.randint(0, VOCAB, (5, 12), generator=torch.Generator().manual_seed(1))
    stats = routing_stats(model, ids, batch_size=2)
    freq, reap = by_hand(model, ids)
    assert stats.units[:2] == (Unit(0, "experts", 0), Unit(0, "experts", 1))
    assert stats.frequency.tolist() == freq.tolist()
    assert stats.frequency.sum() == 5 * 12 * model.config.num_experts_per_tok * 2
    torch.testing.assert_close(stats.reap, reap, rtol=1e-5, atol=1e-7)
    wanted = [Unit(1, "experts", 3), Unit(0, "experts", 2)]
    assert stats.score("reap", wanted).tolist() == stats.reap[[9, 2]].tolist()


def test_the_applied_gate_is_the_renormalised_top_k_weight() -> None:
    ids = torch.randint(0, VOCAB, (4, 10), generator=torch.Generator().manual_seed(2))
    model = build("mixtral")  # renormalises its top-2 weights
    reference = routing_stats(model, ids)
    applied = routing_stats(model, ids, gate="applied")
    assert torch.equal(reference.frequency, applied.frequency)
    assert bool((applied.reap > reference.reap).all())  # p / (p_1 + p_2) > p for every expert
    plain = build("qwen2_moe")  # norm_topk_prob=False: the applied weight is p itself
    torch.testing.assert_close(
        routing_stats(plain, ids, gate="applied").reap, routing_stats(plain, ids).reap
    )


def test_routing_needs_experts() -> None:
    with pytest.raises(MsaEditError, match="no MoE experts"):
        routing_stats(build("llama"), torch.zeros(1, 4, dtype=torch.long))
    stats = routing_stats(build("mixtral"), torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(MsaEditError, match="unknown routing score"):
        stats.score("shapley", [Unit(0, "experts", 0)])
