"""MLP hubs: does regularisation concentrate an MLP's function in a few hidden units?

One-hidden-layer MLPs (32 ReLU units) are trained on scikit-learn's bundled 8x8 digits without
regularisation, with an L1 penalty and with an L2 penalty on the weights (strengths chosen so
both penalties cost about the same held-out accuracy), 10 seeds each. The players are the hidden
units (lesion = unit output set to 0, `msa_edit.module_games.ChannelGame`); the value is the mean
log-probability of the true class per class on 450 held-out digits, so each unit's Shapley mode
has 10 entries. A unit's contribution is the sum over classes of |φ|; concentration is the Gini
coefficient of the contributions (also among the units that are not silent, i.e. above 1% of the
largest) and the share of the top 4 units.

A Gini number alone could be an artefact of estimation noise, so each net is also checked by
direct lesions, with no Shapley estimate involved: removing its top-4 units by Shapley value
removes what share of the function (v(N) - v(N minus top 4), over v(N) - v(empty)), compared
with removing 4 random units.

Writes evals/results/mlp_hubs.{json,png} and mlp_hubs_modes.png. Run from the repository root:

    python evals/mlp_hubs.py              # 3 conditions x 10 seeds, ~1.5 min on 2 cores
    python evals/mlp_hubs.py --quick      # 3 seeds, 16 units, ~15 s
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from examplelib import digits, example_args, mean_sd, plain, pyplot
from torch import nn

from msa_edit.atomic import write_json
from msa_edit.evaluate.plots import save_figure
from msa_edit.module_games import ChannelGame, Readout
from msa_edit.shapley import estimate

CONDITIONS = ("none", "l1", "l2")
N_TEST = 450


@dataclass(frozen=True)
class Settings:
    """One experiment: network size, training, penalties and the Shapley budget."""

    hidden: int = 32
    epochs: int = 60
    seeds: int = 10
    budget: int = 4096
    top_k: int = 4
    random_sets: int = 32
    l1: float = 5e-3
    l2: float = 1e-2


QUICK = Settings(hidden=16, epochs=30, seeds=3, budget=600, top_k=2, random_sets=16)


def digit_split(
    test_rows: int = N_TEST,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The digits as `x [N, 64]` in [0, 1] and labels, split once (fixed permutation, seed 0)
    into training rows and `test_rows` held-out rows."""
    images, y = digits()
    x = images.reshape(len(y), -1)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    test, train = order[:test_rows], order[test_rows:]
    return x[train], y[train], x[test], y[test]


def train_mlp(
    x: torch.Tensor,
    y: torch.Tensor,
    hidden: int,
    penalty: str,
    strength: float,
    epochs: int,
    seed: int,
) -> nn.Sequential:
    """An MLP `64 -> hidden (ReLU) -> 10` trained with Adam (batches of 64) on cross-entropy plus
    `strength` x the L1 or L2 norm of both weight matrices (`penalty` "none", "l1" or "l2");
    returned in eval mode. Same arguments, same weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = nn.Sequential(nn.Linear(x.shape[1], hidden), nn.ReLU(), nn.Linear(hidden, 10))
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    weights = [net[0].weight, net[2].weight]
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=gen)
        for start in range(0, len(y), 64):
            rows = order[start : start + 64]
            loss = nn.functional.cross_entropy(net(x[rows]), y[rows])
            if penalty == "l1":
                loss = loss + strength * sum(w.abs().sum() for w in weights)
            elif penalty == "l2":
                loss = loss + strength * sum(w.square().sum() for w in weights)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval()


def class_loglik(labels: torch.Tensor) -> Readout:
    """Readout: mean log-probability of the true class, per true class `[10]`."""
    onehot = nn.functional.one_hot(labels, 10).float()

    def readout(logits: torch.Tensor) -> torch.Tensor:
        loglik = (logits.log_softmax(-1) * onehot).sum(-1)
        return (loglik @ onehot) / onehot.sum(0)

    return readout


def accuracy(labels: torch.Tensor) -> Readout:
    """Readout: share of rows whose highest logit is the label."""
    return lambda logits: (logits.argmax(-1) == labels).double().mean()


def gini(values: torch.Tensor) -> float:
    """Gini coefficient of non-negative `values`: 0 = all equal, (n-1)/n = one holds everything.

    >>> gini(torch.ones(4)), gini(torch.tensor([0.0, 0.0, 0.0, 1.0]))
    (0.0, 0.75)
    """
    v = values.double().sort().values
    n = v.numel()
    rank = torch.arange(1, n + 1, dtype=torch.float64)
    return float(((2 * rank - n - 1) * v).sum() / (n * v.sum()))


def units_for(contribution: torch.Tensor, share: float) -> int:
    """Fewest units whose contributions add up to `share` of the total.

    >>> units_for(torch.tensor([1.0, 6.0, 3.0]), 0.9)
    2
    """
    ordered = contribution.double().sort(descending=True).values.cumsum(0)
    return int((ordered < share * ordered[-1] - 1e-12).sum()) + 1


def analyse_net(
    net: nn.Sequential, x: torch.Tensor, y: torch.Tensor, settings: Settings, seed: int
) -> dict[str, Any]:
    """Shapley modes of `net`'s hidden units on held-out `x, y`, their concentration, and what
    lesioning the top-k units (by Shapley contribution) or k random units does."""
    game = ChannelGame(net, {"hidden": net[1]}, x, class_loglik(y))
    res = estimate(game, game.n_players, budget=settings.budget, seed=seed, progress=False)
    contribution = res.values.abs().sum(1)
    silent = contribution < 0.01 * contribution.max()
    top = contribution.argsort(descending=True, stable=True)[: settings.top_k]
    gen = torch.Generator().manual_seed(seed)
    randoms = [
        torch.randperm(game.n_players, generator=gen)[: settings.top_k]
        for _ in range(settings.random_sets)
    ]
    keep = torch.ones(2 + len(randoms), game.n_players, dtype=torch.bool)
    keep[1, top] = False
    for row, units in enumerate(randoms, start=2):
        keep[row, units] = False
    values = game(keep).mean(1)  # mean over classes: [full, minus top-k, minus random k ...]
    total = float(res.v_full.mean() - res.v_empty.mean())
    acc = ChannelGame(net, {"hidden": net[1]}, x, accuracy(y))(keep[:2])
    return {
        "modes": res.values,
        "stderr_max": float(res.stderr.max()),
        "contribution": contribution,
        "gini": gini(contribution),
        "top_share": float(contribution[top].sum() / contribution.sum()),
        "units_for_90": units_for(contribution, 0.9),
        "silent": int(silent.sum()),
        "gini_active": gini(contribution[~silent]),
        "lesion_top_share": float(values[0] - values[1]) / total,
        "lesion_random_share": float((values[0] - values[2:]).mean()) / total,
        "accuracy": float(acc[0]),
        "accuracy_without_top": float(acc[1]),
        "n_evaluations": res.n_evaluations,
    }


def run(
    settings: Settings, first_seed: int = 0, conditions: tuple[str, ...] = CONDITIONS
) -> dict[str, list[dict[str, Any]]]:
    """Train and analyse `settings.seeds` nets per condition (seeds `first_seed`, ...)."""
    x_train, y_train, x_test, y_test = digit_split()
    strength = {"none": 0.0, "l1": settings.l1, "l2": settings.l2}
    out: dict[str, list[dict[str, Any]]] = {}
    for condition in conditions:
        out[condition] = []
        for seed in range(first_seed, first_seed + settings.seeds):
            net = train_mlp(
                x_train,
                y_train,
                settings.hidden,
                condition,
                strength[condition],
                settings.epochs,
                seed,
            )
            out[condition].append(analyse_net(net, x_test, y_test, settings, seed))
    return out


METRICS = {
    "accuracy": "accuracy",
    "gini": "Gini",
    "top_share": "top-{k} share",
    "units_for_90": "units for 90%",
    "silent": "silent units (< 1% of the top)",
    "gini_active": "Gini of the other units",
    "lesion_top_share": "function lost, top {k} lesioned",
    "lesion_random_share": "function lost, {k} random lesioned",
    "accuracy_without_top": "accuracy without top {k}",
}
"""Column headers of the printed table, per metric of `analyse_net` (k = `Settings.top_k`)."""


def summary(results: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, list[float]]]:
    """Per condition and metric: `[mean, sd]` over seeds."""
    return {
        condition: {metric: mean_sd([net[metric] for net in nets]) for metric in METRICS}
        for condition, nets in results.items()
    }


def plot(results: dict[str, list[dict[str, Any]]], settings: Settings, prefix: Path) -> list[Path]:
    """Box + strip plots of concentration per condition, and one net's modes per condition."""
    plt = pyplot()
    k = settings.top_k
    panels = [
        ("gini", "Gini of |φ| over units"),
        ("top_share", f"share of top {k} units"),
        ("lesion_top_share", f"function lost, top-{k} lesioned"),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(11, 3.6), constrained_layout=True)
    for ax, (metric, title) in zip(axes, panels, strict=True):
        data = [[net[metric] for net in results[c]] for c in CONDITIONS]
        ax.boxplot(data, showfliers=False)
        ax.set_xticks(range(1, len(CONDITIONS) + 1), list(CONDITIONS))
        for i, xs in enumerate(data, start=1):
            jitter = torch.linspace(-0.12, 0.12, len(xs)).tolist()
            ax.scatter([i + j for j in jitter], xs, s=14, color="tab:red", zorder=3)
        ax.set_title(title)
    axes[0].set_ylabel(f"{settings.seeds} seeds per condition")
    fig.suptitle(f"Concentration of hidden-unit contributions ({settings.hidden} units, digits)")
    paths = [save_figure(fig, f"{prefix}.png")]

    fig, axes = plt.subplots(1, len(CONDITIONS), figsize=(11, 3.8), constrained_layout=True)
    limit = max(float(results[c][0]["modes"].abs().max()) for c in CONDITIONS)
    image = None
    for ax, condition in zip(axes, CONDITIONS, strict=True):
        net = results[condition][0]
        order = net["contribution"].argsort(descending=True, stable=True)
        image = ax.imshow(
            net["modes"][order].T.numpy(),
            cmap="RdBu_r",
            vmin=-limit,
            vmax=limit,
            aspect="auto",
            interpolation="nearest",
        )
        ax.set_title(f"{condition}: Gini {net['gini']:.2f}")
        ax.set_xlabel("hidden unit (sorted by contribution)")
        ax.set_yticks(range(10))
    axes[0].set_ylabel("digit class")
    assert image is not None
    fig.colorbar(image, ax=axes.tolist(), label="φ (log-probability of the true class)")
    fig.suptitle("Shapley modes of the hidden units (first seed of each condition)")
    paths.append(save_figure(fig, f"{prefix}_modes.png"))
    return paths


def main() -> None:
    args = example_args(__doc__, "3 seeds, 16 units, small budget", "mlp_hubs")
    settings = QUICK if args.quick else Settings()
    started = time.perf_counter()
    results = run(settings, args.seed)
    table = summary(results)
    paths = plot(results, settings, args.prefix)
    seconds = time.perf_counter() - started
    print(
        f"{settings.hidden} hidden units, {settings.seeds} seeds per condition, kernel "
        f"budget {settings.budget}; mean ± sd over seeds\n"
    )
    headers = " | ".join(h.format(k=settings.top_k) for h in METRICS.values())
    print(f"| condition | {headers} |\n|---|" + "---:|" * len(METRICS))
    for condition in CONDITIONS:
        cells = " | ".join(f"{m:.3g} ± {s:.2g}" for m, s in table[condition].values())
        print(f"| {condition} | {cells} |")
    print(f"\n{seconds:.0f} s; figures {', '.join(str(p) for p in paths)}")
    payload = {
        "settings": dataclasses.asdict(settings),
        "first_seed": args.seed,
        "seconds": round(seconds, 1),
        "summary": table,
        "nets": plain(results, drop={"modes"}),
        "modes_first_seed": {c: plain(nets[0]["modes"]) for c, nets in results.items()},
    }
    write_json(f"{args.prefix}.json", payload)


if __name__ == "__main__":
    main()
