"""Remove each language's experts: the NLL change of every language, under two lesion semantics.

On the demo's tiny multilingual MoE (4 layers x 8 experts, top-2, six languages), for each
semantics — `reroute` (the router never picks the expert: the same model as slicing it out) and
`zero` (the expert's output is dropped, routing unchanged: the seed paper's lesion) —

1. per-language Shapley modes over the 32 experts (mean next-token NLL of 8 x 64 tokens of each
   language's training text, `estimate(method="auto", budget=512)`, that same semantics);
2. for every language L, a plan: the most L-specific expert of each layer (`make_plan`, mode
   `specific`, target L, retain the other five, at most 1 per layer), kept only where its score is
   at least `--min-z` (default 2) standard errors above zero — a language with no specific expert
   in a layer loses nothing there (with `--min-z 0`, every layer loses one, as in the demo);
3. held-out NLL of all six languages (16 x 64 tokens each, never trained on) with those 4 experts
   lesioned the same way, minus the intact model's.

Under `reroute` it also runs the verified targeted search (`msa_edit.search.search_targeted`,
the recipe's `plan: {method: search, mode: specific}`): at most one expert per layer, on the same
calibration blocks (per block, half ranking moves and half checking them), every other language's
calibration increase bounded by 2 of its standard errors, the Shapley plan (min_z 0, the demo's)
as a prior. Its table sits beside the Shapley plans' (min_z 0 and 2) on the same held-out text.

Each row of a table is one target language: its own ΔNLL (bold), the others', and the ratio of
the target's ΔNLL to the largest other one (selectivity; higher is better). Writes
evals/results/bench_language.json. Run from the repository root:

    python evals/bench_language.py            # about 3 minutes on 2 cores (model cached)
    python evals/bench_language.py --quick    # 4 x 64 target tokens, budget 128: about 1 minute
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from typing import Any

import torch
from benchlib import LANGUAGES, UD_TEXT, Memo, markdown, model_dir, save_results

from msa_edit.evaluate.language import language_nll
from msa_edit.games import LesionGame, MeanNLL, RowNLL, Targets
from msa_edit.lesions import LesionKind, lesioned
from msa_edit.plan import Budget, make_plan
from msa_edit.search import Blocks, Quota, Removals, search_targeted
from msa_edit.shapley import estimate
from msa_edit.texts import text_blocks
from msa_edit.tiny_moe import HELDOUT_DIR, load_tiny_moe
from msa_edit.units import Unit, select

SEMANTICS: tuple[LesionKind, ...] = ("reroute", "zero")
EVAL_SEQ, SEQ_LEN = 16, 64


def heldout_nll(model: Any, tokenizer: Any, folder: Any) -> torch.Tensor:
    """Held-out mean NLL per language `[6]`."""
    texts = {lang: folder / HELDOUT_DIR / f"{lang}.txt" for lang in LANGUAGES}
    scores = language_nll(model, tokenizer, texts, n_seq=EVAL_SEQ, seq_len=SEQ_LEN)
    return torch.tensor([scores[f"nll/{lang}"] for lang in LANGUAGES], dtype=torch.float64)


def plans(
    values: torch.Tensor, stderr: torch.Tensor, units: list[Unit], min_z: float
) -> dict[str, list[Unit]]:
    """Per target language: the most specific expert of each layer, if significant."""
    out = {}
    for lang in LANGUAGES:
        plan = make_plan(
            values,
            stderr,
            units,
            LANGUAGES,
            target=[lang],
            retain=[x for x in LANGUAGES if x != lang],
            budget=Budget(per_layer=1, min_z=min_z or None),
        )
        out[lang] = plan.unit_list
    return out


def bench(kind: LesionKind, n_seq: int, budget: int, seed: int, min_z: float) -> dict[str, Any]:
    folder = model_dir("moe")
    model, tokenizer, _ = load_tiny_moe(folder)
    units = select(model, "layers.*.experts.*")
    targets = Targets.from_dict(
        {
            lang: text_blocks(tokenizer, UD_TEXT / f"{lang}.txt", n_seq, SEQ_LEN)
            for lang in LANGUAGES
        }
    )
    game = LesionGame(model, units, targets, MeanNLL(), kind, max_rows=8 * targets.n_rows)
    start = time.perf_counter()
    res = estimate(game, len(units), budget=budget, seed=seed, batch_size=8)
    seconds = time.perf_counter() - start
    intact = heldout_nll(model, tokenizer, folder)

    def heldout(chosen: list[Unit]) -> list[float]:
        delta = torch.zeros_like(intact)  # nothing removed
        if chosen:
            with lesioned(model, chosen, kind):
                delta = heldout_nll(model, tokenizer, folder) - intact
        return delta.tolist()

    rows = {
        lang: {"units": [str(u) for u in chosen], "delta": heldout(chosen)}
        for lang, chosen in plans(res.values, res.stderr, units, min_z).items()
    }
    out = {"analysis_seconds": seconds, "n_evaluations": res.n_evaluations, "rows": rows}
    if kind == "reroute":
        demo = plans(res.values, res.stderr, units, 0.0)
        out["shapley_min_z_0"] = {
            lang: {"units": [str(u) for u in chosen], "delta": heldout(chosen)}
            for lang, chosen in demo.items()
        }
        start = time.perf_counter()
        found, distinct = search_plans(model, units, targets, demo)
        out["search_seconds"] = time.perf_counter() - start
        out["search_coalitions"] = distinct
        out["search"] = {
            lang: found[lang] | {"delta": heldout([Unit.parse(n) for n in found[lang]["units"]])}
            for lang in LANGUAGES
        }
    return out


def search_plans(
    model: Any, units: list[Unit], targets: Targets, priors: dict[str, list[Unit]]
) -> tuple[dict[str, dict[str, Any]], int]:
    """Per language: the verified targeted search's experts (at most 1 per layer, the other
    languages' calibration increase within 2 of its standard errors); and the distinct
    coalitions all six searches evaluated together."""
    memo = Memo(LesionGame(model, units, targets, RowNLL(), "reroute", max_rows=8 * 8))
    blocks = Blocks.split(targets.names, targets.group)
    quota = Quota.from_budget(units, Budget(per_layer=1))
    out = {}
    for lang in LANGUAGES:
        removals = Removals(memo, len(units), progress=False)
        prior = {"shapley": {units.index(u) for u in priors[lang]}}
        others = [x for x in LANGUAGES if x != lang]
        result = search_targeted(removals, blocks, quota, [lang], others, prior)
        out[lang] = {"units": [str(u) for u in result.units], "chosen": result.chosen,
                     "n_evaluations": result.n_evaluations}  # fmt: skip
    return out, len(memo.values)


def selectivity(row: dict[str, Any], lang: str) -> tuple[float, float]:
    """(target ΔNLL, largest ΔNLL of another language)."""
    own = row["delta"][LANGUAGES.index(lang)]
    others = max(d for x, d in zip(LANGUAGES, row["delta"], strict=True) if x != lang)
    return own, others


def table(result: dict[str, Any]) -> str:
    lines = []
    for lang, row in result["rows"].items():
        own, others = selectivity(row, lang)
        cells = [
            f"**{d:+.3f}**" if x == lang else f"{d:+.3f}"
            for x, d in zip(LANGUAGES, row["delta"], strict=True)
        ]
        ratio = f"{own / others:.1f}x" if others > 0 else "n/a"
        lines.append([lang, len(row["units"]), *cells, ratio])
    header = ["removed for", "experts", *(f"ΔNLL {x}" for x in LANGUAGES), "own / max other"]
    return markdown(header, lines)


def compare(reroute: dict[str, Any]) -> str:
    """Search vs the Shapley plans, per language: held-out target and largest other ΔNLL, and
    whether the search's target increase reaches the significance-bar plan's (z >= 2)."""
    rows = []
    for lang in LANGUAGES:
        cells: list[object] = [lang]
        for key in ("rows", "shapley_min_z_0", "search"):
            own, other = selectivity(reroute[key][lang], lang)
            cells += [f"{own:+.3f}", f"{other:+.3f}"]
        search, shapley = (selectivity(reroute[k][lang], lang) for k in ("search", "rows"))
        cells.append("yes" if search[0] >= shapley[0] - 1e-12 else "no")
        rows.append(cells)
    header = ["target", "Shapley z>=2: own", "max other", "Shapley z>=0: own", "max other",
              "search: own", "max other", "search own >= z>=2's"]  # fmt: skip
    return markdown(header, rows)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller targets and budget")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-z", type=float, default=2.0, help="significance of a removal")
    args = parser.parse_args(argv)
    n_seq, budget = (4, 128) if args.quick else (8, 512)
    torch.set_num_threads(1)
    start = time.perf_counter()
    results = {kind: bench(kind, n_seq, budget, args.seed, args.min_z) for kind in SEMANTICS}
    total = time.perf_counter() - start
    for kind, result in results.items():
        print(f"\n## {kind}: analysis {result['analysis_seconds']:.0f} s "
              f"({result['n_evaluations']} coalitions)\n")  # fmt: skip
        print(table(result))
    reroute = results["reroute"]
    print("\n## reroute, Shapley plan without a significance bar (min_z 0, the demo's)\n")
    print(table({"rows": reroute["shapley_min_z_0"]}))
    print(f"\n## reroute, verified targeted search ({reroute['search_seconds']:.0f} s, "
          f"{reroute['search_coalitions']} distinct coalitions for all six)\n")  # fmt: skip
    print(table({"rows": reroute["search"]}))
    print("\n" + compare(reroute))
    summary = {}
    for kind, result in results.items():
        pairs = [selectivity(row, lang) for lang, row in result["rows"].items()]
        summary[kind] = {
            "mean_target_delta": sum(p[0] for p in pairs) / len(pairs),
            "mean_max_other_delta": sum(p[1] for p in pairs) / len(pairs),
        }
        print(f"\n{kind}: mean target ΔNLL {summary[kind]['mean_target_delta']:+.3f}, "
              f"mean largest other ΔNLL {summary[kind]['mean_max_other_delta']:+.3f}")  # fmt: skip
    print(f"\ntotal {total:.0f} s")
    payload = {
        "config": {"quick": args.quick, "seed": args.seed, "target_seq": n_seq, "budget": budget,
                   "min_z": args.min_z,
                   "eval_seq": EVAL_SEQ, "seq_len": SEQ_LEN, "languages": LANGUAGES},
        "semantics": results,
        "summary": summary,
        "total_seconds": total,
    }  # fmt: skip
    save_results("bench_language", args.quick, payload)
    return payload


if __name__ == "__main__":
    main()
