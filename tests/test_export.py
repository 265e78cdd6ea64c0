"""export_model round-trips, writes a Hub model card and is atomic.

Pushing an export to the Hub is tested in test_hub.py.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from huggingface_hub import ModelCard
from tiny_models import VOCAB, build
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from msa_edit.errors import MsaEditError
from msa_edit.export import CardInfo, export_model
from msa_edit.plan import Plan

LINES = [
    "the cat sat on the mat",
    "a dog ran in the park",
    "кошка сидит на ковре",
    "собака бежит в парке",
] * 4

CARD = CardInfo(
    base_model="org/tiny-mixtral",
    license="apache-2.0",
    recipe={"model": "org/tiny-mixtral", "units": "layers.*.experts.*", "budget": 64},
    plan={
        "action": "remove",
        "units": ["layers.0.experts.3", "layers.1.experts.5"],
        "scores": {"layers.0.experts.3": 0.42, "layers.1.experts.5": 0.17},
        "target": "ru",
    },
    shapley={"method": "antithetic", "budget": 64, "seed": 0, "n_evaluations": 64},
    metrics={"before": {"nll/ru": 2.5, "ppl/ru": 12.18}, "after": {"nll/ru": 4.0, "ppl/ru": 54.6}},
)


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """A real `tokenizers` BPE trained on a few lines, vocabulary within the tiny models' 96."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<unk>", "<s>", "</s>"])
    tok.train_from_iterator(LINES, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


@pytest.fixture(scope="module")
def model() -> Any:
    return build("mixtral")


def _logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def _front_matter(text: str) -> dict[str, Any]:
    match = re.match(r"---\n(.*?)\n---\n", text, flags=re.S)
    assert match, "card has no YAML front matter"
    return yaml.safe_load(match.group(1))


def test_round_trip_gives_identical_logits(model, tokenizer, tmp_path: Path) -> None:
    out = export_model(model, tokenizer, tmp_path / "m", card=CARD)
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    tok2 = AutoTokenizer.from_pretrained(out)
    ids = torch.tensor([tokenizer("the cat sat in the park")["input_ids"]])
    assert tok2("the cat sat in the park")["input_ids"] == ids[0].tolist()
    assert torch.equal(_logits(model, ids), _logits(reloaded, ids))
    assert (out / "model.safetensors").is_file()
    assert json.loads((out / "msa_edit.json").read_text())["plan"]["action"] == "remove"


def test_forced_shards_reload(model, tmp_path: Path) -> None:
    out = export_model(model, None, tmp_path / "m", max_shard_size="40KB")
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1 and (out / "model.safetensors.index.json").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.arange(10).unsqueeze(0)
    assert torch.equal(_logits(model, ids), _logits(reloaded, ids))


def test_card_front_matter_and_sections(model, tokenizer, tmp_path: Path) -> None:
    text = (export_model(model, tokenizer, tmp_path / "m", card=CARD) / "README.md").read_text()
    meta = _front_matter(text)
    assert meta["base_model"] == "org/tiny-mixtral"
    assert "msa-edit" in meta["tags"]
    assert meta["license"] == "apache-2.0"
    assert meta["library_name"] == "transformers"
    assert "| `layers.0.experts.3` | 0.42 |" in text
    assert "- **method**: antithetic" in text and "- **n_evaluations**: 64" in text
    assert "| ppl/ru | 12.1800 | 54.6000 | +42.4200 |" in text  # rounded as report.md rounds
    recipe = re.search(r"```yaml\n(.*?)```", text, flags=re.S)
    assert recipe and yaml.safe_load(recipe.group(1)) == CARD.recipe


def test_license_carried_over_from_local_base_card(model, tmp_path: Path) -> None:
    base = tmp_path / "base"
    base.mkdir()
    (base / "README.md").write_text("---\nlicense: mit\ntags: [x]\n---\n# base\n")
    out = export_model(model, None, tmp_path / "m", card={"base_model": str(base)})
    meta = _front_matter((out / "README.md").read_text())
    assert meta["license"] == "mit"
    assert "base_model" not in meta, "a local path is no Hub id; the Hub would reject it"


def test_failure_midway_leaves_nothing(model, tokenizer, tmp_path, monkeypatch) -> None:
    def boom(*args: Any, **kwargs: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(type(tokenizer), "save_pretrained", boom)
    with pytest.raises(OSError, match="disk full"):
        export_model(model, tokenizer, tmp_path / "m", card=CARD)
    assert list(tmp_path.iterdir()) == []


def test_refuses_non_empty_then_overwrites_atomically(model, tokenizer, tmp_path, monkeypatch):
    out = tmp_path / "m"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(MsaEditError, match="overwrite=True"):
        export_model(model, None, out)
    monkeypatch.setattr(type(tokenizer), "save_pretrained", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        export_model(model, tokenizer, out, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["m"] and (out / "keep.txt").read_text() == "old"
    monkeypatch.undo()
    export_model(model, tokenizer, out, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["m"] and not (out / "keep.txt").exists()
    assert (out / "config.json").is_file()


def test_empty_existing_dir_is_fine(model, tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    assert (export_model(model, None, tmp_path / "m") / "config.json").is_file()


def test_unknown_card_field_is_one_line_error() -> None:
    with pytest.raises(MsaEditError, match="unknown model-card field") as err:
        CardInfo.from_dict({"base_model": "x", "licence": "mit"})
    assert "\n" not in str(err.value)


def test_a_scale_plans_factors_reach_the_card(model, tmp_path: Path) -> None:
    """The card reads the factors where `Plan` writes them (`alpha`)."""
    plan = Plan(action="scale", units=("layers.0.heads.1",), scores={"layers.0.heads.1": 0.3},
                target=["ru"], base_model="org/m", alpha={"layers.0.heads.1": 0.25})  # fmt: skip
    card = CardInfo(base_model="org/m", plan=plan.to_json())
    text = (export_model(model, None, tmp_path / "m", card=card) / "README.md").read_text()
    assert "| unit | score | scale |" in text
    assert "| `layers.0.heads.1` | 0.3 | 0.25 |" in text


def test_the_card_is_a_hub_model_card_with_model_index_results(model, tmp_path: Path) -> None:
    """huggingface_hub reads the card back: metadata, and eval.json's `after` numbers as
    model-index results (what the Hub shows as the model's evaluation)."""
    metrics = {
        "before": {"nll/ru": 2.5, "arc_easy/acc": 0.5},
        "after": {"nll/ru": 4.0, "ppl/ru": 54.6, "arc_easy/acc": 0.41, "nll/zh": None},
    }
    card = CardInfo(base_model="org/tiny-mixtral", license="mit", metrics=metrics)
    out = export_model(model, None, tmp_path / "m", card=card)
    parsed = ModelCard.load(out / "README.md")
    assert parsed.data.base_model == "org/tiny-mixtral" and parsed.data.license == "mit"
    results = {(r.dataset_type, r.metric_type): r.metric_value for r in parsed.data.eval_results}
    assert results == {("held-out ru text", "nll"): 4.0, ("held-out ru text", "perplexity"): 54.6,
                       ("arc_easy", "acc"): 0.41}  # fmt: skip
    assert parsed.data.model_name == "m"


def test_a_local_base_model_is_not_named_as_a_hub_model(model, tmp_path: Path) -> None:
    base = tmp_path / "base"
    base.mkdir()
    out = export_model(model, None, tmp_path / "m", card=CardInfo(base_model=str(base)))
    data = ModelCard.load(out / "README.md").data
    assert data.base_model is None and data.eval_results is None


def test_the_card_rounds_numbers_as_the_report_does(model, tmp_path: Path) -> None:
    from msa_edit.evaluate.numbers import fmt, fmt_delta

    metrics = {"before": {"nll/ru": 2.123456}, "after": {"nll/ru": 2.9876543}}
    card = CardInfo(base_model="org/m", metrics=metrics)
    text = (export_model(model, None, tmp_path / "m", card=card) / "README.md").read_text()
    row = f"| nll/ru | {fmt(2.123456)} | {fmt(2.9876543)} | {fmt_delta(2.9876543 - 2.123456)} |"
    assert row == "| nll/ru | 2.1235 | 2.9877 | +0.8642 |" and row in text
