"""What an analysis costs at scale: per-coalition time on growing Mixtral-architecture models,
fitted and projected to Mixtral-8x7B — a projection, with its assumptions printed beside it.

Measured here (CPU, fp32, random weights): the time of one coalition of the expert lesion game
(`reroute` lesions, a random half of the experts lesioned, mean NLL over 4 x 128 target tokens,
one coalition per forward) on 4-layer, 8-expert top-2 models of hidden size 256 to 1024. The fit
is time = c0 + FLOPs / R, with FLOPs = 2 x active parameters per token x target tokens (active:
attention projections, router, two experts, LM head); R is this machine's effective rate.

Projected (assumptions, not measurements): Mixtral-8x7B has 12.9 B active parameters per token;
a coalition over 32 x 512 target tokens is then 4.2e14 FLOPs. On one GPU at an effective
`--gpu-tflops` (default 100: about a third of an A100's bf16 peak, typical of large-batch
inference; 4-bit weights add dequantisation, `--four-bit-factor`, default 1.5x), the number of
coalitions for the seed paper's accuracy (1,000 permutations over 256 experts) comes from
`evals/bench_estimators.py`: `auto` matches msapy's accuracy with 0.20 of msapy's game calls on
the expert game, and the ratio does not depend on the budget (both errors fall as 1/sqrt(n)), so
1,000 permutations x 256 experts = 256,000 calls become about 51,200 coalitions. The compression
search (`plan.method: search`) needs at most 454 (`evals/bench_pruning.py`).

    python evals/bench_scale.py            # about 35 s on 2 cores
    python evals/bench_scale.py --quick    # two sizes, about 15 s
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch
from benchlib import markdown, save_results
from transformers import AutoModelForCausalLM, MixtralConfig

from msa_edit.games import LesionGame, MeanNLL, Targets
from msa_edit.units import select

HIDDEN = (256, 512, 768, 1024)
TOKENS = (4, 128)
MIXTRAL_8X7B = {"active": 12.9e9, "experts": 256, "tokens": 32 * 512}
PAPER = {"permutations": 1000, "a100_days": 9.0}
AUTO_PER_CALL = 0.20
"""`auto`'s coalitions per msapy game call at equal accuracy on the expert game
(`bench_estimators.json`: 0.20 for the MoE experts, 0.23 for the dense heads)."""
SEARCH_COALITIONS = 454


def config(hidden: int) -> MixtralConfig:
    return MixtralConfig(
        hidden_size=hidden, intermediate_size=int(3.5 * hidden), num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=8, num_local_experts=8,
        num_experts_per_tok=2, vocab_size=32000, tie_word_embeddings=False,
    )  # fmt: skip


def active_parameters(c: MixtralConfig) -> int:
    """Parameters one token passes through: attention, router, top-k experts, LM head."""
    h, i = c.hidden_size, c.intermediate_size
    per_layer = 4 * h * h + c.num_local_experts * h + c.num_experts_per_tok * 3 * h * i
    return c.num_hidden_layers * per_layer + c.vocab_size * h


@torch.inference_mode()
def measure(hidden: int, repeats: int) -> dict[str, Any]:
    torch.manual_seed(0)
    c = config(hidden)
    model = AutoModelForCausalLM.from_config(c, dtype=torch.float32).eval()
    ids = torch.randint(0, c.vocab_size, TOKENS, generator=torch.Generator().manual_seed(0))
    units = select(model, "layers.*.experts.*")
    game = LesionGame(model, units, Targets.from_dict({"t": ids}), MeanNLL(), "reroute")
    gen = torch.Generator().manual_seed(1)
    coalitions = torch.rand(repeats + 1, len(units), generator=gen) < 0.5
    game(coalitions[:1])  # warm-up
    tick = time.perf_counter()
    for row in coalitions[1:]:
        game(row[None])
    seconds = (time.perf_counter() - tick) / repeats
    flops = 2 * active_parameters(c) * TOKENS[0] * TOKENS[1]
    return {"hidden": hidden, "active": active_parameters(c), "flops": flops, "seconds": seconds}


def main() -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two sizes, fewer repeats")
    parser.add_argument("--gpu-tflops", type=float, default=100.0, help="effective GPU rate")
    parser.add_argument("--four-bit-factor", type=float, default=1.5, help="4-bit slowdown")
    args = parser.parse_args()
    torch.set_num_threads(2)
    sizes = HIDDEN[::3] if args.quick else HIDDEN
    rows = [measure(h, 2 if args.quick else 4) for h in sizes]
    x = torch.tensor([[1.0, r["flops"]] for r in rows], dtype=torch.float64)
    y = torch.tensor([r["seconds"] for r in rows], dtype=torch.float64)
    c0, per_flop = torch.linalg.lstsq(x, y[:, None]).solution.flatten().tolist()
    rate = 1 / per_flop
    for r in rows:
        r["fit"] = c0 + r["flops"] * per_flop
    print(f"# Per-coalition time, CPU ({torch.get_num_threads()} threads, fp32), target "
          f"{TOKENS[0]} x {TOKENS[1]} tokens\n")  # fmt: skip
    print(markdown(
        ["hidden", "active params", "GFLOPs", "measured s", "fit s"],
        [[r["hidden"], f"{r['active'] / 1e6:.0f} M", f"{r['flops'] / 1e9:.1f}",
          f"{r['seconds']:.3f}", f"{r['fit']:.3f}"] for r in rows],
    ))  # fmt: skip
    print(f"\nfit: {c0 * 1e3:.1f} ms + FLOPs / {rate / 1e9:.1f} GFLOP/s")
    flops = 2 * MIXTRAL_8X7B["active"] * MIXTRAL_8X7B["tokens"]
    calls = PAPER["permutations"] * MIXTRAL_8X7B["experts"]
    coalitions = AUTO_PER_CALL * calls
    gpu = flops / (args.gpu_tflops * 1e12) * args.four_bit_factor
    cpu = c0 + flops * per_flop
    projection = [
        ["one coalition (32 x 512 tokens)", f"{cpu / 3600:.1f} h", f"{gpu:.1f} s"],
        [f"Shapley, paper's accuracy ({coalitions:,.0f} coalitions)",
         f"{cpu * coalitions / 86400 / 365:.0f} years", f"{gpu * coalitions / 86400:.1f} days"],
        [f"compression search (<= {SEARCH_COALITIONS} coalitions)",
         f"{cpu * SEARCH_COALITIONS / 86400:.0f} days", f"{gpu * SEARCH_COALITIONS / 60:.0f} min"],
    ]  # fmt: skip
    print(
        f"\n# Projection for Mixtral-8x7B ({flops:.2e} FLOPs a coalition); GPU: "
        f"{args.gpu_tflops:.0f} TFLOP/s effective x {args.four_bit_factor} for 4-bit "
        f"(assumed); paper: {PAPER['a100_days']:.0f} A100-days, {calls:,} calls\n"
    )
    print(markdown(["work", "this CPU (fit)", "one GPU (assumed rate)"], projection))
    payload = {"rows": rows, "fit": {"c0_s": c0, "gflops": rate / 1e9},
               "assumptions": {"gpu_tflops": args.gpu_tflops,
                               "four_bit_factor": args.four_bit_factor,
                               "auto_coalitions_per_msapy_call": AUTO_PER_CALL,
                               "mixtral_8x7b": MIXTRAL_8X7B, "paper": PAPER},
               "projection": projection}  # fmt: skip
    save_results("bench_scale", args.quick, payload)
    return payload


if __name__ == "__main__":
    main()
