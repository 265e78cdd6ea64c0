"""`msa_edit.quantize`: 4/8-bit loads quantise fused MoE experts, stay near fp32, fail clearly.

Measured on the tiny Mixtral below (CPU, AVX512-BF16 bitsandbytes kernels), relative L2 error of
the logits vs fp32: 4-bit nf4 ≈ 0.10, 8-bit ≈ 0.02; mean NLL differs by < 0.1 % for both (random
weights keep the logits near zero, so the NLL moves little). Footprint of the 4-bit load (with
fp32 embeddings, head and routers) ≈ 0.32 x the fp16 model, ≈ 0.30 after the first forward.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import tiny_models
import torch
from safetensors.torch import save_file
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

from msa_edit.edit import remove_experts
from msa_edit.errors import MsaEditError
from msa_edit.footprint import footprint
from msa_edit.lesions import lesioned
from msa_edit.linear_experts import LinearExperts, swap_fused_experts
from msa_edit.units import Unit

bnb = pytest.importorskip("bitsandbytes")
quantize = pytest.importorskip("msa_edit.quantize")
load_quantized = quantize.load_quantized

VOCAB = 128
EXPERTS = 8
LOGITS_REL_TOL = {4: 0.2, 8: 0.05}
NLL_REL_TOL = {4: 0.01, 8: 0.005}
SHAPLEY_REL_TOL = {(4, "zero"): 0.5, (8, "zero"): 0.12, (4, "reroute"): 0.5, (8, "reroute"): 0.12}
"""Relative L2 error of layer 1's expert Shapley modes vs fp32; measured 4-bit 0.33 (zero) and
0.17 (reroute), 8-bit 0.056 and 0.027 — on random weights whose experts move NLL by ~0.002 nats."""


def mixtral_config() -> MixtralConfig:
    """Experts dominate (small vocab, wide experts), as in real MoEs, so footprint ratios matter."""
    return MixtralConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=EXPERTS,
        num_experts_per_tok=2,
        max_position_embeddings=64,
    )


def build() -> MixtralForCausalLM:
    torch.manual_seed(0)
    return MixtralForCausalLM(mixtral_config()).eval()


@pytest.fixture(scope="module")
def reference() -> MixtralForCausalLM:
    """The fp32 model; read-only."""
    return build()


@pytest.fixture(scope="module")
def saved(reference: MixtralForCausalLM, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`reference` saved by `save_pretrained` (per-expert w1/w2/w3 keys, as transformers writes)."""
    path = tmp_path_factory.mktemp("mixtral")
    reference.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module", params=[4, 8])
def quantised(request: pytest.FixtureRequest, saved: Path) -> tuple[int, nn.Module]:
    return request.param, load_quantized(saved, bits=request.param, device="cpu")


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@torch.no_grad()
def logits_and_nll(model: nn.Module, tokens: torch.Tensor) -> tuple[torch.Tensor, float]:
    out = model(tokens, labels=tokens)
    return out.logits.float(), float(out.loss)


# --- the swap alone, fp32, no bitsandbytes ---------------------------------------------------


def test_swapped_experts_match_fused_eager_bit_for_bit() -> None:
    model = build()
    model.set_experts_implementation("eager")
    fused = model.model.layers[0].mlp.experts
    gen = torch.Generator().manual_seed(2)
    hidden = torch.randn(40, 64, generator=gen)
    index = torch.randint(0, EXPERTS + 1, (40, 2), generator=gen)  # EXPERTS = "no expert"
    weights = torch.rand(40, 2, generator=gen)
    with torch.no_grad():
        expected = fused(hidden, index, weights)
        got = LinearExperts.from_fused(fused)(hidden, index, weights)
    assert torch.equal(got, expected)


def test_swap_keeps_model_outputs_bit_identical_and_copies_nothing(tokens: torch.Tensor) -> None:
    model = build()
    model.set_experts_implementation("eager")
    before, _ = logits_and_nll(model, tokens)
    fused_ptr = model.model.layers[1].mlp.experts.gate_up_proj.data_ptr()
    names = swap_fused_experts(model)
    assert names == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    experts = model.model.layers[1].mlp.experts
    assert isinstance(experts, LinearExperts) and experts.num_experts == EXPERTS
    assert experts.gate_up_proj[0].weight.data_ptr() == fused_ptr
    after, _ = logits_and_nll(model, tokens)
    assert torch.equal(after, before)


def test_unsupported_fused_layout_is_refused() -> None:
    model = build()
    model.model.layers[0].mlp.experts.is_transposed = True
    with pytest.raises(MsaEditError, match="layout msa_edit cannot quantise"):
        swap_fused_experts(model)


# --- quantised loads ------------------------------------------------------------------------


def test_quantised_forward_is_close_to_fp32(
    quantised: tuple[int, nn.Module], reference: MixtralForCausalLM, tokens: torch.Tensor
) -> None:
    bits, model = quantised
    want_logits, want_nll = logits_and_nll(reference, tokens)
    logits, nll = logits_and_nll(model, tokens)
    assert logits.shape == want_logits.shape and torch.isfinite(logits).all()
    assert 0 < rel_error(logits, want_logits) < LOGITS_REL_TOL[bits]
    assert abs(nll - want_nll) / want_nll < NLL_REL_TOL[bits]


def test_experts_are_quantised_and_routers_are_not(
    quantised: tuple[int, nn.Module], reference: MixtralForCausalLM
) -> None:
    bits, model = quantised
    param_type, stored = {4: (bnb.nn.Params4bit, torch.uint8), 8: (bnb.nn.Int8Params, torch.int8)}[
        bits
    ]
    for i, layer in enumerate(model.model.layers):
        experts = layer.mlp.experts
        assert isinstance(experts, LinearExperts) and experts.num_experts == EXPERTS
        for linear in [*experts.gate_up_proj, *experts.down_proj, layer.self_attn.q_proj]:
            assert isinstance(linear.weight, param_type) and linear.weight.dtype == stored
        router = layer.mlp.gate.weight
        assert type(router) is nn.Parameter and router.dtype == torch.float32
        assert torch.equal(router, reference.model.layers[i].mlp.gate.weight)
    assert torch.equal(model.lm_head.weight, reference.lm_head.weight)
    assert not any(p.device.type == "meta" for p in model.parameters())


def test_4bit_footprint_is_at_most_035_of_fp16(
    saved: Path, reference: MixtralForCausalLM, tokens: torch.Tensor
) -> None:
    fp16 = footprint(build().half())
    assert fp16 == footprint(reference) // 2
    model = load_quantized(saved, bits=4, device="cpu")
    assert footprint(model) <= 0.35 * fp16
    logits_and_nll(model, tokens)  # bitsandbytes may repack weights on the first CPU forward
    assert footprint(model) <= 0.35 * fp16
    assert footprint(load_quantized(saved, bits=8, device="cpu")) <= 0.6 * fp16


def test_fused_and_sharded_checkpoints_load_to_the_same_model(
    reference: MixtralForCausalLM, saved: Path, tmp_path: Path, tokens: torch.Tensor
) -> None:
    fused = tmp_path / "fused"
    reference.config.save_pretrained(fused)  # transformers 5 module-tree keys: experts.gate_up_proj
    save_file(
        {k: v.contiguous() for k, v in reference.state_dict().items()}, fused / "model.safetensors"
    )
    sharded = tmp_path / "sharded"
    reference.save_pretrained(sharded, max_shard_size="1MB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    expected, _ = logits_and_nll(load_quantized(saved, bits=4, device="cpu"), tokens)
    for path in (fused, sharded):
        got, _ = logits_and_nll(load_quantized(path, bits=4, device="cpu"), tokens)
        assert torch.equal(got, expected)


def test_dense_model_takes_the_plain_bnb_path(tmp_path: Path, tokens: torch.Tensor) -> None:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    dense = LlamaForCausalLM(config).eval()
    dense.save_pretrained(tmp_path)
    model = load_quantized(tmp_path, bits=4, device="cpu")
    assert isinstance(model.model.layers[0].mlp.down_proj, bnb.nn.Linear4bit)
    logits, _ = logits_and_nll(model, tokens)
    assert rel_error(logits, logits_and_nll(dense, tokens)[0]) < LOGITS_REL_TOL[4]


def test_footprint_counts_shared_storage_once() -> None:
    embed = nn.Embedding(10, 4)
    head = nn.Linear(4, 10, bias=False)
    head.weight = embed.weight
    assert footprint(nn.ModuleList([embed, head])) == 10 * 4 * 4


# --- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [3, 16, True, "4"])
def test_bad_bits(bits: object, saved: Path) -> None:
    with pytest.raises(MsaEditError, match=r"use bits=4 \(nf4\) or bits=8"):
        load_quantized(saved, bits=bits)  # type: ignore[arg-type]


def test_missing_bitsandbytes(monkeypatch: pytest.MonkeyPatch, saved: Path) -> None:
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(MsaEditError, match=r"pip install -e '\.\[quant\]'"):
        load_quantized(saved, bits=4)


def test_not_a_model_directory(tmp_path: Path) -> None:
    with pytest.raises(MsaEditError, match="not a model directory"):
        load_quantized(tmp_path / "no" / "such" / "dir", bits=4)
    with pytest.raises(MsaEditError, match="cannot read a model config"):
        load_quantized(tmp_path, bits=4)


def test_unknown_hub_id_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MsaEditError, match="locally or on the Hub"):
        load_quantized("msa-edit-no-such-org/no-such-model", bits=4)


def test_checkpoint_without_safetensors(tmp_path: Path) -> None:
    mixtral_config().save_pretrained(tmp_path)
    with pytest.raises(MsaEditError, match="no safetensors weights"):
        load_quantized(tmp_path, bits=4, device="cpu")


def test_incomplete_or_foreign_checkpoint(reference: MixtralForCausalLM, tmp_path: Path) -> None:
    state = {k: v.contiguous() for k, v in reference.state_dict().items()}
    reference.config.save_pretrained(tmp_path)
    missing = {k: v for k, v in state.items() if k != "model.norm.weight"}
    save_file(missing, tmp_path / "model.safetensors")
    with pytest.raises(MsaEditError, match=r"missing from the checkpoint .*model\.norm\.weight"):
        load_quantized(tmp_path, bits=8, device="cpu")
    save_file({**state, "model.extra.weight": torch.zeros(2)}, tmp_path / "model.safetensors")
    with pytest.raises(MsaEditError, match="match nothing"):
        load_quantized(tmp_path, bits=8, device="cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_without_cuda(saved: Path) -> None:
    with pytest.raises(MsaEditError, match="CUDA is not available"):
        load_quantized(saved, bits=4, device="cuda")


# --- lesion games on the quantised model --------------------------------------------------------


@pytest.mark.parametrize("lesion", ["zero", "reroute"])
def test_shapley_modes_on_quantised_model_are_close_to_fp32(
    quantised: tuple[int, nn.Module], reference: MixtralForCausalLM, tokens: torch.Tensor, lesion
) -> None:
    from msa_edit.games import LesionGame, MeanNLL, Targets
    from msa_edit.shapley import estimate
    from msa_edit.units import select

    bits, model = quantised
    targets = Targets.from_dict({"a": tokens[:2], "b": tokens[2:]})

    def modes(net: nn.Module) -> torch.Tensor:
        units = select(net, "layers.1.experts.*")
        game = LesionGame(net, units, targets, MeanNLL(), lesion)
        return estimate(game, len(units), method="exact", progress=False).values

    want, got = modes(reference), modes(model)
    assert float(want.abs().max()) > 1e-3  # the experts matter
    assert rel_error(got, want) < SHAPLEY_REL_TOL[(bits, lesion)]


# --- the other MoE families ------------------------------------------------------------------


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3", "glm4_moe"])
def test_quantised_reroute_is_the_quantised_edit(family: str, tmp_path: Path) -> None:
    """Each expert is its own quantised Linear and the router stays in fp32, so the `reroute`
    lesion of a 4-bit model equals the 4-bit load of the full-precision edit."""
    model = tiny_models.build(family)
    units = [Unit(la, "experts", e) for la in (0, 1) for e in (1, 4)]
    model.save_pretrained(tmp_path / "full")
    edited = copy.deepcopy(model)
    remove_experts(edited, units)
    edited.save_pretrained(tmp_path / "edited")
    full = load_quantized(tmp_path / "full", bits=4, device="cpu")
    small = load_quantized(tmp_path / "edited", bits=4, device="cpu")
    for i, layer in enumerate(full.model.layers):
        assert isinstance(layer.mlp.experts, LinearExperts)
        assert isinstance(layer.mlp.experts.down_proj[0].weight, bnb.nn.Params4bit)
        assert torch.equal(
            layer.mlp.gate.state_dict()["weight"], model.model.layers[i].mlp.gate.weight
        )
    ids = torch.randint(3, tiny_models.VOCAB, (3, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with lesioned(full, units, "reroute"):
            lesioned_logits = full(ids).logits
        want = small(ids).logits
        intact = full(ids).logits
    assert (lesioned_logits - want).abs().max() <= 1e-5
    assert rel_error(lesioned_logits, intact) > 1e-3  # the lesion changed something


def test_gpt_oss_experts_are_refused_in_one_line(tmp_path: Path) -> None:
    tiny_models.build("gpt_oss").save_pretrained(tmp_path)
    with pytest.raises(MsaEditError, match=r"GptOssExperts.*load it in full precision"):
        load_quantized(tmp_path, bits=4, device="cpu")
