"""lm-eval bridge: a tiny offline multiple-choice task scored on the in-memory model, checked
against the choice log-likelihoods computed here with the model directly."""

from __future__ import annotations

import json
import logging
import random
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from tiny_models import tiny_config
from transformers import AutoModelForCausalLM, PreTrainedModel

from msa_edit.errors import MsaEditError
from msa_edit.evaluate import harness
from msa_edit.evaluate.harness import lm_eval_scores
from msa_edit.tiny_moe import train_tokenizer

pytest.importorskip("lm_eval")

TASK_DIR = Path(__file__).parents[1] / "data" / "lm_eval_tasks"
TASK = "next_word"


@pytest.fixture(autouse=True)
def offline(monkeypatch) -> None:
    def no_network(*args, **kwargs):
        raise AssertionError("lm-eval on a local task must not touch the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    # simple_evaluate records the environment by running `pip list` (~0.6 s a call); unused here
    monkeypatch.setattr("lm_eval.evaluator.add_env_info", lambda results: None)


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return [json.loads(line) for line in (TASK_DIR / f"{TASK}.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def include_path(tmp_path_factory) -> Path:
    """The task YAML with the absolute path of its data (`datasets` resolves a relative one
    against the working directory) and a private `datasets` cache."""
    folder = tmp_path_factory.mktemp("lm_eval_tasks")
    config = yaml.safe_load((TASK_DIR / f"{TASK}.yaml").read_text())
    config["dataset_kwargs"]["data_files"]["test"] = str(TASK_DIR / f"{TASK}.jsonl")
    config["dataset_kwargs"]["cache_dir"] = str(tmp_path_factory.mktemp("hf_datasets"))
    (folder / f"{TASK}.yaml").write_text(yaml.safe_dump(config))
    return folder


@pytest.fixture(scope="module")
def tokenizer(rows):
    return train_tokenizer([f"{r['context']} {c}" for r in rows for c in r["choices"]], vocab=300)


@pytest.fixture
def model(tokenizer) -> PreTrainedModel:
    """A fresh tiny Llama (tied embeddings; wide init, so choices differ by more than rounding)."""
    config = tiny_config("llama")
    config.vocab_size = len(tokenizer)
    config.initializer_range = 0.5
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def direct_scores(model, tokenizer, rows) -> dict[str, float]:
    """acc / acc_norm by hand: sum of log-probs of " choice" after the context, argmax vs gold
    (acc_norm divides by the choice's length in characters, as lm-eval does)."""
    acc, acc_norm = [], []
    for row in rows:
        context = tokenizer(row["context"])["input_ids"]
        lls = []
        for choice in row["choices"]:
            ids = tokenizer(f"{row['context']} {choice}")["input_ids"]
            assert ids[: len(context)] == context
            with torch.no_grad():
                logprobs = model(torch.tensor([ids])).logits[0].log_softmax(-1)
            lls.append(sum(logprobs[t - 1, ids[t]].item() for t in range(len(context), len(ids))))
        lengths = np.array([len(choice) for choice in row["choices"]], dtype=float)
        acc.append(float(np.argmax(lls) == row["gold"]))
        acc_norm.append(float(np.argmax(np.array(lls) / lengths) == row["gold"]))
    return {f"{TASK}/acc": sum(acc) / len(acc), f"{TASK}/acc_norm": sum(acc_norm) / len(acc_norm)}


def test_scores_equal_direct_computation_before_and_after_an_edit(
    model, tokenizer, rows, include_path
) -> None:
    before = lm_eval_scores(model, tokenizer, [TASK], include_path=include_path)
    assert before == direct_scores(model, tokenizer, rows)
    assert 0 < before[f"{TASK}/acc"] < 1  # a score that can move either way
    with torch.no_grad():  # an in-place edit: the same model object, other weights
        for layer in model.model.layers:
            layer.mlp.down_proj.weight.zero_()
    after = lm_eval_scores(model, tokenizer, [TASK], include_path=include_path)
    assert after == direct_scores(model, tokenizer, rows)
    assert after != before


def test_untied_head_is_scored_as_it_is(model, tokenizer, rows, include_path) -> None:
    # An edit that unties lm_head from the embedding of a tied config: HFLM's tie_weights() call
    # would silently put the embedding back.
    head = model.lm_head.weight.detach().roll(1, dims=0)
    model.lm_head.weight = torch.nn.Parameter(head)
    expected = direct_scores(model, tokenizer, rows)
    assert lm_eval_scores(model, tokenizer, [TASK], include_path=include_path) == expected
    assert torch.equal(model.lm_head.weight, head)
    assert "tie_weights" not in vars(model)  # the method is the class's again


def test_limit_takes_the_first_examples(model, tokenizer, rows, include_path) -> None:
    scores = lm_eval_scores(model, tokenizer, [TASK], include_path=include_path, limit=5)
    assert scores == direct_scores(model, tokenizer, rows[:5])
    with pytest.raises(MsaEditError, match="limit=0"):
        lm_eval_scores(model, tokenizer, [TASK], include_path=include_path, limit=0)


def test_repeatable_and_leaves_no_trace(model, tokenizer, include_path) -> None:
    model.train()
    logger = logging.getLogger("lm_eval")
    level = logger.level
    rng = random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state()
    kwargs = dict(include_path=include_path, num_fewshot=2, seed=3)
    pad = tokenizer.pad_token
    tokenizer.pad_token = None  # HFLM sets one when there is none
    try:
        first = lm_eval_scores(model, tokenizer, [TASK], **kwargs)
        assert lm_eval_scores(model, tokenizer, [TASK], **kwargs) == first
        assert tokenizer.pad_token is None
    finally:
        tokenizer.pad_token = pad
    assert model.training and logger.level == level
    assert random.getstate() == rng[0]
    assert (np.random.get_state()[1] == rng[1]).all()
    assert torch.equal(torch.get_rng_state(), rng[2])


def test_unknown_task_fails_before_any_forward(model, tokenizer, include_path, monkeypatch):
    def no_forward(*args, **kwargs):
        raise AssertionError("no forward pass before the task names are checked")

    # Indexing lm-eval's ~14 000 built-in task YAMLs takes ~10 s; an empty index is looked up the
    # same way (checked by hand: 'arc_easy' is found, 'arc_eazy' is not).
    from lm_eval.tasks import TaskManager

    monkeypatch.setattr(
        harness, "_builtin_task_manager", lambda: TaskManager(include_defaults=False)
    )
    monkeypatch.setattr(model, "forward", no_forward)
    with pytest.raises(MsaEditError, match=r"unknown lm-eval task 'no_such_task'") as err:
        lm_eval_scores(model, tokenizer, [TASK, "no_such_task"], include_path=include_path)
    assert "\n" not in str(err.value) and "lm-eval ls tasks" in str(err.value)
    with pytest.raises(MsaEditError, match="give include_path with its YAML"):
        lm_eval_scores(model, tokenizer, [TASK])
    with pytest.raises(MsaEditError, match="is not a folder"):
        lm_eval_scores(model, tokenizer, [TASK], include_path=include_path / "missing")


def test_missing_lm_eval_is_a_clear_error(model, tokenizer, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(MsaEditError, match=r"pip install -e '\.\[lm-eval\]'"):
        lm_eval_scores(model, tokenizer, [TASK])


def test_flat_metrics_drop_stderr_text_and_nan(caplog) -> None:
    results = {
        "g": {"alias": "g", "acc,none": 0.5, "acc_stderr,none": 0.1, "f1,none": float("nan")},
        "t": {"exact_match,strict-match": np.float64(0.25), "sample_len": 4},
    }
    with caplog.at_level(logging.WARNING, logger=harness.__name__):
        flat = harness._flat_metrics(results)
    assert flat == {"g/acc": 0.5, "t/exact_match@strict-match": 0.25}
    assert all(type(v) is float for v in flat.values())
    assert "g/f1" in caplog.text
