"""Lesion-game throughput: batched coalitions vs one coalition per forward, and the overhead of
the analysis over a pure forward pass.

Model: a 4-layer, 8-expert Mixtral-architecture model (hidden 128, ~3.4 M parameters, random
weights — speed does not depend on training), all 32 experts as players, `reroute` lesions, per-
language mean NLL over 24 sequences x 64 tokens (as in DESIGN.md's performance notes). Measures,
side by side in one run:

* pure forward time per input row (the model alone on the same rows, batched as the game batches);
* the game's time per coalition with B coalitions per call (B = 1, 8, 32) and coalitions/s;
* the ratio time-per-coalition / (rows x pure-forward-time-per-row): the analysis overhead
  (hooks, per-row factors, objective), goal <= 1.15.

Run from the repository root (about a minute on 2 cores):

    python evals/bench_lesions.py            # writes evals/results/bench_lesions.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, MixtralConfig

from msa_edit.games import LesionGame, MeanNLL, Targets
from msa_edit.units import select

RESULTS = Path(__file__).resolve().parent / "results" / "bench_lesions.json"
N_SEQ, SEQ_LEN, LANGS = 24, 64, 6


def model() -> torch.nn.Module:
    config = MixtralConfig(
        vocab_size=4096, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, num_local_experts=8,
        num_experts_per_tok=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def best_of(fn: Callable[[], Any], repeats: int) -> float:
    """Fastest wall time of `repeats` calls (after one warm-up call)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    net = model()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 4096, (N_SEQ, SEQ_LEN), generator=gen)
    per_lang = N_SEQ // LANGS
    targets = Targets.from_dict(
        {f"lang{i}": ids[i * per_lang : (i + 1) * per_lang] for i in range(LANGS)}
    )
    units = select(net, "layers.*.experts.*")
    params = sum(p.numel() for p in net.parameters())
    rows = []
    for b in (1, 8, 32):
        coalitions = torch.rand(b, len(units), generator=gen) < 0.7
        max_rows = N_SEQ * min(b, 8)
        game = LesionGame(net, units, targets, MeanNLL(), "reroute", max_rows=max_rows)
        batch = ids.repeat(max_rows // N_SEQ, 1)

        def forward(batch: torch.Tensor = batch, calls: int = b * N_SEQ // max_rows) -> None:
            with torch.inference_mode():
                for _ in range(calls):
                    net(batch)

        t_game = best_of(lambda game=game, c=coalitions: game(c), args.repeats) / b
        t_forward = best_of(forward, args.repeats) / b
        rows.append(
            {
                "coalitions_per_call": b,
                "rows_per_forward": max_rows,
                "ms_per_coalition": 1e3 * t_game,
                "coalitions_per_s": 1 / t_game,
                "pure_forward_ms_per_coalition_rows": 1e3 * t_forward,
                "overhead_ratio": t_game / t_forward,
            }
        )
    print(f"# Lesion game on a {params / 1e6:.1f} M-parameter Mixtral (32 experts, reroute), "
          f"{N_SEQ} x {SEQ_LEN} tokens, torch threads = {torch.get_num_threads()}\n")  # fmt: skip
    print("| coalitions / call | rows / forward | ms / coalition | coalitions/s "
          "| pure forward ms (same rows) | analysis / forward |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['coalitions_per_call']} | {r['rows_per_forward']} | {r['ms_per_coalition']:.1f} "
            f"| {r['coalitions_per_s']:.1f} | {r['pure_forward_ms_per_coalition_rows']:.1f} "
            f"| {r['overhead_ratio']:.3f} |"
        )
    speedup = rows[-1]["coalitions_per_s"] / rows[0]["coalitions_per_s"]
    print(f"\nbatched (32/call) vs one coalition per forward: {speedup:.2f}x coalitions/s")
    threads = torch.get_num_threads()
    payload = {"params": params, "threads": threads, "rows": rows, "speedup": speedup}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS.with_name(RESULTS.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, RESULTS)
    return payload


if __name__ == "__main__":
    main()
