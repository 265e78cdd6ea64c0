"""Expert pruning: Shapley-chosen removals vs routing frequency, REAP, Lu et al.'s enumeration.

Two tiny MoE families trained by `msa_edit.tiny_moe` on the six bundled UD languages with the same
tokenizer recipe, text and training loop: the default 4-layer, 8-expert top-2 Mixtral of the demo,
and an OLMoE of the same size (query/key norms, top-k weights not renormalised, no shared expert).
From every layer, k = 2 and k = 4 of the 8 experts are removed, chosen by

(a) shapley: per-language Shapley modes of all 32 experts (kernel estimator, `reroute` lesions,
    mean NLL of each language on the calibration text), then `make_plan(mode="least_useful")` over
    all six languages with `Budget(per_layer=k)`: the k experts per layer whose presence lowers the
    unweighted mean of the languages' NLL least (the mean of the modes is, by linearity, the
    Shapley value of that mean — the quantity the report averages; one game gives all modes);
(b) frequency: the k experts per layer the router picks (top-k) least often on the calibration text;
(c) reap: the k experts per layer with the lowest REAP saliency (Lasby et al. 2025): mean, over the
    tokens routed to the expert, of its router weight (as applied) x the L2 norm of its output;
(d) enumeration (Lu et al. 2024, "Not All Experts are Equal"): per layer, on the inputs its MoE
    block receives in the intact model, every set of k experts to drop (C(8,2) = 28, C(8,4) = 70) is
    tried with tokens rerouted over the kept experts (top-k renormalised where the family does);
    the set with the least squared reconstruction error of the block's output is dropped;
(e) random: k experts per layer uniformly at random (5 seeds; mean and range reported);
(f) leave-one-out, a diagnostic beside the brief's five: the k experts per layer whose lesion alone
    raises the languages' mean calibration NLL least (the same game at n + 1 coalitions: each
    expert's marginal contribution at the full coalition, where Shapley averages over all sizes).

All methods see the same calibration text: blocks of the training split, evenly spaced, the same
number per language. Removals are applied as `reroute` lesions (equal to slicing the experts out
with `msa_edit.edit.remove_experts`, tested in tests/edit). Reported: held-out NLL per language
(text neither trained on nor calibrated on), its mean, the change vs the intact model, each method's
ΔNLL divided by Shapley's (> 1: Shapley's removal hurts less), and cost in full-model forward passes
over the calibration text. Enumeration runs MoE blocks alone; a block forward is converted to full
forwards by its share of the active parameters per token (multiply-adds), printed with the table.
Shapley's analysis serves both k (its cost is counted in each table). Deterministic given seeds.

Run from the repository root (both models are trained once and cached; the OLMoE takes about five
minutes on two cores the first time, the Mixtral is the demo's):

    python evals/bench_pruning.py           # 1000 coalitions, 5 random seeds -> bench_pruning.json
    python evals/bench_pruning.py --quick   # 160 coalitions, 3 random seeds, 4 calibration and
                                            # 16 held-out blocks per language; < 2 min
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import msa_edit
from msa_edit.evaluate.language import block_nll
from msa_edit.games import LesionGame, MeanNLL, Targets
from msa_edit.lesions import Lesion, lesioned
from msa_edit.plan import Budget, make_plan
from msa_edit.shapley import ShapleyResult, estimate
from msa_edit.tiny_moe import (
    TinyMoeConfig,
    build_tiny_moe,
    heldout_texts,
    load_tiny_moe,
    read_lines,
    split_heldout,
    token_stream,
    windows,
)
from msa_edit.units import Unit, decoder_layers, moe_block, moe_parts, n_experts, select

UD_TEXT = Path(msa_edit.__file__).parent / "data" / "ud-text"
RESULTS = Path(__file__).resolve().parent / "results"
LANGUAGES = ("en", "de", "fr", "es", "ru", "zh")
FAMILIES = ("mixtral", "olmoe")
METHODS = ("shapley", "frequency", "reap", "enumeration", "random", "leave-one-out")
ANCHORS = {"enumeration (Lu et al.)": 3.9, "frequency": 7.2}
"""Published: points of average accuracy lost removing 2 of 8 experts per layer, Mixtral-8x7B."""


@dataclass(frozen=True)
class Setting:
    """Sizes of one run: calibration and held-out blocks per language, Shapley budget, seeds."""

    calib_blocks: int
    eval_blocks: int
    budget: int
    random_seeds: int
    removals: tuple[int, ...] = (2, 4)
    seq_len: int = 64
    seed: int = 0


FULL = Setting(calib_blocks=6, eval_blocks=32, budget=1000, random_seeds=5)
QUICK = Setting(calib_blocks=4, eval_blocks=16, budget=160, random_seeds=3)


# ---------------------------------------------------------------------------------------------
# Data


def calibration_blocks(tokenizer: Any, meta: dict[str, Any], setting: Setting) -> Targets:
    """`calib_blocks` evenly spaced blocks per language from the model's training split."""
    sets = {}
    for lang in LANGUAGES:
        train, _ = split_heldout(
            read_lines(UD_TEXT / f"{lang}.txt"), meta["config"]["heldout_fraction"]
        )
        blocks = windows(token_stream(tokenizer, train), setting.seq_len)
        pick = torch.linspace(0, len(blocks) - 1, setting.calib_blocks).round().long()
        sets[lang] = blocks[pick]
    return Targets.from_dict(sets)


def heldout_blocks(model_dir: Path, tokenizer: Any, setting: Setting) -> Targets:
    """The first `eval_blocks` blocks per language of the held-out text (never trained on)."""
    sets = {}
    for lang, lines in heldout_texts(model_dir).items():
        blocks = windows(token_stream(tokenizer, lines), setting.seq_len)
        if len(blocks) < setting.eval_blocks:
            raise SystemExit(
                f"{lang}: {len(blocks)} held-out blocks, fewer than {setting.eval_blocks}"
            )
        sets[lang] = blocks[: setting.eval_blocks]
    return Targets.from_dict({lang: sets[lang] for lang in LANGUAGES})


def language_nll(model: nn.Module, targets: Targets) -> torch.Tensor:
    """Mean next-token NLL per target set `[n_sets]` (float64)."""
    sums = block_nll(model, targets.input_ids, batch_size=32)
    per_set = torch.zeros(len(targets.names), dtype=torch.float64).index_add_(
        0, targets.group, sums
    )
    counts = torch.bincount(targets.group, minlength=len(targets.names)).double()
    return per_set / (counts * (targets.input_ids.shape[1] - 1))


# ---------------------------------------------------------------------------------------------
# Scores: one callable per method, all on the calibration text


def expert_units(model: nn.Module, layer: int) -> list[Unit]:
    return [Unit(layer, "experts", e) for e in range(n_experts(model))]


def lowest_per_layer(scores: torch.Tensor, k: int) -> list[Unit]:
    """The k experts with the lowest score `[n_layers, n_experts]` in every layer (ties: lower
    index first)."""
    order = torch.argsort(scores, dim=1, stable=True)[:, :k]
    return sorted(Unit(la, "experts", int(e)) for la, row in enumerate(order) for e in row)


def run_hooked(model: nn.Module, calib: Targets, handles: Sequence[Any]) -> None:
    """Run the calibration rows through `model` (32 a forward), then remove the hooks `handles`."""
    try:
        for rows in calib.input_ids.split(32):
            model(rows)
    finally:
        for handle in handles:
            handle.remove()


@torch.inference_mode()
def routing_scores(model: nn.Module, calib: Targets) -> tuple[torch.Tensor, torch.Tensor]:
    """(top-k selections, REAP saliency), each `[n_layers, n_experts]`, from one pass.

    REAP saliency of expert j: mean over the tokens x routed to j of g_j(x) * ||f_j(x)||_2, with
    g_j the router weight the model applies and f_j(x) the expert's output (Lasby et al. 2025).
    """
    layers = decoder_layers(model)
    count = torch.zeros(len(layers), n_experts(model), dtype=torch.float64)
    reap = torch.zeros_like(count)
    handles = []

    def hook(layer: int) -> Any:
        def pre(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            names = ("hidden_states", "top_k_index", "top_k_weights")
            hidden, index, weights = [*args, *(kwargs[n] for n in names[len(args) :])][:3]
            for e in range(count.shape[1]):
                token, slot = torch.where(index == e)
                if token.numel() == 0:
                    continue
                ones = torch.ones(token.numel(), 1, dtype=hidden.dtype)
                out = module.forward(hidden[token], index[token, slot, None], ones)  # no hooks
                count[layer, e] += token.numel()
                reap[layer, e] += (weights[token, slot] * out.norm(dim=-1)).double().sum()

        return pre

    for i, layer in enumerate(layers):
        _, experts = moe_parts(model, layer)
        handles.append(experts.register_forward_pre_hook(hook(i), with_kwargs=True))
    run_hooked(model, calib, handles)
    return count, reap / count.clamp_min(1)


@torch.inference_mode()
def moe_io(model: nn.Module, calib: Targets) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per MoE layer, (input, output) of its block on the calibration rows, intact model."""
    layers = decoder_layers(model)
    seen: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in layers]
    handles = []
    for i, layer in enumerate(layers):
        block = moe_block(model, layer)
        assert block is not None

        def keep(module: nn.Module, args: tuple[Any, ...], out: Any, i: int = i) -> None:
            seen[i].append((args[0], out[0] if isinstance(out, tuple) else out))

        handles.append(block.register_forward_hook(keep))
    run_hooked(model, calib, handles)
    return [(torch.cat([x for x, _ in s]), torch.cat([z for _, z in s])) for s in seen]


@torch.inference_mode()
def enumerate_removals(
    model: nn.Module, io: Sequence[tuple[torch.Tensor, torch.Tensor]], k: int, chunk: int = 14
) -> tuple[list[Unit], int]:
    """Lu et al.: per layer, the k experts whose removal (tokens rerouted over the rest)
    reconstructs the block's intact output best; returns them and the block forwards run."""
    layers = decoder_layers(model)
    removed: list[Unit] = []
    forwards = 0
    for layer, (x, z) in enumerate(io):
        block = moe_block(model, layers[layer])
        assert block is not None
        units = expert_units(model, layer)
        subsets = list(itertools.combinations(range(len(units)), k))
        errors = []
        with Lesion(model, units, "reroute") as lesion:
            for start in range(0, len(subsets), chunk):
                part = subsets[start : start + chunk]
                keep = torch.ones(len(part), len(units), dtype=torch.bool)
                for row, drop in enumerate(part):
                    keep[row, list(drop)] = False
                lesion.set_coalitions(keep)
                out = block(x.repeat(len(part), 1, 1))
                out = (out[0] if isinstance(out, tuple) else out).reshape(len(part), *z.shape)
                errors.append((out - z).double().pow(2).sum(dim=(1, 2, 3)))
        forwards += len(subsets)
        best = int(torch.cat(errors).argmin())
        removed += [units[e] for e in subsets[best]]
    return sorted(removed), forwards


def expert_game(model: nn.Module, calib: Targets) -> LesionGame:
    """All experts as players, `reroute` lesions, value = mean calibration NLL per language."""
    return LesionGame(model, select(model, "layers.*.experts.*"), calib, MeanNLL(), "reroute")


def shapley_modes(game: LesionGame, setting: Setting) -> ShapleyResult:
    """Per-language Shapley modes `[n_experts, n_languages]` (kernel estimator)."""
    return estimate(game, game.n_players, method="kernel", budget=setting.budget,
                    seed=setting.seed, batch_size=8, progress=False)  # fmt: skip


def leave_one_out(game: LesionGame, n_layers: int) -> torch.Tensor:
    """Increase of the languages' mean NLL when each expert alone is lesioned `[layers, experts]`
    (its marginal contribution at the full coalition; n + 1 coalitions)."""
    n = game.n_players
    coalitions = torch.cat([torch.ones(1, n, dtype=torch.bool), ~torch.eye(n, dtype=torch.bool)])
    values = game(coalitions).mean(dim=1)
    return (values[1:] - values[0]).reshape(n_layers, -1)


def shapley_removals(model: nn.Module, res: ShapleyResult, k: int) -> list[Unit]:
    """The plan's least useful k experts per layer for the mean NLL over all languages."""
    budget = Budget(per_layer=k, min_keep_per_layer=model.config.num_experts_per_tok)
    plan = make_plan(res.values, res.stderr, select(model, "layers.*.experts.*"), LANGUAGES,
                     target=LANGUAGES, budget=budget, mode="least_useful")  # fmt: skip
    return plan.unit_list


def random_removals(model: nn.Module, k: int, seed: int) -> list[Unit]:
    gen = torch.Generator().manual_seed(seed)
    layers = range(len(decoder_layers(model)))
    picks = [torch.randperm(n_experts(model), generator=gen)[:k] for _ in layers]
    return sorted(
        Unit(la, "experts", int(e)) for la, row in zip(layers, picks, strict=True) for e in row
    )


def block_share(model: nn.Module) -> float:
    """One MoE block's share of a full forward's multiply-adds per token (active parameters:
    attention projections, router, top-k experts, LM head; attention scores left out)."""
    layers = decoder_layers(model)
    gate, experts = moe_parts(model, layers[0])
    per_expert = experts.gate_up_proj[0].numel() + experts.down_proj[0].numel()
    block = gate.weight.numel() + model.config.num_experts_per_tok * per_expert
    attention = sum(p.numel() for p in layers[0].self_attn.parameters() if p.dim() == 2)
    head = model.get_output_embeddings().weight.numel()
    return block / (len(layers) * (attention + block) + head)


# ---------------------------------------------------------------------------------------------
# One model family


@dataclass(frozen=True)
class Choice:
    """One method's removals (one list per seed) and what choosing them cost."""

    removals: list[list[Unit]]
    cost_forwards: float
    cost: str


def choose(
    model: nn.Module, calib: Targets, setting: Setting, times: dict[str, float]
) -> tuple[dict[int, dict[str, Choice]], ShapleyResult]:
    """Every method's removals for every k (and the Shapley modes), timing each method's scoring
    into `times`."""
    game = expert_game(model, calib)
    tick = time.perf_counter()
    res = shapley_modes(game, setting)
    times["shapley"] = time.perf_counter() - tick
    tick = time.perf_counter()
    loo = leave_one_out(game, len(decoder_layers(model)))
    times["leave-one-out"] = time.perf_counter() - tick
    tick = time.perf_counter()
    count, reap = routing_scores(model, calib)
    times["frequency+reap"] = time.perf_counter() - tick
    tick = time.perf_counter()
    io = moe_io(model, calib)
    share = block_share(model)
    chosen = {}
    for k in setting.removals:
        enumerated, block_forwards = enumerate_removals(model, io, k)
        chosen[k] = {
            "shapley": Choice([shapley_removals(model, res, k)], float(res.n_evaluations),
                              f"{res.n_evaluations} coalitions, shared by every k"),
            "frequency": Choice([lowest_per_layer(count, k)], 1.0, "1 forward"),
            "reap": Choice([lowest_per_layer(reap, k)], 1.0, "1 forward"),
            "enumeration": Choice([enumerated], 1 + block_forwards * share,
                                  f"1 forward + {block_forwards} MoE-block forwards"),
            "random": Choice([random_removals(model, k, s) for s in range(setting.random_seeds)],
                             0.0, "none"),
            "leave-one-out": Choice([lowest_per_layer(loo, k)], game.n_players + 1.0,
                                    f"{game.n_players + 1} coalitions"),
        }  # fmt: skip
    times["enumeration"] = time.perf_counter() - tick
    return chosen, res


def evaluate(
    model: nn.Module, heldout: Targets, intact: torch.Tensor, chosen: dict[str, Choice]
) -> dict[str, dict[str, Any]]:
    """Held-out NLL per language after each method's removals (mean over seeds), ΔNLL vs intact
    and ΔNLL relative to Shapley's."""
    rows = {}
    for method, choice in chosen.items():
        runs = []
        for units in choice.removals:
            with lesioned(model, units, "reroute"), torch.inference_mode():
                runs.append(language_nll(model, heldout))
        nll = torch.stack(runs)
        delta = nll.mean(dim=1) - intact.mean()
        rows[method] = {
            "removed": [[str(u) for u in units] for units in choice.removals],
            "nll": nll.mean(dim=0).tolist(),
            "mean_nll": float(nll.mean()),
            "delta": float(delta.mean()),
            "delta_range": [float(delta.min()), float(delta.max())],
            "cost_forwards": choice.cost_forwards,
            "cost": choice.cost,
        }
    base = rows["shapley"]["delta"]
    for row in rows.values():
        row["ratio_to_shapley"] = row["delta"] / base if base > 0 else None
    return rows


def run_family(family: str, setting: Setting) -> dict[str, Any]:
    """Build (or load) one family's model, choose removals with every method, evaluate them."""
    times: dict[str, float] = {}
    tick = time.perf_counter()
    model_dir = build_tiny_moe({lang: UD_TEXT / f"{lang}.txt" for lang in LANGUAGES},
                               config=TinyMoeConfig(family=family))  # fmt: skip
    model, tokenizer, meta = load_tiny_moe(model_dir)
    times["build_or_load"] = time.perf_counter() - tick
    calib = calibration_blocks(tokenizer, meta, setting)
    heldout = heldout_blocks(model_dir, tokenizer, setting)
    with torch.inference_mode():
        intact = language_nll(model, heldout)
    chosen, res = choose(model, calib, setting, times)
    tick = time.perf_counter()
    tables = {str(k): evaluate(model, heldout, intact, chosen[k]) for k in setting.removals}
    times["evaluate"] = time.perf_counter() - tick
    return {
        "model": str(model_dir),
        "family": family,
        "model_type": model.config.model_type,
        "n_parameters": meta["n_parameters"],
        "n_experts": n_experts(model),
        "intact_nll": intact.tolist(),
        "intact_mean_nll": float(intact.mean()),
        "block_share": block_share(model),
        "shapley": {
            "method": res.method,
            "n_evaluations": res.n_evaluations,
            "seed": setting.seed,
            "max_stderr": float(res.stderr.max()),
            "units": [str(u) for u in select(model, "layers.*.experts.*")],
            "targets": list(LANGUAGES),
            "values": res.values.tolist(),
            "stderr": res.stderr.tolist(),
        },
        "tables": tables,
        "seconds": times,
    }


# ---------------------------------------------------------------------------------------------
# Report


def markdown(result: dict[str, Any], k: int, setting: Setting) -> str:
    """One Markdown table: a family with k experts removed per layer."""
    n = result["n_experts"]
    langs = " | ".join(LANGUAGES)
    lines = [
        f"**{result['family']}** ({result['n_parameters'] / 1e6:.2f} M parameters), "
        f"{k} of {n} experts removed per layer; held-out NLL (nats/token), "
        f"{setting.eval_blocks} blocks x {setting.seq_len} tokens per language",
        "",
        f"| method | {langs} | mean | ΔNLL | ΔNLL / Shapley's | cost (calibration forwards) |",
        "|---|" + "---:|" * (len(LANGUAGES) + 4),
        "| intact | "
        + " | ".join(f"{v:.3f}" for v in result["intact_nll"])
        + f" | {result['intact_mean_nll']:.3f} | — | — | — |",
    ]
    for method, row in result["tables"][str(k)].items():
        name = method
        delta = f"{row['delta']:+.3f}"
        if method == "random":
            lo, hi = row["delta_range"]
            name = f"random ({len(row['removed'])} seeds, mean)"
            delta += f" [{lo:+.3f}, {hi:+.3f}]"
        ratio = "—" if row["ratio_to_shapley"] is None else f"{row['ratio_to_shapley']:.2f}"
        cost = (
            f"{row['cost_forwards']:.1f}"
            if method == "enumeration"
            else f"{row['cost_forwards']:.0f}"
        )
        if method == "enumeration":
            cost += f" ({row['cost']})"
        cells = " | ".join(f"{v:.3f}" for v in row["nll"])
        lines.append(f"| {name} | {cells} | {row['mean_nll']:.3f} | {delta} | {ratio} | {cost} |")
    return "\n".join(lines)


def ratios(results: Sequence[dict[str, Any]], removals: Sequence[int]) -> str:
    """Each method's ΔNLL over Shapley's, per family and k, as a Markdown table."""
    methods = [m for m in METHODS if m != "shapley"]
    lines = [
        "ΔNLL / Shapley's ΔNLL (> 1: the method's removal hurts more than Shapley's):",
        "",
        "| family | k | " + " | ".join(methods) + " |",
        "|---|---:|" + "---:|" * len(methods),
    ]
    for result in results:
        for k in removals:
            rows = result["tables"][str(k)]
            cells = [rows[m]["ratio_to_shapley"] for m in methods]
            text = " | ".join("—" if c is None else f"{c:.2f}" for c in cells)
            lines.append(f"| {result['family']} | {k} | {text} |")
    return "\n".join(lines)


def main() -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="160 coalitions, 3 random seeds, less text"
    )
    parser.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    args = parser.parse_args()
    torch.set_num_threads(1)  # tiny ops: one thread is fastest and leaves the other core free
    setting = QUICK if args.quick else FULL
    start = time.perf_counter()
    results = [run_family(family, setting) for family in args.families]
    wall = time.perf_counter() - start
    print(
        f"# Expert pruning ({'quick' if args.quick else 'full'}): calibration "
        f"{setting.calib_blocks} blocks x {setting.seq_len} tokens per language (training split), "
        f"Shapley kernel budget {setting.budget}, torch threads {torch.get_num_threads()}\n"
    )
    for result in results:
        print(
            f"{result['family']}: {result['model']}; one MoE-block forward = "
            f"{result['block_share']:.3f} full forwards; Shapley max stderr "
            f"{result['shapley']['max_stderr']:.4f}\n"
        )
        for k in setting.removals:
            print(markdown(result, k, setting) + "\n")
    print(ratios(results, setting.removals))
    phases = "; ".join(
        f"{r['family']}: " + ", ".join(f"{n} {t:.0f} s" for n, t in r["seconds"].items())
        for r in results
    )
    print(f"\nwall time {wall:.0f} s ({phases})")
    payload = {
        "setting": asdict(setting),
        "quick": args.quick,
        "threads": torch.get_num_threads(),
        "wall_seconds": wall,
        "anchors_mixtral_8x7b_points": ANCHORS,
        "languages": list(LANGUAGES),
        "families": results,
    }
    out = RESULTS / ("bench_pruning_quick.json" if args.quick else "bench_pruning.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1, allow_nan=False) + "\n")
    os.replace(tmp, out)
    return payload


if __name__ == "__main__":
    main()
