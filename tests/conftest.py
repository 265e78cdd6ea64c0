"""Shared fixtures: tiny models built from configs in code (never downloaded), read-only."""

from __future__ import annotations

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
