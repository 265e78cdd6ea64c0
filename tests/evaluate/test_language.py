"""Per-language NLL/perplexity through the local `evaluate` metric, and the eval.json record."""

from __future__ import annotations

import json
import math
import socket

import pytest
import torch
from tiny_models import build
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from msa_edit.errors import MsaEditError
from msa_edit.evaluate.language import (
    NLL_METRIC,
    compare,
    language_nll,
    read_eval_json,
    write_eval_json,
)
from msa_edit.evaluate.metrics.nll import mean_nll
from msa_edit.games import token_nll
from msa_edit.lesions import lesioned
from msa_edit.texts import text_blocks
from msa_edit.units import select

LINES = {
    "en": ["the cat sat on the mat", "a dog ran in the park", "the bird sang all day"],
    "de": ["die katze sass auf der matte", "ein hund lief im park", "der vogel sang"],
}
N_SEQ, SEQ_LEN = 4, 16


@pytest.fixture(scope="module")
def model():
    return build("mixtral")


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    lines = [line for group in LINES.values() for line in group]
    tok.train_from_iterator(
        lines, trainers.BpeTrainer(vocab_size=80, special_tokens=["<unk>", "</s>"])
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>")


@pytest.fixture
def texts(tmp_path):
    paths = {}
    for lang, lines in LINES.items():
        paths[lang] = tmp_path / f"{lang}.txt"
        paths[lang].write_text("\n".join(lines * 10) + "\n")
    return paths


def test_metric_module_loads_offline_by_path(monkeypatch) -> None:
    import evaluate

    def no_network(*args, **kwargs):
        raise AssertionError("the local metric must not touch the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    metric = evaluate.load(str(NLL_METRIC), keep_in_memory=True)
    scores = metric.compute(nll_sum=[2.0, 4.0], n_tokens=[2, 4])
    assert scores["nll"] == 1.0
    assert scores["perplexity"] == pytest.approx(math.e)


def test_mean_nll_edge_cases() -> None:
    assert mean_nll([1e6], [1])["perplexity"] == math.inf  # overflow gives inf, not an error
    with pytest.raises(ValueError, match="positive total"):
        mean_nll([1.0], [0])
    with pytest.raises(ValueError, match="n_tokens values"):
        mean_nll([1.0, 2.0], [1])


def test_language_nll_equals_direct_computation(model, tokenizer, texts) -> None:
    scores = language_nll(model, tokenizer, texts, n_seq=N_SEQ, seq_len=SEQ_LEN, batch_size=3)
    assert list(scores) == ["nll/en", "ppl/en", "bpb/en", "nll/de", "ppl/de", "bpb/de"]
    for lang, path in texts.items():
        blocks = text_blocks(tokenizer, path, N_SEQ, SEQ_LEN)
        with torch.inference_mode():
            nll = token_nll(model(blocks).logits, blocks).double()
        assert scores[f"nll/{lang}"] == pytest.approx(nll.mean().item(), abs=1e-6)
        assert scores[f"ppl/{lang}"] == pytest.approx(math.exp(scores[f"nll/{lang}"]), rel=1e-12)
        text = [tokenizer.decode(row[1:], skip_special_tokens=True) for row in blocks.tolist()]
        n_bytes = sum(len(t.encode("utf-8")) for t in text)  # the predicted tokens' text
        bits = nll.sum().item() / math.log(2) / n_bytes
        assert scores[f"bpb/{lang}"] == pytest.approx(bits, rel=1e-6)
    assert scores["nll/en"] != scores["nll/de"]


def test_lesioned_model_changes_nll_and_restores(model, tokenizer, texts) -> None:
    kwargs = dict(n_seq=N_SEQ, seq_len=SEQ_LEN)
    before = language_nll(model, tokenizer, texts, **kwargs)
    with lesioned(model, select(model, "layers.*.experts.*"), "zero"):
        lesion = language_nll(model, tokenizer, texts, **kwargs)
    assert all(abs(lesion[k] - before[k]) > 1e-4 for k in before)
    assert language_nll(model, tokenizer, texts, **kwargs) == before


def test_missing_file_is_a_clear_error(model, tokenizer, texts, tmp_path) -> None:
    with pytest.raises(MsaEditError, match="does not exist"):
        language_nll(
            model, tokenizer, {**texts, "xx": tmp_path / "missing.txt"}, n_seq=1, seq_len=4
        )
    with pytest.raises(MsaEditError, match="no held-out texts"):
        language_nll(model, tokenizer, {})


def test_eval_json_round_trip_is_strict_json(tmp_path) -> None:
    before = {"nll/ru": 2.5, "ppl/ru": math.exp(2.5)}
    after = {"nll/ru": 3.0, "ppl/ru": math.exp(3.0)}
    path = write_eval_json(tmp_path / "run" / "eval.json", before, after)
    record = read_eval_json(path)
    assert record == compare(before, after)
    assert record["before"] == before and record["after"] == after
    assert record["delta"]["nll/ru"] == pytest.approx(0.5)
    json.loads(path.read_text(), parse_constant=lambda token: pytest.fail(token))
    assert [p.name for p in path.parent.iterdir()] == ["eval.json"]  # no temp file left


def test_eval_json_rejects_non_finite_and_leaves_old_file(tmp_path) -> None:
    path = write_eval_json(tmp_path / "eval.json", {"nll/ru": 1.0}, {"nll/ru": 2.0})
    old = path.read_text()
    with pytest.raises(MsaEditError, match="not finite"):
        write_eval_json(path, {"nll/ru": 1.0}, {"nll/ru": math.nan})
    assert path.read_text() == old
    (tmp_path / "bad.json").write_text('{"before": {"x": NaN}, "after": {}}')
    with pytest.raises(MsaEditError, match="strict JSON"):
        read_eval_json(tmp_path / "bad.json")
