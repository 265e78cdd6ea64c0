"""Token embeddings and output head stored in float16 while the model computes in its own dtype.

bitsandbytes quantises `nn.Linear` layers only, so a quantised model keeps its embedding matrix
(and the output head, often the same tied matrix) in the load's dtype. On a small dense model
that matrix dominates: SmolLM2-135M's tied 49,152 x 576 embedding is 67 % of its 4-bit
footprint in float32. `store_half` keeps both in float16 (half the bytes) and computes exactly as
before apart from the rounding of the stored weights: the embedding gathers rows and casts only
those, the head multiplies by the weight cast in vocabulary chunks (a few MB at a time, never the
whole matrix). Tied matrices stay one stored tensor.

>>> import torch
>>> from transformers import LlamaConfig, LlamaForCausalLM
>>> model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
...     num_hidden_layers=1, num_attention_heads=2, tie_word_embeddings=True))
>>> store_half(model)  # bytes saved: 64 x 16 x (4 - 2)
2048
>>> model(torch.tensor([[1, 2, 3]])).logits.dtype
torch.float32
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from msa_edit.errors import MsaEditError

HEAD_CHUNK = 4096
"""Vocabulary rows of the head's weight cast to the compute dtype at a time."""


class HalfEmbedding(nn.Module):
    """An `nn.Embedding` whose weight is stored in float16; rows come out in `dtype`."""

    def __init__(self, weight: nn.Parameter, dtype: torch.dtype, padding_idx: int | None) -> None:
        super().__init__()
        self.weight = weight
        self.dtype = dtype
        self.padding_idx = padding_idx

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.weight, self.padding_idx).to(self.dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, stored={self.weight.dtype}, computes={self.dtype}"


class HalfHead(nn.Module):
    """A bias-free output `nn.Linear` whose weight is stored in float16; it computes in the
    input's dtype, casting `HEAD_CHUNK` vocabulary rows of the weight at a time."""

    def __init__(self, weight: nn.Parameter) -> None:
        super().__init__()
        self.weight = weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        w = self.weight
        parts = [
            F.linear(hidden, w[i : i + HEAD_CHUNK].to(hidden.dtype))
            for i in range(0, w.shape[0], HEAD_CHUNK)
        ]
        return torch.cat(parts, -1)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, stored={self.weight.dtype}"


def store_half(model: nn.Module) -> int:
    """Store `model`'s input embeddings and output head in float16 (in place); bytes saved.

    The model must be a transformers causal LM whose embedding is an `nn.Embedding` and whose
    head, if any, a bias-free `nn.Linear` (tied or not). Their stored weights are rounded to
    float16 once; activations keep the embedding's original dtype.
    """
    embed = model.get_input_embeddings()  # type: ignore[operator]
    head = model.get_output_embeddings()  # type: ignore[operator]
    if isinstance(embed, HalfEmbedding):
        return 0  # stored half already
    if not isinstance(embed, nn.Embedding):
        raise MsaEditError(
            f"the input embedding is a {type(embed).__name__}, not an nn.Embedding; "
            "store_half works on plain transformers models"
        )
    if head is not None and (not isinstance(head, nn.Linear) or head.bias is not None):
        raise MsaEditError("the output head is not a bias-free nn.Linear; it cannot be stored half")
    dtype = embed.weight.dtype
    if not dtype.is_floating_point or dtype.itemsize <= 2:
        return 0  # already 16-bit (or integer): nothing to save
    tied = head is not None and head.weight is embed.weight
    before = embed.weight.numel() * dtype.itemsize
    half = nn.Parameter(embed.weight.detach().half(), requires_grad=False)
    model.set_input_embeddings(HalfEmbedding(half, dtype, embed.padding_idx))  # type: ignore[operator]
    saved = before - half.numel() * 2
    if head is not None:
        head_half = half if tied else nn.Parameter(head.weight.detach().half(), requires_grad=False)
        if not tied:
            saved += head.weight.numel() * (head.weight.dtype.itemsize - 2)
        model.set_output_embeddings(HalfHead(head_half))
    return saved
