"""On a tiny MoE trained on the bundled UD text, Shapley modes find each language's own expert.

Trains (once; cached) a 2-layer, 4-expert Mixtral on English, Russian and Chinese for 600 steps
(~25 s on 2 cores), computes exact per-language Shapley modes over its 8 experts under `reroute`
lesions on held-out text, and checks that lesioning each language's most specific expert costs
that language more NLL than any other language. The full-size version over 32 experts and six
languages is `evals/language_experts.py`.
"""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import UD_TEXT

from msa_edit.edit import remove_experts
from msa_edit.evaluate.plots import expert_heatmaps
from msa_edit.games import LesionGame, MeanNLL, Targets
from msa_edit.lesions import lesioned
from msa_edit.plan import Budget, make_plan, specificity
from msa_edit.shapley import estimate
from msa_edit.texts import text_blocks
from msa_edit.tiny_moe import HELDOUT_DIR, TinyMoeConfig, build_tiny_moe, load_tiny_moe
from msa_edit.units import select

DATA = UD_TEXT  # the bundled copy of ../shared/data/ud-text: the test runs in every checkout
LANGS = ("en", "ru", "zh")
CONFIG = TinyMoeConfig(
    layers=2, experts=4, hidden=64, intermediate=96, heads=2, vocab=1000, seq_len=32, batch_size=16
)


def nll(model, targets: Targets) -> torch.Tensor:
    with torch.inference_mode():
        logits = model(targets.input_ids).logits
    return MeanNLL().reduce(MeanNLL().row_stats(logits, targets.input_ids, None), targets)


@pytest.fixture(scope="module")
def analysed():
    """The trained model, held-out targets (analysis half, evaluation half), units, exact modes."""
    path = build_tiny_moe({lang: DATA / f"{lang}.txt" for lang in LANGS}, steps=600, config=CONFIG)
    model, tokenizer, _ = load_tiny_moe(path)
    blocks = {k: text_blocks(tokenizer, path / HELDOUT_DIR / f"{k}.txt", 8, 32) for k in LANGS}
    targets = Targets.from_dict({k: b[:4] for k, b in blocks.items()})
    unseen = Targets.from_dict({k: b[4:] for k, b in blocks.items()})
    units = select(model, "layers.*.experts.*")
    game = LesionGame(model, units, targets, MeanNLL(), "reroute")
    return model, targets, unseen, units, estimate(game, len(units), method="exact", progress=False)


def test_each_language_has_an_expert_that_costs_it_the_most(analysed, tmp_path) -> None:
    model, targets, _, units, res = analysed
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


def test_removing_the_experts_most_specific_to_ru_hurts_ru_most(analysed) -> None:
    model, _, unseen, units, res = analysed
    others = [lang for lang in LANGS if lang != "ru"]
    plan = make_plan(res.values, res.stderr, units, list(LANGS), target=["ru"], retain=others,
                     budget=Budget(per_layer=1, min_keep_per_layer=2))  # fmt: skip
    assert len(plan.units) == 2
    edited = copy.deepcopy(model)
    remove_experts(edited, plan.unit_list)
    assert edited.config.num_local_experts == 3
    delta = nll(edited, unseen) - nll(model, unseen)  # held-out blocks the analysis never saw
    ru = LANGS.index("ru")
    rest = torch.cat([delta[:ru], delta[ru + 1 :]])
    assert delta[ru] >= 2 * rest.max(), delta.tolist()
