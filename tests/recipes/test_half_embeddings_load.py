"""`model.embeddings: float16` on a 4-bit load: the embeddings and head are stored half, the
footprint falls by exactly their saved bytes, and the loss barely moves."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from msa_edit.errors import MsaEditError
from msa_edit.footprint import footprint
from msa_edit.half_embeddings import HalfEmbedding
from msa_edit.optional import available
from msa_edit.recipes.runner import load_model
from msa_edit.recipes.schema import ModelStage, as_recipe

pytestmark = pytest.mark.skipif(not available("bitsandbytes"), reason="pip install bitsandbytes")


def test_a_4bit_load_with_half_embeddings(tiny_mixtral: Path) -> None:
    plain = load_model(ModelStage(path=str(tiny_mixtral), bits=4), say=lambda _: None).model
    half = load_model(
        ModelStage(path=str(tiny_mixtral), bits=4, embeddings="float16"), say=lambda _: None
    ).model
    assert isinstance(half.get_input_embeddings(), HalfEmbedding)
    embed, head = plain.get_input_embeddings().weight, plain.get_output_embeddings().weight
    tied = embed is head
    saved = embed.numel() * 2 + (0 if tied else head.numel() * 2)
    assert footprint(plain) - footprint(half) == saved
    ids = torch.arange(1, 33).reshape(2, 16)
    with torch.inference_mode():
        a, b = plain(ids, labels=ids).loss, half(ids, labels=ids).loss
    assert abs(float(a - b)) < 1e-3 and float(a - b) != 0.0


def test_half_embeddings_need_a_quantised_load() -> None:
    data = {"model": {"path": "org/m", "embeddings": "float16"}, "units": "layers.*.heads.*",
            "targets": {"sets": {"en": {"path": "org/en"}}}, "estimator": {}}  # fmt: skip
    with pytest.raises(MsaEditError, match=r"model\.embeddings: only used with bits: 4 or 8"):
        as_recipe(data)
