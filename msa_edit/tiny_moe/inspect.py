"""What a trained tiny MoE learned: held-out NLL, and which experts each language's tokens go to.

>>> # routing = routing_by_language(model, tokenizer, {"en": lines}, seq_len=64)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from msa_edit.games import token_nll
from msa_edit.tiny_moe.text import token_stream, windows


@torch.no_grad()
def mean_nll(model: Any, batch: torch.Tensor, batch_size: int = 32) -> float:
    """Mean next-token negative log-likelihood (nats) of `model` over the rows of `batch`."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for rows in batch.split(batch_size):
            logits = model(input_ids=rows).logits
            total += float(token_nll(logits, rows).double().sum())
            count += rows[:, 1:].numel()
    finally:
        model.train(was_training)
    return total / max(count, 1)


@torch.no_grad()
def routing_by_language(
    model: Any,
    tokenizer: Any,
    texts: Mapping[str, Sequence[str]],
    seq_len: int | None = None,
    batch_size: int = 32,
) -> torch.Tensor:
    """Fraction of each language's tokens that each layer routes to each expert (top-k choice).

    `texts` maps a language to its lines. Returns `[n_layers, n_experts, n_langs]` (languages
    in the order of `texts`); each column sums to top-k, so uniform routing is top_k / n_experts.
    Windows are `seq_len` tokens (default: the model's `max_position_embeddings`).

    >>> from transformers import MixtralForCausalLM
    >>> from msa_edit.tiny_moe import TinyMoeConfig, train_tokenizer
    >>> tok = train_tokenizer(["a b c", "x y z"], vocab=270)
    >>> small = TinyMoeConfig(layers=1, experts=4, hidden=16, intermediate=16, heads=2, seq_len=8)
    >>> model = MixtralForCausalLM(small.mixtral_config(len(tok)))
    >>> routing = routing_by_language(model, tok, {"abc": ["a b c"], "xyz": ["x y z"]})
    >>> routing.shape, bool(torch.allclose(routing.sum(dim=1), torch.tensor(2.0)))
    (torch.Size([1, 4, 2]), True)
    """
    config = model.config
    seq_len = seq_len or config.max_position_embeddings
    k, n_experts = config.num_experts_per_tok, config.num_local_experts
    was_training = model.training
    model.eval()
    out = torch.zeros(config.num_hidden_layers, n_experts, len(texts))
    try:
        for j, lines in enumerate(texts.values()):
            batch = windows(token_stream(tokenizer, lines), seq_len)
            for rows in batch.split(batch_size):
                router_logits = model(input_ids=rows, output_router_logits=True).router_logits
                for layer, logits in enumerate(router_logits):
                    chosen = logits.topk(k, dim=-1).indices.reshape(-1)
                    out[layer, :, j] += torch.bincount(chosen, minlength=n_experts).float()
            out[:, :, j] /= batch.numel()
    finally:
        model.train(was_training)
    return out


def routing_summary(routing: torch.Tensor, languages: Sequence[str], top_k: int) -> str:
    """Per layer and language: the expert taking most of its tokens, and (with several
    languages) its most selective expert, whose share most exceeds the other languages' mean.

    >>> r = torch.tensor([[[0.9, 0.6], [0.1, 0.4]]])  # 1 layer, 2 experts, 2 languages
    >>> print(routing_summary(r, ["en", "de"], top_k=1))
    share of each language's tokens (uniform 0.50); selective: share vs other languages' mean
    layer 0 top:       en e0 0.90       de e0 0.60
            selective: en e0 0.90/0.60  de e1 0.40/0.10
    """
    n_experts, n_langs = routing.shape[1], routing.shape[2]
    lines = [
        f"share of each language's tokens (uniform {top_k / n_experts:.2f}); "
        "selective: share vs other languages' mean"
    ]
    for layer, shares in enumerate(routing):
        top = shares.argmax(dim=0)
        cells = [f"{lang} e{int(e)} {float(shares[e, j]):.2f}" for j, (lang, e) in
                 enumerate(zip(languages, top, strict=True))]  # fmt: skip
        lines.append(f"layer {layer} top:       " + "  ".join(f"{c:<15}" for c in cells).rstrip())
        if n_langs < 2:
            continue
        others = (shares.sum(dim=1, keepdim=True) - shares) / (n_langs - 1)
        chosen = (shares - others).argmax(dim=0)
        cells = [
            f"{lang} e{int(e)} {float(shares[e, j]):.2f}/{float(others[e, j]):.2f}"
            for j, (lang, e) in enumerate(zip(languages, chosen, strict=True))
        ]
        lines.append(" " * len(f"layer {layer} ") + "selective: " + "  ".join(cells))
    return "\n".join(lines)
