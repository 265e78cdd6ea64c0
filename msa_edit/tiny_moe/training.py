"""Training the tiny MoE: reproducible (one thread, deterministic algorithms, a seeded
generator), by steps, with the family's own auxiliary loss.

>>> # losses = train(new_model(config, vocab_size), streams, config)
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from msa_edit.progress import Progress
from msa_edit.tiny_moe.config import TinyMoeConfig


@contextlib.contextmanager
def reproducible(seed: int) -> Iterator[None]:
    """Seed a forked global RNG, require deterministic algorithms and use one CPU thread (CPU
    kernels split work by thread count, which changes the bits); restore all three after."""
    deterministic, threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.use_deterministic_algorithms(True)
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(deterministic)
            torch.set_num_threads(threads)


def _sample_batch(
    streams: Sequence[torch.Tensor], step: int, config: TinyMoeConfig, gen: torch.Generator
) -> torch.Tensor:
    """Rows of `seq_len` tokens at random offsets, languages taken in turn (balanced)."""
    n, size = len(streams), config.batch_size
    draws = torch.randint(0, 2**62, (size,), generator=gen)
    rows = []
    for i in range(size):
        stream = streams[(step * size + i) % n]
        start = int(draws[i]) % (len(stream) - config.seq_len + 1)
        rows.append(stream[start : start + config.seq_len])
    return torch.stack(rows)


def _lr_factor(step: int, config: TinyMoeConfig) -> float:
    """Linear warmup then cosine decay to 10% of the peak learning rate."""
    warmup = max(1, round(config.warmup * config.steps))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, config.steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def train(model: Any, streams: Sequence[torch.Tensor], config: TinyMoeConfig) -> list[float]:
    """Train in place for `config.steps` steps; returns the language-model loss of every step."""
    gen = torch.Generator().manual_seed(config.seed)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr, betas=(0.9, 0.95),
    )  # fmt: skip
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, config))
    model.train()
    losses: list[float] = []
    with Progress(config.steps, "tiny-moe training", "step") as bar:
        for step in range(config.steps):
            batch = _sample_batch(streams, step, config, gen)
            out = model(input_ids=batch, output_router_logits=True)
            lm_loss = F.cross_entropy(
                out.logits[:, :-1].reshape(-1, out.logits.shape[-1]), batch[:, 1:].reshape(-1)
            )
            loss = lm_loss + config.aux_loss_coef * out.aux_loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            losses.append(float(lm_loss.detach()))
            bar.set_postfix(loss=losses[-1])
            bar.update()
    model.eval()
    return losses


@contextlib.contextmanager
def no_transformers_bars() -> Iterator[None]:
    """Silence transformers' own progress bars (e.g. "Writing model shards") for a block."""
    from transformers.utils import logging

    enabled = logging.is_progress_bar_enabled()
    if enabled:
        logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            logging.enable_progress_bar()


def new_model(config: TinyMoeConfig, vocab_size: int) -> Any:
    """A freshly initialised causal LM of the config's family (call under `reproducible`)."""
    from transformers import MixtralForCausalLM, OlmoeForCausalLM

    hf_config = config.hf_config(vocab_size)
    hf_config._experts_implementation = "eager"  # the reference loop, not a fused kernel
    model_class = OlmoeForCausalLM if config.family == "olmoe" else MixtralForCausalLM
    return model_class(hf_config)
