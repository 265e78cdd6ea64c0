"""Tiny models of every supported family, built from configs in code (never downloaded)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    DeepseekV3Config,
    Glm4MoeConfig,
    GPT2Config,
    GptOssConfig,
    LlamaConfig,
    MixtralConfig,
    OlmoeConfig,
    PreTrainedModel,
    Qwen2MoeConfig,
    Qwen3MoeConfig,
)

import msa_edit

VOCAB = 96
UD_TEXT = Path(msa_edit.__file__).parent / "data" / "ud-text"
"""The bundled multilingual text (CC BY-SA 4.0, see SOURCES.md there)."""
LANGS = ("en", "ru", "zh")
"""Languages the tiny test Mixtral of `tests/recipes` is trained on."""


def write_texts(folder: Path, langs: tuple[str, ...], n_lines: int) -> dict[str, Path]:
    """The first `n_lines` of each language's bundled text, as files in `folder`."""
    out = {}
    for lang in langs:
        lines = (UD_TEXT / f"{lang}.txt").read_text(encoding="utf-8").splitlines()[:n_lines]
        out[lang] = folder / f"{lang}.txt"
        out[lang].write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out


def tiny_config(model_type: str):
    """Config of a 2-layer model with hidden size 32 of the given family."""
    common = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        bos_token_id=1,
        eos_token_id=2,
    )
    if model_type == "mixtral":
        return MixtralConfig(
            **common,
            intermediate_size=48,
            num_local_experts=6,
            num_experts_per_tok=2,
            num_key_value_heads=2,
            max_position_embeddings=64,
        )
    if model_type == "qwen2_moe":
        return Qwen2MoeConfig(
            **common,
            intermediate_size=48,
            moe_intermediate_size=24,
            shared_expert_intermediate_size=32,
            num_experts=6,
            num_experts_per_tok=2,
            num_key_value_heads=2,
            norm_topk_prob=False,
            max_position_embeddings=64,
            decoder_sparse_step=1,
            mlp_only_layers=[],
        )
    if model_type == "olmoe":
        return OlmoeConfig(
            **common,
            intermediate_size=24,
            num_experts=6,
            num_experts_per_tok=2,
            num_key_value_heads=2,
            norm_topk_prob=True,
            max_position_embeddings=64,
        )
    if model_type == "qwen3_moe":
        return Qwen3MoeConfig(
            **common,
            intermediate_size=48,
            moe_intermediate_size=24,
            num_experts=6,
            num_experts_per_tok=2,
            num_key_value_heads=2,
            head_dim=8,
            norm_topk_prob=True,
            max_position_embeddings=64,
            decoder_sparse_step=1,
            mlp_only_layers=[],
        )
    if model_type in ("deepseek_v3", "glm4_moe"):
        # two expert groups of three (DeepSeek picks one group per token); GLM-4.5's one group
        deepseek = model_type == "deepseek_v3"
        config = DeepseekV3Config if deepseek else Glm4MoeConfig
        attention = (
            dict(num_key_value_heads=4, q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=4,
                 qk_nope_head_dim=4, v_head_dim=8)
            if deepseek
            else dict(num_key_value_heads=2, head_dim=8)
        )  # fmt: skip
        return config(
            **common,
            **attention,
            intermediate_size=48,
            moe_intermediate_size=16,
            n_routed_experts=6,
            n_shared_experts=2 if deepseek else 1,
            n_group=2 if deepseek else 1,
            topk_group=1,
            num_experts_per_tok=2,
            first_k_dense_replace=0,
            routed_scaling_factor=2.5 if deepseek else 1.5,
            norm_topk_prob=True,
            max_position_embeddings=64,
        )
    if model_type == "gpt_oss":
        return GptOssConfig(
            **common,
            intermediate_size=24,
            num_local_experts=6,
            num_experts_per_tok=2,
            num_key_value_heads=2,
            head_dim=8,
            sliding_window=8,
            layer_types=["sliding_attention", "full_attention"],
            max_position_embeddings=64,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        )
    if model_type == "llama":
        return LlamaConfig(
            **common, intermediate_size=40, num_key_value_heads=2, max_position_embeddings=64
        )
    if model_type == "gpt2":
        return GPT2Config(
            vocab_size=VOCAB,
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=64,
            bos_token_id=1,
            eos_token_id=2,
        )
    raise ValueError(model_type)


def build(model_type: str, seed: int = 0) -> PreTrainedModel:
    """A randomly initialised tiny model in fp32 eval mode (seeded, so reproducible)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type), dtype=torch.float32)
    for name, buffer in model.named_buffers():
        if name.endswith("e_score_correction_bias"):  # zeros at init; real models learn it
            buffer.copy_(0.01 * torch.randn_like(buffer))
    for name, param in model.named_parameters():
        if name.endswith(("router.bias", "_proj_bias")):  # gpt-oss: zeros at init
            param.data.copy_(0.1 * torch.randn_like(param))
    return model.eval()


MOE_FAMILIES = ["mixtral", "qwen2_moe", "olmoe", "qwen3_moe", "deepseek_v3", "glm4_moe", "gpt_oss"]
ALL_FAMILIES = [*MOE_FAMILIES, "llama", "gpt2"]
