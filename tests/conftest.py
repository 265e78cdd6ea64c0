"""Shared fixtures: tiny models built from configs in code (never downloaded), read-only."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from tiny_models import ALL_FAMILIES, MOE_FAMILIES, VOCAB, build
from transformers import PreTrainedModel


@pytest.fixture(scope="session", params=ALL_FAMILIES)
def any_model(request) -> PreTrainedModel:
    return build(request.param)


@pytest.fixture(scope="session", params=MOE_FAMILIES)
def moe_model(request) -> PreTrainedModel:
    return build(request.param)


@pytest.fixture(scope="session")
def tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (3, 12), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One torch thread for a module (tiny matrices: ~100x faster than several on a busy
    machine, and the same numbers whatever the core count); the caller's count is restored."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
