"""A tiny Mixtral trained on the bundled text (dims that bitsandbytes 4-bit accepts on CPU)."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny_models import LANGS, write_texts

from msa_edit.tiny_moe import TinyMoeConfig, build_tiny_moe

SMALL = TinyMoeConfig(
    layers=2, experts=4, top_k=2, hidden=64, intermediate=128, heads=2, vocab=512, seq_len=32,
    batch_size=8, steps=60,
)  # fmt: skip


@pytest.fixture(scope="session")
def tiny_mixtral(tmp_path_factory) -> Path:
    """A 2-layer, 4-expert Mixtral with its tokenizer, trained for 60 steps on en/ru/zh."""
    texts = write_texts(tmp_path_factory.mktemp("texts"), LANGS, 300)
    return build_tiny_moe(texts, tmp_path_factory.mktemp("model") / "tiny", config=SMALL)
