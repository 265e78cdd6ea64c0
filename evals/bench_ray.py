"""Coalition throughput of `estimate` on this machine: locally vs on Ray with 1 and 2 workers.

Game: DESIGN.md's reference lesion game — a 4-layer, 8-expert (top-2) Mixtral, hidden 128,
vocabulary 4096 (3.4 M parameters, seeded random weights: speed does not depend on training), all
32 experts as players, `reroute` lesions, mean NLL of 6 "languages" over 24 x 64 random tokens.
Every configuration runs the same kernel estimate (same seed, budget and batch size: the same
coalitions in the same batches) and must give bit-identical values. Measured per configuration:
the start-up (building the game; on Ray: starting the workers, each building its own model) and
the coalitions/s of the estimate once the game is built (start-up excluded: a long run amortises
it).

Configurations: local with 1 and 2 torch threads; Ray with 1 worker of 1 and of 2 CPUs (a worker's
CPUs are its torch threads) and with 2 workers of 1 CPU. "2 workers / 1 worker" is the scaling
from one more worker; "Ray 1x2 / local 2 threads" is Ray's overhead at equal resources.

Run from the repository root:

    python evals/bench_ray.py            # 384 coalitions per configuration, a few minutes
                                         # -> evals/results/bench_ray.json
    python evals/bench_ray.py --quick    # 96 coalitions per configuration, < 2 minutes
                                         # -> evals/results/bench_ray_quick.json
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import torch
from transformers import AutoModelForCausalLM, MixtralConfig

from msa_edit.atomic import write_json
from msa_edit.games import LesionGame, MeanNLL, Targets
from msa_edit.shapley import estimate
from msa_edit.shapley.cache import Game
from msa_edit.shapley.ray_backend import RayBackend, RayPool
from msa_edit.units import select

RESULTS = Path(__file__).resolve().parent / "results"
BATCH = 8
"""Coalitions per game call (and per Ray task): on CPU, 8 per forward is as fast as any."""
SEED = 0
N_SEQ, SEQ_LEN, LANGS, VOCAB = 24, 64, 6, 4096


@dataclass(frozen=True)
class ReferenceGame:
    """The reference lesion game as a `GameSpec`: each Ray worker builds its own model."""

    def build(self) -> Game:
        config = MixtralConfig(
            vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=4, num_local_experts=8,
            num_experts_per_tok=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2,
        )  # fmt: skip
        torch.manual_seed(0)
        net = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
        ids = torch.randint(0, VOCAB, (N_SEQ, SEQ_LEN), generator=torch.Generator().manual_seed(0))
        per = N_SEQ // LANGS
        targets = Targets.from_dict(
            {f"lang{i}": ids[i * per : (i + 1) * per] for i in range(LANGS)}
        )
        units = select(net, "layers.*.experts.*")
        return LesionGame(net, units, targets, MeanNLL(), "reroute", max_rows=N_SEQ * BATCH)


@dataclass(frozen=True)
class Config:
    label: str
    workers: int  # 0 = local
    threads: int


CONFIGS = (
    Config("local", 0, 1),
    Config("local", 0, 2),
    Config("ray", 1, 1),
    Config("ray", 1, 2),
    Config("ray", 2, 1),
)


def measure(config: Config, budget: int) -> tuple[dict[str, Any], torch.Tensor]:
    """One configuration's start-up, wall time and coalitions/s, and the values it found."""
    spec = ReferenceGame()
    args = {"method": "kernel", "budget": budget, "seed": SEED, "batch_size": BATCH}
    start = time.perf_counter()
    if config.workers == 0:
        torch.set_num_threads(config.threads)
        game: Any = spec.build()
    else:
        backend = RayBackend(workers=config.workers, cpus_per_worker=config.threads)
        game = RayPool(spec, backend).ready()
    startup = time.perf_counter() - start
    try:
        start = time.perf_counter()
        res = estimate(game, 32, **args, progress=False)
        wall = time.perf_counter() - start
    finally:
        if isinstance(game, RayPool):
            game.close()
    row = {
        "backend": config.label,
        "workers": config.workers,
        "threads_per_worker": config.threads,
        "coalitions": res.n_evaluations,
        "startup_s": startup,
        "wall_s": wall,
        "coalitions_per_s": res.n_evaluations / wall,
    }
    return row, res.values


def main() -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="96 coalitions per configuration")
    args = parser.parse_args()
    budget = 96 if args.quick else 384
    default_threads = torch.get_num_threads()
    start = time.perf_counter()
    ray.init(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    ray_start = time.perf_counter() - start
    rows, values = [], []
    try:
        for config in CONFIGS:
            row, phi = measure(config, budget)
            rows.append(row)
            values.append(phi)
            print(f"  {config.label} {config.workers}x{config.threads}: "
                  f"{row['coalitions_per_s']:.1f} coalitions/s", flush=True)  # fmt: skip
    finally:
        torch.set_num_threads(default_threads)
        ray.shutdown()
    identical = all(torch.equal(v, values[0]) for v in values)
    rate = {(r["backend"], r["workers"], r["threads_per_worker"]): r["coalitions_per_s"]
            for r in rows}  # fmt: skip
    local2, one, two = rate[("local", 0, 2)], rate[("ray", 1, 1)], rate[("ray", 2, 1)]
    for r in rows:
        r["vs_local_2_threads"] = r["coalitions_per_s"] / local2
    print(f"\n# Coalition throughput, reference Mixtral game (32 experts, reroute, 24 x 64 "
          f"tokens), {budget} coalitions, batch {BATCH}, {os.cpu_count()} CPUs\n")  # fmt: skip
    print(
        "| backend | workers x threads | start-up s | wall s | coalitions/s | vs local 2 threads |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        shape = "-" if r["workers"] == 0 else str(r["workers"])
        print(
            f"| {r['backend']} | {shape} x {r['threads_per_worker']} | {r['startup_s']:.1f} "
            f"| {r['wall_s']:.1f} | {r['coalitions_per_s']:.1f} | {r['vs_local_2_threads']:.2f} |"
        )
    print(f"\n2 workers / 1 worker (1 thread each): {two / one:.2f}x; "
          f"Ray 1x2 / local 2 threads: {rate[('ray', 1, 2)] / local2:.2f}x; "
          f"ray.init: {ray_start:.1f} s; bit-identical in all rows: {identical}")  # fmt: skip
    payload = {
        "quick": args.quick,
        "budget": budget,
        "batch_size": BATCH,
        "cpus": os.cpu_count(),
        "ray": ray.__version__,
        "ray_init_s": ray_start,
        "rows": rows,
        "scaling_2_vs_1_worker": two / one,
        "ray_1x2_vs_local_2_threads": rate[("ray", 1, 2)] / local2,
        "bit_identical": identical,
    }
    out = RESULTS / ("bench_ray_quick.json" if args.quick else "bench_ray.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, payload)
    if not identical:
        raise SystemExit("values differ between configurations: Ray must give the local bits")
    return payload


if __name__ == "__main__":
    main()
