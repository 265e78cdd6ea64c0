"""Lesion games: batched = serial, planted roles recovered, null players, objectives, data."""

from __future__ import annotations

import pytest
import torch
from tiny_models import build
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, MixtralConfig, PreTrainedTokenizerFast

from msa_edit.errors import MsaEditError
from msa_edit.games import (
    Accuracy,
    Custom,
    LesionGame,
    MeanNLL,
    NextTokenLogits,
    PositionNLL,
    Targets,
)
from msa_edit.shapley import estimate
from msa_edit.texts import text_blocks
from msa_edit.units import Unit, decoder_layers, select

GROUPS, PER_GROUP = 4, 8


def split_targets(tokens: torch.Tensor) -> Targets:
    return Targets.from_dict({"a": tokens[:2], "b": tokens[2:]})


@pytest.mark.parametrize("lesion", ["reroute", "zero"])
def test_batched_game_equals_one_coalition_per_call(moe_model, tokens, lesion) -> None:
    units = select(moe_model, "layers.*.experts.*")
    coalitions = torch.rand(5, len(units), generator=torch.Generator().manual_seed(3)) < 0.5
    game = LesionGame(moe_model, units, split_targets(tokens), MeanNLL(), lesion, max_rows=4)
    batched = game(coalitions)
    assert batched.shape == (5, 2)
    serial = torch.cat([game(c[None]) for c in coalitions])
    assert (batched - serial).abs().max() <= 1e-5
    assert batched.std(0).min() > 0  # the coalitions really differ


def planted_mixtral() -> tuple[torch.nn.Module, Targets]:
    """One MoE layer whose router sends token group g (tokens 8g..8g+7) to expert g alone."""
    torch.manual_seed(0)
    config = MixtralConfig(
        vocab_size=GROUPS * PER_GROUP,
        hidden_size=16,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        num_local_experts=GROUPS,
        num_experts_per_tok=1,
        max_position_embeddings=32,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    layer = decoder_layers(model)[0]
    with torch.no_grad():
        layer.self_attn.o_proj.weight.zero_()  # attention adds nothing: hidden = embedding
        emb = torch.randn(config.vocab_size, 16) * 0.1
        for t in range(config.vocab_size):
            emb[t, t // PER_GROUP] = 3.0
        model.model.embed_tokens.weight.copy_(emb)
        layer.mlp.gate.weight.zero_()
        layer.mlp.gate.weight[:, :GROUPS] = 5 * torch.eye(GROUPS)
        experts = layer.mlp.experts  # expert g writes to dim GROUPS + g, read by group g's logits
        experts.gate_up_proj.zero_()
        experts.down_proj.zero_()
        model.lm_head.weight.mul_(0.1)
        for g in range(GROUPS):
            experts.gate_up_proj[g, :, g] = 1.0
            experts.down_proj[g, GROUPS + g, :] = 1.0
            model.lm_head.weight[g * PER_GROUP : (g + 1) * PER_GROUP, GROUPS + g] = 1.0
    gen = torch.Generator().manual_seed(1)
    sets = {
        f"g{g}": g * PER_GROUP + torch.randint(0, PER_GROUP, (3, 10), generator=gen)
        for g in range(GROUPS)
    }
    return model, Targets.from_dict(sets)


def test_planted_experts_are_recovered_exactly() -> None:
    model, targets = planted_mixtral()
    with torch.no_grad():
        _, _, index = decoder_layers(model)[0].mlp.gate(model.model.embed_tokens(targets.input_ids))
    assert torch.equal(index[:, 0], (targets.input_ids // PER_GROUP).flatten())  # as planted
    units = select(model, "layers.0.experts.*")
    zero = estimate(LesionGame(model, units, targets, MeanNLL(), "zero"), 4, progress=False)
    off_diagonal = zero.values[~torch.eye(GROUPS, dtype=torch.bool)]
    assert off_diagonal.abs().max() <= 1e-6  # null players: expert j never sees group g
    assert zero.values.diagonal().max() < -0.5  # expert g lowers group g's NLL
    reroute = estimate(LesionGame(model, units, targets, MeanNLL(), "reroute"), 4, progress=False)
    assert torch.equal(reroute.values.abs().argmax(0), torch.arange(GROUPS))


@pytest.mark.parametrize(
    ("family", "glob", "silent"),
    [
        ("llama", "layers.0.heads.*", 1),
        ("gpt2", "layers.1.mlp.neurons.1?", 3),
    ],
)
def test_unit_with_zeroed_output_weights_is_a_null_player(tokens, family, glob, silent) -> None:
    model = build(family)
    units = select(model, glob)
    unit = units[silent]
    layer = decoder_layers(model)[unit.layer]
    with torch.no_grad():
        if unit.kind == "heads":
            width = layer.self_attn.o_proj.weight.shape[1] // 4
            layer.self_attn.o_proj.weight[:, unit.index * width : (unit.index + 1) * width] = 0
        else:
            layer.mlp.c_proj.weight[unit.index] = 0  # Conv1D [in, out]
    game = LesionGame(model, units, split_targets(tokens), MeanNLL(), "zero")
    res = estimate(game, len(units), method="exact", progress=False)
    assert res.values[silent].abs().max() <= 1e-6
    others = torch.cat([res.values[:silent], res.values[silent + 1 :]])
    assert others.abs().max() > 1e-4


def test_objectives_shapes_and_values(tokens) -> None:
    model = build("mixtral")
    units = [Unit(0, "experts", 0), Unit(1, "heads", 2)]
    targets = split_targets(tokens)
    intact = torch.ones(1, 2, dtype=torch.bool)
    with torch.no_grad():
        logits = model(tokens).logits
    position = LesionGame(model, units, targets, PositionNLL())(intact)[0]
    assert position.shape == (3, 11)
    mean = LesionGame(model, units, targets, MeanNLL())(intact)[0]
    assert torch.allclose(mean, torch.stack([position[:2].mean(), position[2:].mean()]), atol=1e-6)
    picked = LesionGame(model, units, targets, NextTokenLogits([5, 7]))(intact)[0]
    assert torch.allclose(picked, logits[:, -1, [5, 7]].mean(0).double(), atol=1e-6)
    labels = logits[:, -1, [3, 4, 9]].argmax(-1)
    labels[0] = (labels[0] + 1) % 3
    acc = LesionGame(model, units, targets, Accuracy([3, 4, 9], labels))(intact)[0]
    assert float(acc) == pytest.approx(2 / 3)
    custom = Custom(lambda lg, ids: lg[:, 0, :2])
    assert LesionGame(model, units, targets, custom)(intact)[0].shape == (2,)


def bpe_tokenizer(lines: list[str], vocab: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(
        lines, trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<unk>", "</s>"])
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>")


def test_text_blocks_from_a_local_file(tmp_path) -> None:
    lines = ["the cat sat on the mat", "a dog ran in the park", "the bird sang"] * 20
    path = tmp_path / "en.txt"
    path.write_text("\n".join(lines) + "\n")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(
        lines, trainers.BpeTrainer(vocab_size=60, special_tokens=["<unk>", "</s>"])
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>")
    blocks = text_blocks(tokenizer, path, n_seq=4, seq_len=16)
    assert blocks.shape == (4, 16)
    assert tokenizer.decode(blocks[0][:3]).split()[:1] == ["the"]
    assert int((blocks == tokenizer.eos_token_id).sum()) >= 4
    with pytest.raises(MsaEditError, match="need 16000"):
        text_blocks(tokenizer, path, n_seq=1000, seq_len=16)
    with pytest.raises(MsaEditError, match="does not exist"):
        text_blocks(tokenizer, tmp_path / "missing.txt", n_seq=1, seq_len=4)


def test_text_blocks_from_json_and_parquet(tmp_path) -> None:
    import datasets

    rows = [{"text": f"line {i} of the corpus", "id": i} for i in range(40)]
    datasets.Dataset.from_list(rows).to_json(tmp_path / "d.jsonl")
    datasets.Dataset.from_list(rows).to_parquet(tmp_path / "d.parquet")
    datasets.Dataset.from_list([{"body": "x"}]).to_json(tmp_path / "bad.jsonl")
    tokenizer = bpe_tokenizer([r["text"] for r in rows], vocab=80)
    a = text_blocks(tokenizer, tmp_path / "d.jsonl", n_seq=3, seq_len=8)
    b = text_blocks(tokenizer, tmp_path / "d.parquet", n_seq=3, seq_len=8)
    assert torch.equal(a, b) and tokenizer.decode(a[0][:2]) == "line 0"
    with pytest.raises(MsaEditError, match="has no 'text' column"):
        text_blocks(tokenizer, tmp_path / "bad.jsonl", n_seq=1, seq_len=1)


def test_text_blocks_skip_documents_and_pack_running_text(tmp_path) -> None:
    rows = [f"line {i} of the corpus" for i in range(40)]
    (tmp_path / "a.txt").write_text("\n".join(rows) + "\n")
    (tmp_path / "tail.txt").write_text("\n".join(rows[25:]) + "\n")
    tokenizer = bpe_tokenizer(rows, vocab=80)
    skipped = text_blocks(tokenizer, tmp_path / "a.txt", n_seq=3, seq_len=8, skip=25)
    assert torch.equal(skipped, text_blocks(tokenizer, tmp_path / "tail.txt", n_seq=3, seq_len=8))
    assert tokenizer.decode(skipped[0][:2]) == "line 25"
    with pytest.raises(MsaEditError, match="after its first 39 documents but 3 blocks"):
        text_blocks(tokenizer, tmp_path / "a.txt", n_seq=3, seq_len=8, skip=39)
    running = text_blocks(tokenizer, tmp_path / "a.txt", n_seq=3, seq_len=8, packing="text")
    assert not (running == tokenizer.eos_token_id).any()  # "text": no EOS between documents
    documents = text_blocks(tokenizer, tmp_path / "a.txt", n_seq=3, seq_len=8)  # no chat template
    assert int((documents == tokenizer.eos_token_id).sum()) >= 3


def test_targets_must_share_a_length() -> None:
    with pytest.raises(MsaEditError, match="different sequence lengths"):
        Targets.from_dict({"a": torch.zeros(1, 4, dtype=torch.long), "b": torch.zeros(1, 5)})
