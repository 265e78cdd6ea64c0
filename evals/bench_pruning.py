"""Expert pruning: the game-based search against REAP, Lu et al.'s enumeration and the rest.

Three tiny MoE models trained by `msa_edit.tiny_moe` on the six bundled UD languages (same
tokenizer recipe, text and training loop): the demo's 4-layer, 8-expert top-2 Mixtral, an OLMoE
of the same size (query/key norms, top-k weights not renormalised), and a 4-layer Mixtral with
16 experts of half the width per layer (to show how the search's cost grows with experts). From
every layer k experts are removed — 2 and 4 of 8, and 8 of 16 (4 or 5 of the 16 experts of each
layer are all but unused, so fewer removals cost nothing measurable) — chosen by

- shapley: per-language Shapley modes of all experts (kernel estimator, `reroute` lesions), then
  `make_plan(mode="least_useful")`: the k experts per layer the languages' mean NLL needs least;
- loo: leave-one-out, the k experts per layer whose removal alone raises the mean NLL least
  (n + 1 coalitions);
- search: `msa_edit.search.search_compression` with its defaults (the recipe's `method: search`):
  leave-one-out, greedy rounds re-evaluated after each removal, REAP's and frequency's sets as
  priors, the choice made on the calibration blocks' check half;
- search+swaps: the same with two swap passes (a diagnostic: does local search pay?);
- reap: REAP saliency (Lasby et al. 2025) with the reference gate (full-softmax probability),
  `msa_edit.routing`; reap-applied: the gate the model applies (renormalised top-k weight; a
  diagnostic: some implementations use it); frequency: top-k selections; each one forward;
- enumeration (Lu et al. 2024): per layer, every set of k experts is tried on the MoE block's
  intact inputs; the set with the least squared reconstruction error of the block output goes;
- random: k per layer uniformly at random (several seeds; mean and range).

Every method sees the same calibration text (evenly spaced blocks of each language's training
split) and is judged on held-out text (never trained on, never calibrated on): the mean over
languages of the NLL increase, with paired standard errors over held-out blocks for the ratios
search / REAP and search / enumeration. Cost: coalitions (one pass over the calibration text
each; REAP/frequency one pass; enumeration one pass plus MoE-block forwards, converted to full
passes by their share of a forward's multiply-adds). Deterministic given seeds.

Run from the repository root (models are trained once and cached, about five minutes each):

    python evals/bench_pruning.py           # all three models -> evals/results/bench_pruning.json
    python evals/bench_pruning.py --quick   # the Mixtral only, less text; < 2 minutes (cached)
    python evals/bench_pruning.py --oracle  # + the search run on the held-out text itself: how
                                            #   much a perfect choice could gain (a bound)
"""

from __future__ import annotations

import argparse
import itertools
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from benchlib import LANGUAGES, UD_TEXT, Memo, markdown, save_results
from torch import nn

from msa_edit.evaluate.language import block_nll
from msa_edit.games import LesionGame, MeanNLL, RowNLL, Targets
from msa_edit.lesions import lesioned
from msa_edit.plan import Budget, make_plan
from msa_edit.routing import routing_stats
from msa_edit.search import Blocks, Quota, Removals, SearchSettings, search_compression, search_cost
from msa_edit.shapley import estimate
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
from msa_edit.units import (
    Unit,
    decoder_layers,
    moe_block,
    moe_parts,
    n_experts,
    renormalizes,
    select,
)

MODELS = {
    "mixtral": (TinyMoeConfig(), (2, 4)),
    "olmoe": (TinyMoeConfig(family="olmoe"), (2, 4)),
    "mixtral-16": (TinyMoeConfig(experts=16, intermediate=112), (8,)),
}
METHODS = (
    "shapley", "loo", "search", "search+swaps", "reap", "reap-applied", "frequency", "enumeration",
    "random",
)  # fmt: skip
SCALE = {
    "Mixtral-8x7B (32 x 8, remove 2 per layer)": (32, 8, 2),
    "Qwen3-30B-A3B (48 x 128, remove 64 per layer)": (48, 128, 64),
}


@dataclass(frozen=True)
class Setting:
    """Sizes of one run: blocks per language, Shapley budget, random seeds, which models."""

    calib_blocks: int
    eval_blocks: int
    shapley_budget: int
    random_seeds: int
    models: tuple[str, ...]
    seq_len: int = 64
    seed: int = 0


FULL = Setting(24, 32, 256, 5, tuple(MODELS))
QUICK = Setting(12, 16, 128, 3, ("mixtral",))


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


def heldout_blocks(model_dir: Any, tokenizer: Any, setting: Setting) -> Targets:
    """The first `eval_blocks` blocks per language of the held-out text (never trained on)."""
    sets = {}
    for lang, lines in heldout_texts(model_dir).items():
        blocks = windows(token_stream(tokenizer, lines), setting.seq_len)
        if len(blocks) < setting.eval_blocks:
            raise SystemExit(f"{lang}: {len(blocks)} held-out blocks, < {setting.eval_blocks}")
        sets[lang] = blocks[: setting.eval_blocks]
    return Targets.from_dict({lang: sets[lang] for lang in LANGUAGES})


def block_losses(model: nn.Module, targets: Targets) -> torch.Tensor:
    """Mean next-token NLL of every block `[n_blocks]` (float64)."""
    return block_nll(model, targets.input_ids, batch_size=32) / (targets.input_ids.shape[1] - 1)


# ---------------------------------------------------------------------------------------------
# The methods


def expert_units(model: nn.Module) -> list[Unit]:
    return select(model, "layers.*.experts.*")


def lowest_per_layer(units: list[Unit], score: torch.Tensor, k: int) -> list[Unit]:
    """The k experts with the lowest score in every layer (ties: lower index first)."""
    quota = Quota.from_budget(units, Budget(per_layer=k))
    return sorted(units[i] for i in quota.lowest(score.tolist()))


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
    try:
        for rows in calib.input_ids.split(32):
            model(rows)
    finally:
        for handle in handles:
            handle.remove()
    return [(torch.cat([x for x, _ in s]), torch.cat([z for _, z in s])) for s in seen]


@torch.inference_mode()
def enumerate_removals(
    model: nn.Module, io: Sequence[tuple[torch.Tensor, torch.Tensor]], k: int, chunk: int = 64
) -> tuple[list[Unit], int]:
    """Lu et al.: per layer, the k experts whose removal (tokens rerouted over the rest)
    reconstructs the block's intact output best; returns them and the block forwards counted.

    Exact and fast for top-2 routers: a token's rerouted output is its first two kept experts
    (in its router order) weighted by their probabilities over the kept experts (or over the two,
    where the family renormalises), so its squared error is a function of the pair and the
    dropped probability mass. Per token the experts' outputs, their Gram matrix and their dot
    products with the intact output are computed once; each of the C(E, k) drop sets then costs
    an index lookup per token instead of a block forward.
    """
    if model.config.num_experts_per_tok != 2:
        raise SystemExit("enumerate_removals handles top-2 routers (the benchmark's models)")
    layers = decoder_layers(model)
    renorm = renormalizes(model)
    removed: list[Unit] = []
    forwards = 0
    for layer, (x, z) in enumerate(io):
        gate, experts = moe_parts(model, layers[layer])
        hidden = x.reshape(-1, x.shape[-1])
        target = z.reshape(-1, z.shape[-1]).double()
        width = n_experts(model)
        ones = torch.ones(hidden.shape[0], 1, dtype=hidden.dtype)
        outs = torch.stack([
            experts.forward(hidden, torch.full_like(ones, e, dtype=torch.long), ones)
            for e in range(width)
        ], 1).double()  # [tokens, experts, hidden]  # fmt: skip
        logits = (hidden @ gate.weight.T).float()
        probs = torch.softmax(logits, dim=-1).double()
        order = torch.argsort(logits, dim=-1, descending=True, stable=True)
        gram = outs @ outs.transpose(1, 2)  # [tokens, E, E]
        dots = (outs * target[:, None]).sum(-1)  # [tokens, E]
        norm = target.pow(2).sum(-1)
        rows = torch.arange(hidden.shape[0])
        subsets = list(itertools.combinations(range(width), k))
        errors = []
        for start in range(0, len(subsets), chunk):
            part = subsets[start : start + chunk]
            drop = torch.zeros(len(part), width, dtype=torch.bool)
            for row, d in enumerate(part):
                drop[row, list(d)] = True
            kept = ~drop[:, order]  # [sets, tokens, E], in each token's router order
            rank = kept.cumsum(-1)
            a = order.gather(1, ((rank == 1) & kept).int().argmax(-1).T).T  # [sets, tokens]
            b = order.gather(1, ((rank == 2) & kept).int().argmax(-1).T).T
            pa, pb = probs[rows, a], probs[rows, b]
            scale = pa + pb if renorm else 1 - (probs @ drop.double().T).T  # kept mass
            wa, wb = pa / scale, pb / scale
            out_norm = (wa**2 * gram[rows, a, a] + wb**2 * gram[rows, b, b]
                        + 2 * wa * wb * gram[rows, a, b])  # fmt: skip
            cross = wa * dots[rows, a] + wb * dots[rows, b]
            errors.append((out_norm - 2 * cross + norm).sum(-1))
        forwards += len(subsets)
        best = int(torch.cat(errors).argmin())
        removed += [Unit(layer, "experts", e) for e in subsets[best]]
    return sorted(removed), forwards


def random_removals(units: list[Unit], k: int, seed: int) -> list[Unit]:
    score = torch.rand(len(units), generator=torch.Generator().manual_seed(seed))
    return lowest_per_layer(units, score, k)


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


@dataclass(frozen=True)
class Choice:
    """One method's removals (one list per seed), what choosing them cost and took."""

    removals: list[list[Unit]]
    passes: float
    seconds: float
    cost: str


def choose(model: nn.Module, calib: Targets, setting: Setting, ks: Sequence[int]) -> dict:
    """Every method's removals for every k, timing each method's scoring."""
    units = expert_units(model)
    n = len(units)
    tick = time.perf_counter()
    shapley = estimate(
        LesionGame(model, units, calib, MeanNLL(), "reroute"), n, method="kernel",
        budget=setting.shapley_budget, seed=setting.seed, batch_size=8, progress=False,
    )  # fmt: skip
    shapley_s = time.perf_counter() - tick
    tick = time.perf_counter()
    stats = routing_stats(model, calib.input_ids)
    routing_s = time.perf_counter() - tick
    applied = routing_stats(model, calib.input_ids, gate="applied")
    tick = time.perf_counter()
    io = moe_io(model, calib)
    io_s = time.perf_counter() - tick
    memo = Memo(LesionGame(model, units, calib, RowNLL(), "reroute"))
    blocks = Blocks.split(calib.names, calib.group)
    chosen: dict[int, dict[str, Choice]] = {}
    for k in ks:
        budget = Budget(per_layer=k, min_keep_per_layer=model.config.num_experts_per_tok)
        quota = Quota.from_budget(units, budget)
        priors = {"reap": quota.lowest(stats.reap.tolist()),
                  "frequency": quota.lowest(stats.frequency.tolist())}  # fmt: skip
        rows: dict[str, Choice] = {}
        plan = make_plan(shapley.values, shapley.stderr, units, LANGUAGES, target=LANGUAGES,
                         budget=budget, mode="least_useful")  # fmt: skip
        rows["shapley"] = Choice(
            [plan.unit_list],
            shapley.n_evaluations,
            shapley_s,
            f"{shapley.n_evaluations} coalitions, shared by every k",
        )
        for name, swaps in (("search", 0), ("search+swaps", 2)):
            tick = time.perf_counter()
            removals = Removals(memo, n, progress=False)
            result = search_compression(removals, blocks, quota, LANGUAGES, priors,
                                        SearchSettings(swaps=swaps))  # fmt: skip
            seconds = time.perf_counter() - tick
            rows[name] = Choice(
                [list(result.units)],
                result.n_evaluations,
                seconds,
                f"{result.n_evaluations} coalitions; chose {result.chosen}",
            )
            if name == "search":
                loo = [Unit.parse(u) for u in result.candidate("leave-one-out").units]
                rows["loo"] = Choice(
                    [loo], n + 1, seconds * (n + 1) / result.n_evaluations, f"{n + 1} coalitions"
                )
        rows["reap"] = Choice([lowest_per_layer(units, stats.reap, k)], 1, routing_s, "1 pass")
        rows["reap-applied"] = Choice([lowest_per_layer(units, applied.reap, k)], 1, routing_s,
                                      "1 pass")  # fmt: skip
        rows["frequency"] = Choice(
            [lowest_per_layer(units, stats.frequency, k)], 1, routing_s, "1 pass"
        )
        tick = time.perf_counter()
        enumerated, block_forwards = enumerate_removals(model, io, k)
        rows["enumeration"] = Choice(
            [enumerated],
            1 + block_forwards * block_share(model),
            io_s + time.perf_counter() - tick,
            f"1 pass + {block_forwards} MoE-block forwards",
        )
        rows["random"] = Choice(
            [random_removals(units, k, s) for s in range(setting.random_seeds)], 0, 0.0, "none"
        )
        chosen[k] = {m: rows[m] for m in METHODS}
    return {"choices": chosen, "shapley_max_stderr": float(shapley.stderr.max())}


# ---------------------------------------------------------------------------------------------
# Held-out evaluation


def ratio(a: torch.Tensor, b: torch.Tensor, blocks: Blocks) -> tuple[float, float, float, float]:
    """Mean held-out increase of a over b's (a ratio of language-weighted means) with its paired
    stderr (delta method over blocks), and the paired difference a - b with its stderr."""
    sets = list(range(len(blocks.names)))
    mean_a = float(blocks.mean_se(a[None], sets, "all")[0][0])
    mean_b = float(blocks.mean_se(b[None], sets, "all")[0][0])
    r = mean_a / mean_b
    _, se_r = blocks.mean_se(((a - r * b) / mean_b)[None], sets, "all")
    diff, se_d = blocks.mean_se((a - b)[None], sets, "all")
    return r, float(se_r[0]), float(diff[0]), float(se_d[0])


def evaluate(model: nn.Module, heldout: Targets, choices: dict[str, Choice]) -> dict[str, Any]:
    """Per method: held-out increase per block (mean over seeds), per language and overall."""
    blocks = Blocks.split(heldout.names, heldout.group)
    with torch.inference_mode():
        intact = block_losses(model, heldout)
    out: dict[str, Any] = {}
    deltas: dict[str, torch.Tensor] = {}
    for method, choice in choices.items():
        runs = []
        for units in choice.removals:
            with lesioned(model, units, "reroute"), torch.inference_mode():
                runs.append(block_losses(model, heldout) - intact)
        delta = torch.stack(runs).mean(0)
        deltas[method] = delta
        per_lang, _ = blocks.per_set(delta[None], "all")
        overall = [float(blocks.mean_se(r[None], range(6), "all")[0][0]) for r in runs]
        mean, se = blocks.mean_se(delta[None], range(6), "all")
        out[method] = {
            "removed": [[str(u) for u in units] for units in choice.removals],
            "delta": float(mean[0]), "stderr": float(se[0]),
            "delta_range": [min(overall), max(overall)],
            "per_language": dict(zip(LANGUAGES, per_lang[0].tolist(), strict=True)),
            "passes": choice.passes, "seconds": choice.seconds, "cost": choice.cost,
        }  # fmt: skip
    for ref in ("reap", "enumeration"):
        for method in out:
            r, se_r, d, se_d = ratio(deltas[method], deltas[ref], blocks)
            out[method][f"vs_{ref}"] = {"ratio": r, "ratio_se": se_r, "diff": d, "diff_se": se_d}
    return out


def oracle(model: nn.Module, heldout: Targets, ks: Sequence[int]) -> dict[int, Choice]:
    """The search run on the held-out text itself (cheating: a bound on what choosing by the
    game can gain here, not a method); `--oracle` adds it as a row."""
    units = expert_units(model)
    memo = Memo(LesionGame(model, units, heldout, RowNLL(), "reroute"))
    blocks = Blocks.split(heldout.names, heldout.group)
    out = {}
    for k in ks:
        tick = time.perf_counter()
        quota = Quota.from_budget(units, Budget(per_layer=k, min_keep_per_layer=2))
        result = search_compression(Removals(memo, len(units), progress=False), blocks, quota,
                                    LANGUAGES, settings=SearchSettings(swaps=2))  # fmt: skip
        out[k] = Choice([list(result.units)], result.n_evaluations, time.perf_counter() - tick,
                        "search on the held-out text itself (a bound, not a method)")  # fmt: skip
    return out


def run_model(name: str, setting: Setting, with_oracle: bool = False) -> dict[str, Any]:
    """Build (or load) one model, choose removals with every method, evaluate them."""
    config, ks = MODELS[name]
    tick = time.perf_counter()
    folder = build_tiny_moe({lang: UD_TEXT / f"{lang}.txt" for lang in LANGUAGES}, config=config)
    model, tokenizer, meta = load_tiny_moe(folder)
    load_s = time.perf_counter() - tick
    calib = calibration_blocks(tokenizer, meta, setting)
    heldout = heldout_blocks(folder, tokenizer, setting)
    tick = time.perf_counter()
    chosen = choose(model, calib, setting, ks)
    if with_oracle:
        for k, choice in oracle(model, heldout, ks).items():
            chosen["choices"][k]["oracle"] = choice
    choose_s = time.perf_counter() - tick
    tick = time.perf_counter()
    tables = {str(k): evaluate(model, heldout, chosen["choices"][k]) for k in ks}
    return {
        "model": name, "folder": str(folder), "model_type": model.config.model_type,
        "n_parameters": meta["n_parameters"], "n_experts": n_experts(model),
        "layers": len(decoder_layers(model)), "block_share": block_share(model),
        "shapley_max_stderr": chosen["shapley_max_stderr"], "tables": tables,
        "seconds": {"load": load_s, "choose": choose_s, "evaluate": time.perf_counter() - tick},
    }  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Report


def table(result: dict[str, Any], k: int, setting: Setting) -> str:
    rows = []
    for method, row in result["tables"][str(k)].items():
        name = method
        delta = f"{row['delta']:+.4f} ± {row['stderr']:.4f}"
        if method == "random":
            lo, hi = row["delta_range"]
            name = f"random ({len(row['removed'])} seeds)"
            delta += f" [{lo:+.3f}, {hi:+.3f}]"
        langs = [f"{row['per_language'][g]:+.3f}" for g in LANGUAGES]
        vs = [f"{row[f'vs_{r}']['ratio']:.2f} ± {row[f'vs_{r}']['ratio_se']:.2f}"
              for r in ("reap", "enumeration")]  # fmt: skip
        rows.append([name, *langs, delta, *vs, f"{row['passes']:.1f}", f"{row['seconds']:.1f}"])
    head = ["method", *LANGUAGES, "mean ΔNLL ± se", "÷ REAP", "÷ enum.", "passes", "s"]
    title = (
        f"**{result['model']}** ({result['layers']} x {result['n_experts']} experts, "
        f"{result['n_parameters'] / 1e6:.2f} M parameters), {k} of {result['n_experts']} removed "
        f"per layer; held-out ΔNLL (nats/token), {setting.eval_blocks} blocks x "
        f"{setting.seq_len} tokens per language; passes = calibration forwards"
    )
    return title + "\n\n" + markdown(head, rows)


def summary(results: Sequence[dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    """The acceptance table: search vs the best of REAP and enumeration, per setting."""
    rows, ratios, worst = [], [], []
    for result in results:
        for k, methods in result["tables"].items():
            s = methods["search"]
            best = min(("reap", "enumeration"), key=lambda m: methods[m]["delta"])
            vs = s[f"vs_{best}"]
            if methods[best]["delta"] > 2 * methods[best]["stderr"]:  # a ratio needs a real loss
                ratios.append(vs["ratio"])
            beyond = max(
                s[f"vs_{r}"]["diff"] - s[f"vs_{r}"]["diff_se"] for r in ("reap", "enumeration")
            )
            worst.append(beyond)
            rows.append([
                result["model"], k, f"{s['delta']:+.4f}", best, f"{methods[best]['delta']:+.4f}",
                f"{vs['ratio']:.2f} ± {vs['ratio_se']:.2f}",
                f"{vs['diff']:+.4f} ± {vs['diff_se']:.4f}",
                "yes" if beyond > 0 else "no", f"{s['passes']:.0f}",
            ])  # fmt: skip
    geo = math.exp(sum(math.log(r) for r in ratios) / len(ratios)) if ratios else math.nan
    head = ["model", "k", "search ΔNLL", "best peer", "its ΔNLL", "ratio ± se",
            "difference ± se", "worse by > 1 se", "coalitions"]  # fmt: skip
    text = markdown(head, rows) + (
        f"\n\ngeometric mean of the ratios: **{geo:.3f}** ({len(ratios)} settings whose best "
        "peer's loss is more than 2 stderr above zero)"
    )
    return text, {"geometric_mean_ratio": geo, "worse_beyond_one_se": any(w > 0 for w in worst)}


def scale_lines() -> list[str]:
    """The search's coalition count on real MoE shapes (the schedule's upper bound)."""
    lines = []
    for name, (layers, experts, k) in SCALE.items():
        units = [Unit(la, "experts", e) for la in range(layers) for e in range(experts)]
        quota = Quota.from_budget(units, Budget(per_layer=k, min_keep_per_layer=2))
        cost = search_cost(quota, SearchSettings(), n_priors=2)
        lines.append(f"- {name}: at most {cost} coalitions (leave-one-out {len(units) + 1})")
    return lines


def main() -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the Mixtral only, less text")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--oracle", action="store_true", help="add the search run on held-out text (a bound)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    setting = QUICK if args.quick else FULL
    if args.models:
        setting = Setting(**(asdict(setting) | {"models": tuple(args.models)}))
    print(
        f"# Expert pruning ({'quick' if args.quick else 'full'}): calibration "
        f"{setting.calib_blocks} blocks x {setting.seq_len} tokens per language, Shapley kernel "
        f"budget {setting.shapley_budget}, torch threads {torch.get_num_threads()}\n",
        flush=True,
    )
    start = time.perf_counter()
    results = []
    for name in setting.models:
        results.append(run_model(name, setting, args.oracle))
        for k in results[-1]["tables"]:
            print(table(results[-1], int(k), setting) + "\n", flush=True)
    wall = time.perf_counter() - start
    text, verdict = summary(results)
    print("Search vs the better of REAP and enumeration (held-out, paired over blocks):\n")
    print(text + "\n")
    print("Search cost at scale (default settings, REAP and frequency priors):")
    print("\n".join(scale_lines()))
    phases = "; ".join(
        f"{r['model']}: " + ", ".join(f"{n} {t:.0f} s" for n, t in r["seconds"].items())
        for r in results
    )
    print(f"\nwall time {wall:.0f} s ({phases})")
    payload = {"setting": asdict(setting), "quick": args.quick, "threads": torch.get_num_threads(),
               "wall_seconds": wall, "verdict": verdict, "scale": scale_lines(),
               "languages": list(LANGUAGES), "models": results}  # fmt: skip
    save_results("bench_pruning" + ("_oracle" if args.oracle else ""), args.quick, payload)
    return payload


if __name__ == "__main__":
    main()
