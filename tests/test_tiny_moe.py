"""`tiny-moe`: reproducible bits, plain HF reload, learning, cache reuse, atomic writes, CLI errors,
the second (OLMoE) family.

Small models (2 layers, 4 experts, hidden 32) trained for 30 steps on the first 250 lines of three
languages keep the file fast; the default size is exercised only by the CLI test, for 2 steps.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from tiny_models import write_texts

import msa_edit.tiny_moe as tm
from msa_edit.cli import main
from msa_edit.edit import remove_experts
from msa_edit.errors import MsaEditError
from msa_edit.lesions import lesioned
from msa_edit.tiny_moe import (
    TinyMoeConfig,
    build_key,
    build_tiny_moe,
    routing_by_language,
    training,
)
from msa_edit.units import select

LANGS = ("en", "de", "ru")
SMALL = TinyMoeConfig(
    layers=2, experts=4, top_k=2, hidden=32, intermediate=64, heads=2, vocab=400, seq_len=32,
    batch_size=6, steps=30,
)  # fmt: skip


class TrainSpy:
    """Wraps `tiny_moe.training.train`: counts trainings and keeps the last trained model."""

    def __init__(self) -> None:
        self.calls = 0
        self.model: object = None
        self._train = training.train

    def __call__(self, model, streams, config):
        self.calls += 1
        self.model = model
        return self._train(model, streams, config)


@pytest.fixture(scope="module")
def texts(tmp_path_factory) -> dict[str, Path]:
    return write_texts(tmp_path_factory.mktemp("texts"), LANGS, 250)


@pytest.fixture(scope="module")
def built(texts, tmp_path_factory) -> dict[str, object]:
    """Two builds with seed 0 and one with seed 1; the in-memory model of the first."""
    root = tmp_path_factory.mktemp("built")
    rng, deterministic = torch.get_rng_state(), torch.are_deterministic_algorithms_enabled()
    threads = torch.get_num_threads()
    spy = TrainSpy()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(training, "train", spy)
        a = build_tiny_moe(texts, root / "a", config=SMALL)
        model_a = spy.model
        b = build_tiny_moe(texts, root / "b", config=SMALL)
        c = build_tiny_moe(texts, root / "c", seed=1, config=SMALL)
    assert torch.equal(torch.get_rng_state(), rng), "global RNG must be left untouched"
    assert torch.are_deterministic_algorithms_enabled() == deterministic
    assert torch.get_num_threads() == threads
    return {"a": a, "b": b, "c": c, "model_a": model_a, "root": root}


def meta_of(path) -> dict:
    return json.loads((Path(path) / "tiny_moe.json").read_text(encoding="utf-8"))


def test_same_seed_same_bits_other_seed_differs(built) -> None:
    a, b, c = (Path(built[k]) for k in "abc")
    for name in ("model.safetensors", "tokenizer.json", "config.json", "tiny_moe.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()
    assert (a / "tokenizer.json").read_bytes() == (c / "tokenizer.json").read_bytes()


def test_reloads_with_plain_auto_classes_and_same_logits(built) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, MixtralForCausalLM

    model = AutoModelForCausalLM.from_pretrained(built["a"])
    tokenizer = AutoTokenizer.from_pretrained(built["a"])
    assert isinstance(model, MixtralForCausalLM)
    assert model.config.num_local_experts == 4 and model.config.num_hidden_layers == 2
    assert model.model.layers[0].mlp.experts.gate_up_proj.shape == (4, 2 * 64, 32)
    ids = tokenizer(["The court ruled on Tuesday.", "Ich bin hier."], padding=True,
                    return_tensors="pt")["input_ids"]  # fmt: skip
    assert ids[0, 0] == tokenizer.bos_token_id == model.config.bos_token_id
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, built["model_a"](input_ids=ids).logits)


def test_loss_decreases_and_meta_records_the_run(built, texts) -> None:
    meta = meta_of(built["a"])
    assert meta["languages"] == sorted(LANGS)
    assert meta["steps"] == 30 and meta["seed"] == 0 and meta["config"] == SMALL.to_dict()
    assert meta["final_train_loss"] < meta["first_train_loss"] - 0.5
    for lang in LANGS:
        assert meta["files"][lang]["sha256"] == tm.file_sha256(texts[lang])
        held = (Path(built["a"]) / "heldout" / f"{lang}.txt").read_text(encoding="utf-8")
        assert held.splitlines() == texts[lang].read_text(encoding="utf-8").splitlines()[-25:]
        assert 0 < meta["heldout_nll"][lang] < meta["first_train_loss"]
    assert meta_of(built["c"])["seed"] == 1


def test_routing_by_language_fractions(built) -> None:
    model, tokenizer, meta = tm.load_tiny_moe(built["a"])
    held = tm.heldout_texts(built["a"])
    routing = routing_by_language(model, tokenizer, held)
    assert routing.shape == (2, 4, 3)
    assert torch.allclose(routing.sum(dim=1), torch.full((2, 3), 2.0))
    assert torch.allclose(routing, torch.tensor(meta["routing_heldout"]))


def test_existing_build_is_reused_whatever_the_language_order(built, texts, monkeypatch) -> None:
    spy = TrainSpy()
    monkeypatch.setattr(training, "train", spy)
    stamp = (Path(built["a"]) / "model.safetensors").stat().st_mtime_ns
    reordered = dict(reversed(list(texts.items())))
    assert build_tiny_moe(reordered, built["a"], config=SMALL) == built["a"]
    assert spy.calls == 0
    assert (Path(built["a"]) / "model.safetensors").stat().st_mtime_ns == stamp


def test_cache_builds_once(texts, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("MSA_EDIT_CACHE", str(tmp_path / "cache"))
    spy = TrainSpy()
    monkeypatch.setattr(training, "train", spy)
    small = TinyMoeConfig(**{**SMALL.to_dict(), "steps": 3})
    first = build_tiny_moe(texts, config=small)
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    second = build_tiny_moe(texts, config=small)
    assert first == second and first.parent.parent == tmp_path / "cache"
    assert spy.calls == 1 and (second / "model.safetensors").stat().st_mtime_ns == stamp
    assert build_tiny_moe(texts, steps=4, config=small) != first and spy.calls == 2


def test_rebuild_replaces_a_tiny_moe_dir_and_an_interrupted_one_leaves_it(built, texts) -> None:
    out = Path(built["root"]) / "replace"
    shutil.copytree(built["a"], out)
    before = (out / "model.safetensors").read_bytes()

    def interrupted(*args):
        raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as mp, pytest.raises(KeyboardInterrupt):
        mp.setattr(training, "train", interrupted)
        build_tiny_moe(texts, out, seed=1, config=SMALL)
    assert (out / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in out.parent.iterdir() if p.name.startswith(".")) == []
    build_tiny_moe(texts, out, seed=1, config=SMALL)
    expected = (Path(built["c"]) / "model.safetensors").read_bytes()
    assert (out / "model.safetensors").read_bytes() == expected


def test_refuses_to_overwrite_foreign_dir(texts, tmp_path) -> None:
    (tmp_path / "keep.txt").write_text("precious")
    with pytest.raises(MsaEditError, match="not a tiny-moe output"):
        build_tiny_moe(texts, tmp_path, config=SMALL)
    assert (tmp_path / "keep.txt").read_text() == "precious"


def test_default_family_keeps_its_cache_key() -> None:
    """Adding families must not invalidate Mixtral builds cached before families existed."""
    assert "family" not in TinyMoeConfig().to_dict()
    key = build_key({"en": "00"}, TinyMoeConfig())
    assert key == "32111f5df5622fd77124b87fa6368583e6091f241ea54089bddaf021a9020785"
    assert build_key({"en": "00"}, TinyMoeConfig(family="olmoe")) != key
    with pytest.raises(MsaEditError, match="family='gpt2' is not one of mixtral, olmoe"):
        TinyMoeConfig(family="gpt2")


def test_olmoe_family_reloads_and_its_reroute_lesion_is_the_edit(texts, tmp_path) -> None:
    """The second family trains with the same loop, reloads with plain HF classes, and removing
    experts from it (router not renormalised) equals their reroute lesion."""
    from transformers import OlmoeForCausalLM

    small = TinyMoeConfig(**{**SMALL.to_dict(), "steps": 8, "family": "olmoe"})
    path = build_tiny_moe(texts, tmp_path / "m", config=small)
    model, tokenizer, meta = tm.load_tiny_moe(path)
    assert meta["config"]["family"] == "olmoe"
    assert meta["final_train_loss"] < meta["first_train_loss"]
    assert isinstance(model, OlmoeForCausalLM) and model.config.model_type == "olmoe"
    assert model.config.num_experts == 4 and not model.config.norm_topk_prob
    units = select(model, "layers.*.experts.*")
    assert [str(u) for u in units] == [f"layers.{i}.experts.{e}" for i in (0, 1) for e in range(4)]
    ids = tm.windows(tm.token_stream(tokenizer, tm.heldout_texts(path)["en"]), 32)
    removed = [units[1], units[6]]
    with torch.no_grad():
        intact = model(ids).logits
        with lesioned(model, removed, "reroute"):
            expected = model(ids).logits
        edited = copy.deepcopy(model)
        remove_experts(edited, removed)
        got = edited(ids).logits
    assert edited.config.num_experts == 3
    assert (got - expected).abs().max() < 1e-4 < (expected - intact).abs().max()


def test_cli_trains_default_size_then_reuses(texts, tmp_path, capsys) -> None:
    out = tmp_path / "model"
    args = ["tiny-moe", "--out", str(out), "--steps", "2", "--seed", "5"]
    args += [a for lang in LANGS for a in ("--text", f"{lang}={texts[lang]}")]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert f"2 steps, seed 5 -> {out}" in printed and "layer 3 top:" in printed
    meta = meta_of(out)
    assert meta["config"] == {**TinyMoeConfig().to_dict(), "steps": 2, "seed": 5}
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert main(args) == 0
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp


def test_cli_family_olmoe(texts, tmp_path) -> None:
    out = tmp_path / "model"
    args = ["tiny-moe", "--out", str(out), "--steps", "1", "--family", "olmoe"]
    assert main([*args, "--text", f"en={texts['en']}"]) == 0
    assert meta_of(out)["config"] == {**TinyMoeConfig(family="olmoe").to_dict(), "steps": 1}
    assert json.loads((out / "config.json").read_text())["model_type"] == "olmoe"


@pytest.mark.parametrize(
    ("make_args", "message"),
    [
        (lambda t, d: ["--text", str(t["en"])], "is not LANG=FILE"),
        (lambda t, d: ["--text", f"en={d / 'nope.txt'}"], "does not exist"),
        (lambda t, d: ["--text", f"en={d / 'empty.txt'}"], "non-blank lines"),
        (lambda t, d: ["--text", f"en={t['en']}", "--text", f"en={t['de']}"], "given twice"),
        (lambda t, d: ["--text", f"en={t['en']}", "--steps", "0"], "steps=0 must be at least 1"),
        (lambda t, d: ["--text", f"en={t['en']}", "--out", str(d)], "not a tiny-moe output"),
        (lambda t, d: [], "no text given"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(texts, tmp_path, capsys, make_args, message) -> None:
    (tmp_path / "empty.txt").write_text("\n  \n")
    args = make_args(texts, tmp_path)
    if "--out" not in args:
        args += ["--out", str(tmp_path / "model")]
    assert main(["tiny-moe", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("msa-edit: error: ") and message in err[0]
    assert not (tmp_path / "model").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_a_build_from_another_environment_is_reused_with_a_warning(
    texts, tmp_path, monkeypatch, capsys
) -> None:
    monkeypatch.setenv("MSA_EDIT_CACHE", str(tmp_path / "cache"))
    small = TinyMoeConfig(**{**SMALL.to_dict(), "steps": 2})
    path = build_tiny_moe(texts, config=small)
    meta = meta_of(path)
    assert meta["environment"] == tm.build_environment()
    capsys.readouterr()
    build_tiny_moe(texts, config=small)
    assert "WARNING" not in capsys.readouterr().err
    meta["environment"]["torch"] = "1.0.0"  # as if built elsewhere and copied here
    (path / "tiny_moe.json").write_text(json.dumps(meta), encoding="utf-8")
    assert build_tiny_moe(texts, config=small) == path
    err = capsys.readouterr().err
    assert f"WARNING: this build was made with torch 1.0.0 (here {torch.__version__})" in err
