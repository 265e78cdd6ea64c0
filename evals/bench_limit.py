"""How close a full Shapley analysis runs to the forward-pass limit, in time and in memory.

Time (in this process, one torch thread): the demo's tiny MoE (4 layers x 8 experts, 32 expert
players, `reroute` lesions), per-language mean NLL over 6 x 4 held-out blocks of 64 tokens. A
whole `estimate(method="auto", budget=B)` run — sampler, coalition cache, lesion hooks, objective
and all — divided by the coalitions it evaluated, against the mean time of 48 pure forward passes
of the same rows batched the same way (C coalitions per call = C x 24 rows per forward).
Goal: <= 1.15x.

Memory (each variant in a fresh process; the model of `bench_quantize.py`: a random-weight
Mixtral of 95 M parameters, 380 MB in fp32, 93 % of it in experts): peak anonymous resident memory
while loading the model and running one pure forward, vs loading it and running a whole analysis
(32 expert players, budget 66, 2 coalitions x 4 rows x 64 tokens per forward). Goal: analysis /
forward <= 1.1x. And the stored footprint of `load_quantized(bits=4)` vs fp16 (the 4-bit analysis
peak is measured too).

Writes evals/results/bench_limit.json. Run from the repository root:

    python evals/bench_limit.py            # about 4 minutes on 2 cores
    python evals/bench_limit.py --quick    # smaller budget, under 2 minutes
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from bench_quantize import CONFIG, PeakSampler, _anon_rss_bytes, _load, build_and_save
from benchlib import heldout_targets, markdown, model_dir, save_results

from msa_edit.games import LesionGame, MeanNLL, Targets
from msa_edit.shapley import estimate
from msa_edit.tiny_moe import load_tiny_moe
from msa_edit.units import select

N_SEQ, SEQ_LEN = 4, 64
FORWARDS = 48
TIME_GOAL, MEMORY_GOAL = 1.15, 1.1
MEMORY_ROWS, MEMORY_COALITIONS, MEMORY_BUDGET = 4, 2, 66
MEMORY_VARIANTS = ("forward-fp32", "analysis-fp32", "forward-4bit", "analysis-4bit", "load-fp16")


def mean_time(fn: Callable[[], Any], repeats: int) -> float:
    """Mean wall time of `repeats` calls, after one warm-up call (a mean, like the analysis's)."""
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def time_row(
    model: Any, targets: Targets, per_call: int, budget: int, forwards: int
) -> dict[str, Any]:
    """One analysis vs pure forward at `per_call` coalitions per forward."""
    units = select(model, "layers.*.experts.*")
    game = LesionGame(
        model, units, targets, MeanNLL(), "reroute", max_rows=per_call * targets.n_rows
    )
    batch = targets.input_ids.repeat(per_call, 1)

    def forward() -> None:
        with torch.inference_mode():
            model(batch)

    game(torch.ones(per_call, len(units), dtype=torch.bool))  # warm-up
    start = time.perf_counter()
    res = estimate(game, len(units), "auto", budget, 0, per_call, progress=False)
    analysis = (time.perf_counter() - start) / res.n_evaluations
    pure = mean_time(forward, forwards) / per_call
    return {
        "coalitions_per_forward": per_call,
        "rows_per_forward": per_call * targets.n_rows,
        "coalitions": res.n_evaluations,
        "analysis_ms_per_coalition": 1e3 * analysis,
        "forward_ms_per_coalition_rows": 1e3 * pure,
        "ratio": analysis / pure,
    }


def memory_worker(variant: str, folder: Path, out: Path) -> None:
    """Measure one memory variant in this fresh process; write a JSON row to `out`."""
    import bitsandbytes  # noqa: F401 - imports are not part of the measurement
    import transformers  # noqa: F401

    from msa_edit.footprint import footprint

    torch.set_num_threads(1)
    baseline = _anon_rss_bytes()
    sampler = PeakSampler()
    sampler.start()
    start = time.perf_counter()
    kind, precision = variant.split("-")
    model = _load({"fp32": "fp32", "4bit": "msa-4bit", "fp16": "fp16"}[precision], folder)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, CONFIG["vocab_size"], (MEMORY_ROWS, SEQ_LEN), generator=gen)
    n_eval = 0
    if kind == "forward":
        with torch.inference_mode():
            model(ids.repeat(MEMORY_COALITIONS, 1))
    elif kind == "analysis":
        units = select(model, "layers.*.experts.*")
        targets = Targets.from_dict({"random": ids})
        rows = MEMORY_COALITIONS * MEMORY_ROWS
        game = LesionGame(model, units, targets, MeanNLL(), "reroute", max_rows=rows)
        res = estimate(
            game, len(units), "auto", MEMORY_BUDGET, 0, MEMORY_COALITIONS, progress=False
        )
        n_eval = res.n_evaluations
    seconds = time.perf_counter() - start
    row = {
        "variant": variant,
        "peak_anon_rss": sampler.stop() - baseline,
        "footprint": footprint(model),
        "coalitions": n_eval,
        "seconds": seconds,
    }
    out.write_text(json.dumps(row))


def memory_rows(variants: Sequence[str]) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory(prefix="bench_limit_") as tmp:
        folder = Path(tmp)
        build_and_save(folder)
        rows = []
        for variant in variants:
            out = folder / f"{variant}.json"
            cmd = [sys.executable, __file__, "--worker", variant, str(folder), str(out)]
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            rows.append(json.loads(out.read_text()))
    return rows


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller budget, fewer variants")
    parser.add_argument("--worker", nargs=3, metavar=("VARIANT", "MODEL_DIR", "OUT"))
    args = parser.parse_args(argv)
    if args.worker:
        memory_worker(args.worker[0], Path(args.worker[1]), Path(args.worker[2]))
        return {}
    torch.set_num_threads(1)
    start = time.perf_counter()
    folder = model_dir("moe")
    model, tokenizer, _ = load_tiny_moe(folder)
    targets = heldout_targets(folder, tokenizer, N_SEQ, SEQ_LEN)
    budget = 96 if args.quick else 512
    forwards = 16 if args.quick else FORWARDS
    per_call = (1, 8) if args.quick else (1, 4, 8)
    timing = [time_row(model, targets, c, budget, forwards) for c in per_call]
    variants = MEMORY_VARIANTS[:2] if args.quick else MEMORY_VARIANTS
    memory = {r["variant"]: r for r in memory_rows(variants)}
    total = time.perf_counter() - start

    rows = f"{targets.n_rows} rows x {SEQ_LEN} tokens"
    print(f"## Time: analysis vs pure forward ({rows} a coalition)\n")
    print(markdown(
        ["coalitions / forward", "coalitions", "analysis ms / coalition",
         "pure forward ms (same rows)", "analysis / forward"],
        [[r["coalitions_per_forward"], r["coalitions"], f"{r['analysis_ms_per_coalition']:.1f}",
          f"{r['forward_ms_per_coalition_rows']:.1f}", f"**{r['ratio']:.3f}**"] for r in timing],
    ))  # fmt: skip
    mb = 1e6
    print("\n## Memory: peak anonymous RSS over the imports (fresh process each)\n")
    print(markdown(
        ["variant", "peak MB", "model footprint MB", "coalitions", "seconds"],
        [[r["variant"], f"{r['peak_anon_rss'] / mb:.0f}", f"{r['footprint'] / mb:.1f}",
          r["coalitions"], f"{r['seconds']:.1f}"] for r in memory.values()],
    ))  # fmt: skip
    ratios = {
        "time_best": min(r["ratio"] for r in timing),
        "time_worst": max(r["ratio"] for r in timing),
        "memory_fp32": memory["analysis-fp32"]["peak_anon_rss"]
        / memory["forward-fp32"]["peak_anon_rss"],
    }
    if "analysis-4bit" in memory:
        ratios["memory_4bit"] = (
            memory["analysis-4bit"]["peak_anon_rss"] / memory["forward-4bit"]["peak_anon_rss"]
        )
        ratios["footprint_4bit_to_fp16"] = (
            memory["forward-4bit"]["footprint"] / memory["load-fp16"]["footprint"]
        )
    print(f"\nanalysis / forward time: {ratios['time_best']:.3f} to {ratios['time_worst']:.3f} "
          f"(goal <= {TIME_GOAL}); analysis / forward peak memory fp32: "
          f"{ratios['memory_fp32']:.3f} (goal <= {MEMORY_GOAL})")  # fmt: skip
    if "memory_4bit" in ratios:
        print(f"4-bit: analysis / forward peak memory {ratios['memory_4bit']:.3f}; "
              f"footprint 4-bit / fp16 {ratios['footprint_4bit_to_fp16']:.3f}")  # fmt: skip
    print(f"total {total:.0f} s")
    payload = {
        "config": {"quick": args.quick, "budget": budget, "rows": targets.n_rows,
                   "seq_len": SEQ_LEN, "memory_model": CONFIG, "memory_rows": MEMORY_ROWS,
                   "memory_coalitions_per_forward": MEMORY_COALITIONS,
                   "memory_budget": MEMORY_BUDGET, "torch_threads": 1},
        "timing": timing,
        "memory": memory,
        "ratios": ratios,
        "total_seconds": total,
    }  # fmt: skip
    save_results("bench_limit", args.quick, payload)
    return payload


if __name__ == "__main__":
    main()
