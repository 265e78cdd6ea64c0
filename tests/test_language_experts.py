"""On a tiny MoE trained on the shared UD text, Shapley modes find each language's own expert.

Trains (once; cached) a 2-layer, 4-expert Mixtral on English, Russian and Chinese for 600 steps
(~25 s on 2 cores), computes exact per-language Shapley modes over its 8 experts under `reroute`
lesions on held-out text, and checks that lesioning each language's most specific expert costs
that language more NLL than any other language. The full-size version over 32 experts and six
languages is `evals/language_experts.py`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from msa_edit.evaluate.plots import expert_heatmaps
from msa_edit.games import LesionGame, MeanNLL, Targets, text_blocks
from msa_edit.lesions import lesioned
from msa_edit.plan import specificity
from msa_edit.shapley import estimate
from msa_edit.tiny_moe import HELDOUT_DIR, TinyMoeConfig, build_tiny_moe, load_tiny_moe
from msa_edit.units import select

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "ud-text"
LANGS = ("en", "ru", "zh")
CONFIG = TinyMoeConfig(
    layers=2, experts=4, hidden=64, intermediate=96, heads=2, vocab=1000, seq_len=32, batch_size=16
)

pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason="needs ../shared/data/ud-text")


def nll(model, targets: Targets) -> torch.Tensor:
    with torch.inference_mode():
        logits = model(targets.input_ids).logits
    return MeanNLL().reduce(MeanNLL().row_stats(logits, targets.input_ids, None), targets)


def test_each_language_has_an_expert_that_costs_it_the_most(tmp_path) -> None:
    path = build_tiny_moe({lang: DATA / f"{lang}.txt" for lang in LANGS}, steps=600, config=CONFIG)
    model, tokenizer, _ = load_tiny_moe(path)
    heldout = {lang: path / HELDOUT_DIR / f"{lang}.txt" for lang in LANGS}
    targets = Targets.from_dict({k: text_blocks(tokenizer, f, 4, 32) for k, f in heldout.items()})
    units = select(model, "layers.*.experts.*")
    game = LesionGame(model, units, targets, MeanNLL(), "reroute")
    res = estimate(game, len(units), method="exact", progress=False)
    assert res.values.shape == (8, 3)
    spec = specificity(res.values)
    base = nll(model, targets)
    for t in range(len(LANGS)):
        unit = units[int(spec[:, t].argmax())]
        assert spec[:, t].max() > 0.05  # an expert serving this language clearly more than others
        with lesioned(model, [unit], "reroute"):
            delta = nll(model, targets) - base
        assert int(delta.argmax()) == t, (LANGS[t], unit, delta.tolist())
    png = expert_heatmaps(-res.values, units, LANGS, tmp_path / "modes.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
