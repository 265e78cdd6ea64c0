"""Language experts of the tiny multilingual MoE: per-language Shapley modes over its 32 experts.

The second of the MSA paper's three findings at small scale (the others: `evals/mlp_hubs.py`,
`evals/gan_hierarchy.py`): inside a mixture-of-experts language model some experts serve one
language. Three steps: (1) Shapley modes — one value per expert and language; (2) each
language's most specific expert, lesioned alone; (3) the plan "remove the experts most specific
to zh", applied to the weights, and every language's held-out NLL before and after.

Builds (or reuses from the cache) the default tiny Mixtral trained on the six UD languages of
../shared/data/ud-text, takes held-out text per language (never trained on), and estimates each
expert's Shapley value for every language's mean next-token NLL under `reroute` lesions (the
expert removed, tokens sent to the remaining ones). A negative value means the expert lowers that
language's NLL. Each language's expert is its most specific one (`msa_edit.plan.specificity`: how
much more it helps that language than any other); lesioning it alone should cost that language
more NLL than any other language. The table says for which languages that holds.

Writes evals/results/language_experts.{json,png} (the heat-map: layers x experts, one panel per
language). Run from the repository root:

    python evals/language_experts.py            # ~80 s on 2 cores once the model is cached
    python evals/language_experts.py --quick    # 400 coalitions: faster, noisier
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path
from typing import Any

import torch

from msa_edit.atomic import write_json
from msa_edit.edit import remove_experts
from msa_edit.evaluate.plots import expert_heatmaps
from msa_edit.games import LesionGame, MeanNLL, Targets
from msa_edit.lesions import lesioned
from msa_edit.plan import Budget, make_plan, specificity
from msa_edit.shapley import ShapleyResult, estimate
from msa_edit.texts import text_blocks
from msa_edit.tiny_moe import HELDOUT_DIR, build_tiny_moe, load_tiny_moe
from msa_edit.units import Unit, select

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "ud-text"
RESULTS = Path(__file__).resolve().parent / "results"
LANGUAGES = ("en", "de", "fr", "es", "ru", "zh")


def language_targets(model_dir: Path, tokenizer: Any, n_seq: int, seq_len: int) -> Targets:
    """`n_seq` held-out blocks of `seq_len` tokens per language."""
    return Targets.from_dict(
        {
            lang: text_blocks(tokenizer, model_dir / HELDOUT_DIR / f"{lang}.txt", n_seq, seq_len)
            for lang in LANGUAGES
        }
    )


def lesion_table(model: Any, top: dict[str, Unit], targets: Targets) -> torch.Tensor:
    """ΔNLL `[lesioned language's expert, measured language]` of lesioning each top expert alone."""
    with torch.inference_mode():
        intact = _nll(model, targets)
    rows = []
    for unit in top.values():
        with lesioned(model, [unit], "reroute"), torch.inference_mode():
            rows.append(_nll(model, targets) - intact)
    return torch.stack(rows)


def _nll(model: Any, targets: Targets) -> torch.Tensor:
    logits = model(targets.input_ids).logits
    stats = MeanNLL().row_stats(logits, targets.input_ids, torch.arange(targets.n_rows))
    return MeanNLL().reduce(stats, targets)


def analyse(
    model_dir: Path, budget: int, n_seq: int, seq_len: int, seed: int
) -> tuple[ShapleyResult, list[Unit], Targets, Any]:
    model, tokenizer, _ = load_tiny_moe(model_dir)
    targets = language_targets(model_dir, tokenizer, n_seq, seq_len)
    units = select(model, "layers.*.experts.*")
    game = LesionGame(model, units, targets, MeanNLL(), "reroute", max_rows=8 * targets.n_rows)
    return estimate(game, len(units), budget=budget, seed=seed, batch_size=8), units, targets, model


def remove_language(
    model: Any, model_dir: Path, res: ShapleyResult, units: list[Unit], lang: str, seq_len: int
) -> dict[str, Any]:
    """Plan and apply "remove the experts most specific to `lang`" (one per layer, keeping the
    router's top-k), then print held-out NLL per language before and after, on 8 blocks per
    language (4 of them never seen by the analysis)."""
    _, tokenizer, _ = load_tiny_moe(model_dir)
    retain = [x for x in LANGUAGES if x != lang]
    budget = Budget(per_layer=1, min_keep_per_layer=model.config.num_experts_per_tok)
    plan = make_plan(res.values, res.stderr, units, list(LANGUAGES), target=[lang], retain=retain,
                     budget=budget, base_model=str(model_dir))  # fmt: skip
    edited = copy.deepcopy(model)
    remove_experts(edited, plan.unit_list)
    targets = language_targets(model_dir, tokenizer, 8, seq_len)
    with torch.inference_mode():
        before, after = _nll(model, targets), _nll(edited, targets)
    delta = after - before
    print(f"\nplan: remove {', '.join(plan.units)} (most specific to {lang}, 1 per layer)\n")
    print("| language | NLL before | NLL after | increase |")
    print("|---|---:|---:|---:|")
    rows = zip(LANGUAGES, before.tolist(), after.tolist(), delta.tolist(), strict=True)
    for name, b, a, d in rows:
        print(f"| {name} | {b:.3f} | {a:.3f} | {d:+.3f} |")
    t = LANGUAGES.index(lang)
    ratio = float(delta[t] / torch.cat([delta[:t], delta[t + 1 :]]).max())
    print(f"\n{lang} increase / largest other increase: {ratio:.2f}")
    return {"plan": plan.to_json(), "before": before.tolist(), "after": after.tolist(),
            "ratio": ratio}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=int, default=None, help="coalitions (1000; --quick 400)")
    parser.add_argument("--n-seq", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="budget 400 unless --budget is given")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.budget is None:
        args.budget = 400 if args.quick else 1000
    started = time.perf_counter()
    model_dir = build_tiny_moe({lang: DATA / f"{lang}.txt" for lang in LANGUAGES})
    res, units, targets, model = analyse(
        model_dir, args.budget, args.n_seq, args.seq_len, args.seed
    )
    spec = specificity(res.values)
    top = {lang: units[int(spec[:, t].argmax())] for t, lang in enumerate(LANGUAGES)}
    delta = lesion_table(model, top, targets)
    args.out.mkdir(parents=True, exist_ok=True)
    png = expert_heatmaps(
        -res.values, units, LANGUAGES, args.out / "language_experts.png",
        title="How much each expert lowers each language's NLL (-Shapley value, nats)",
        label="-φ (nats)",
    )  # fmt: skip
    print(f"model {model_dir}\n{res.method}, {res.n_evaluations} coalitions, "
          f"max stderr {float(res.stderr.max()):.4f}; heat-map {png}\n")  # fmt: skip
    header = " | ".join(f"ΔNLL {x}" for x in LANGUAGES)
    print(f"| expert of | expert | φ (own) | specificity | {header} | own language hit most |")
    print("|---|---|---:|---:|" + "---:|" * len(LANGUAGES) + "---|")
    own = delta.argmax(1) == torch.arange(len(LANGUAGES))
    for i, (lang, unit) in enumerate(top.items()):
        cells = " | ".join(
            f"**{d:.3f}**" if j == i else f"{d:.3f}" for j, d in enumerate(delta[i].tolist())
        )
        row = units.index(unit)
        print(f"| {lang} | {unit} | {float(res.values[row, i]):.3f} | {float(spec[row, i]):.3f} "
              f"| {cells} | {'yes' if own[i] else 'no'} |")  # fmt: skip
    print(f"\n{int(own.sum())} of {len(LANGUAGES)} languages: their expert costs them the most NLL")
    own_is_max = bool(own.all())
    removal = remove_language(model, model_dir, res, units, "zh", args.seq_len)
    payload = {
        "model": str(model_dir),
        "shapley": {**res.to_json(), "units": [str(u) for u in units], "targets": list(LANGUAGES)},
        "top_expert": {lang: str(u) for lang, u in top.items()},
        "lesion_delta_nll": delta.tolist(),
        "specificity": spec.tolist(),
        "own_is_max": own_is_max,
        "remove_zh": removal,
    }
    write_json(args.out / "language_experts.json", payload)
    print(f"\n{time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
