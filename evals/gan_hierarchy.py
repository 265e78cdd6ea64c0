"""GAN pixel hierarchy: how spatially localised are each generator layer's channel contributions?

A DCGAN-style generator (latent 16 -> transposed convolutions to 2x2x64, 4x4x32, 8x8x16 ->
8x8 image) is trained adversarially on scikit-learn's bundled 8x8 digits. For each of its three
hidden layers separately, the players are that layer's channels (lesion = the channel's output,
after BatchNorm and ReLU, set to 0; `msa_edit.module_games.ChannelGame`) and the value is the mean
generated image over 64 fixed latents, so every channel's Shapley mode is an 8x8 map. How local a
mode is: the normalised entropy of |φ| over the 64 pixels (1 = spread evenly over the image),
the participation ratio (share of pixels it effectively touches) and the spatial spread (RMS
distance of |φ| from its centroid, in pixels; 3.24 for a uniform map). Layer summaries weight
each channel by its total |φ|, so silent channels do not count.

The same analysis of the untrained generator (same seed) is the control: what the architecture
alone gives, before any learning.

Writes evals/results/gan_hierarchy.{json,png}, gan_hierarchy_modes.png and the first trained
generator's modes (gan_hierarchy_modes.safetensors). From the repository root:

    python evals/gan_hierarchy.py            # 3 generators, 2.5-4 min on 2 cores
    python evals/gan_hierarchy.py --quick    # 1 generator, 500 steps, ~25 s
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from examplelib import digits, example_args, mean_sd, plain, pyplot
from safetensors.torch import save_file
from torch import nn

from msa_edit.atomic import write_json
from msa_edit.evaluate.plots import save_figure
from msa_edit.module_games import ChannelGame
from msa_edit.shapley import ShapleyResult, estimate

LAYERS = ("layer0", "layer1", "layer2")
UNIFORM_SPREAD = math.sqrt(2 * (8 * 8 - 1) / 12)
"""Spatial spread of a map spread evenly over 8x8 pixels."""


@dataclass(frozen=True)
class Settings:
    """One experiment: generator widths, training steps, generators, and the Shapley budget."""

    latent: int = 16
    widths: tuple[int, int, int] = (64, 32, 16)
    steps: int = 1500
    generators: int = 3
    budget: int = 1024
    n_latents: int = 64


QUICK = Settings(steps=500, generators=1, budget=512)


def digit_images() -> torch.Tensor:
    """The digits as images `[N, 1, 8, 8]` scaled to [-1, 1] (background -1, ink up to 1)."""
    return digits()[0][:, None] * 2 - 1


def _up(c_in: int, c_out: int, kernel: int, stride: int, padding: int) -> nn.Sequential:
    return nn.Sequential(
        nn.ConvTranspose2d(c_in, c_out, kernel, stride, padding, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(),
    )


def generator(settings: Settings) -> nn.Sequential:
    """Latent `[N, latent, 1, 1]` -> `layer0` (2x2) -> `layer1` (4x4) -> `layer2` (8x8) -> image
    `[N, 1, 8, 8]` in [-1, 1]; each hidden layer is ConvTranspose2d + BatchNorm + ReLU."""
    w0, w1, w2 = settings.widths
    return nn.Sequential(
        _up(settings.latent, w0, 2, 1, 0),
        _up(w0, w1, 4, 2, 1),
        _up(w1, w2, 4, 2, 1),
        nn.ConvTranspose2d(w2, 1, 3, 1, 1),
        nn.Tanh(),
    )


def discriminator() -> nn.Sequential:
    """Image `[N, 1, 8, 8]` -> real/fake logit `[N, 1]`."""
    return nn.Sequential(
        nn.Conv2d(1, 32, 4, 2, 1),
        nn.LeakyReLU(0.2),
        nn.Conv2d(32, 64, 4, 2, 1),
        nn.BatchNorm2d(64),
        nn.LeakyReLU(0.2),
        nn.Conv2d(64, 1, 2),
        nn.Flatten(),
    )


def layers(gen: nn.Sequential) -> dict[str, nn.Module]:
    """The generator's hidden layers by name (their outputs are the players' channels)."""
    return {name: gen[i] for i, name in enumerate(LAYERS)}


def train_gan(images: torch.Tensor, settings: Settings, seed: int) -> nn.Sequential:
    """A generator trained for `settings.steps` steps (batches of 64, non-saturating loss, Adam
    2e-4, betas 0.5/0.999) against `discriminator()`; returned in eval mode. Same seed, same
    weights. `steps=0` gives the untrained generator."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        gen, disc = generator(settings), discriminator()
    rng = torch.Generator().manual_seed(seed)
    opt_g = torch.optim.Adam(gen.parameters(), 2e-4, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(disc.parameters(), 2e-4, betas=(0.5, 0.999))
    bce = nn.functional.binary_cross_entropy_with_logits
    ones, zeros = torch.ones(64, 1), torch.zeros(64, 1)
    for _ in range(settings.steps):
        real = images[torch.randint(len(images), (64,), generator=rng)]
        fake = gen(torch.randn(64, settings.latent, 1, 1, generator=rng))
        loss_d = bce(disc(real), ones) + bce(disc(fake.detach()), zeros)
        opt_d.zero_grad()
        loss_d.backward()
        opt_d.step()
        loss_g = bce(disc(fake), ones)
        opt_g.zero_grad()
        loss_g.backward()
        opt_g.step()
    return gen.eval()


def latents(settings: Settings, seed: int = 1234) -> torch.Tensor:
    """The fixed latents `[n_latents, latent, 1, 1]` the value averages over."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(settings.n_latents, settings.latent, 1, 1, generator=gen)


def mean_image(out: torch.Tensor) -> torch.Tensor:
    """Readout: the mean generated image `[8, 8]` of one coalition's images `[N, 1, 8, 8]`."""
    return out.mean(0)[0]


def layer_modes(
    gen: nn.Sequential, layer: str, z: torch.Tensor, budget: int | None, seed: int
) -> ShapleyResult:
    """Shapley modes `[channels, 8, 8]` of one layer's channels for the mean image over `z`
    (exact when 2^channels fits the budget, else paired kernel regression)."""
    game = ChannelGame(gen, {layer: layers(gen)[layer]}, z, mean_image)
    return estimate(game, game.n_players, budget=budget, seed=seed, progress=False)


def localisation(modes: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per mode `[C, H, W]`: total |φ| (`strength`), normalised entropy of |φ| over pixels
    (1 = even), participation ratio (share of pixels effectively involved) and spatial spread
    (RMS distance from the |φ|-weighted centroid, pixels).

    >>> spot = torch.zeros(8, 8)
    >>> spot[3, 4] = -2.0
    >>> loc = localisation(torch.stack([torch.ones(8, 8), spot]))
    >>> {k: [round(x, 3) for x in v.tolist()] for k, v in loc.items() if k != "strength"}
    {'entropy': [1.0, 0.0], 'participation': [1.0, 0.016], 'spread': [3.24, 0.0]}
    """
    c, h, w = modes.shape
    mass = modes.abs().double().reshape(c, h * w)
    strength = mass.sum(1)
    p = mass / strength.clamp_min(1e-300)[:, None]
    entropy = (p * p.clamp_min(1e-300).reciprocal().log()).sum(1) / math.log(h * w)
    participation = strength**2 / (mass.square().sum(1).clamp_min(1e-300) * h * w)
    rows, cols = torch.meshgrid(
        torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij"
    )
    rows, cols = rows.flatten(), cols.flatten()
    centre_r, centre_c = p @ rows, p @ cols
    spread = (p * ((rows - centre_r[:, None]) ** 2 + (cols - centre_c[:, None]) ** 2)).sum(1)
    return {
        "strength": strength,
        "entropy": entropy,
        "participation": participation,
        "spread": spread.sqrt(),
    }


MEASURES = ("entropy", "participation", "spread")


def summarise_layer(modes: torch.Tensor) -> dict[str, float]:
    """Strength-weighted mean of each localisation measure over one layer's channels."""
    loc = localisation(modes)
    weight = loc["strength"] / loc["strength"].sum()
    return {m: float(weight @ loc[m]) for m in MEASURES}


def analyse(gen: nn.Sequential, settings: Settings, seed: int) -> dict[str, Any]:
    """Modes and localisation of every hidden layer of `gen`."""
    z = latents(settings)
    out: dict[str, Any] = {}
    for layer in LAYERS:
        res = layer_modes(gen, layer, z, settings.budget, seed)
        out[layer] = {
            "modes": res.values,
            "stderr_max": float(res.stderr.max()),
            "n_evaluations": res.n_evaluations,
            **summarise_layer(res.values),
        }
    return out


def run(
    settings: Settings, first_seed: int = 0
) -> tuple[dict[str, list[dict[str, Any]]], torch.Tensor]:
    """Trained and untrained (control) generators, seeds `first_seed`, ..., analysed; and the
    first trained generator's images of the fixed latents `[n_latents, 1, 8, 8]`."""
    images = digit_images()
    untrained = dataclasses.replace(settings, steps=0)
    out: dict[str, list[dict[str, Any]]] = {"trained": [], "untrained": []}
    samples = torch.empty(0)
    for seed in range(first_seed, first_seed + settings.generators):
        gen = train_gan(images, settings, seed)
        if seed == first_seed:
            with torch.inference_mode():
                samples = gen(latents(settings))
        out["trained"].append(analyse(gen, settings, seed))
        out["untrained"].append(analyse(train_gan(images, untrained, seed), settings, seed))
    return out, samples


def summary(
    results: dict[str, list[dict[str, Any]]],
) -> dict[str, dict[str, dict[str, list[float]]]]:
    """Per condition, layer and measure: `[mean, sd]` over generators."""
    return {
        condition: {
            layer: {m: mean_sd([gen[layer][m] for gen in gens]) for m in MEASURES}
            for layer in LAYERS
        }
        for condition, gens in results.items()
    }


def plot(
    results: dict[str, list[dict[str, Any]]],
    samples: torch.Tensor,
    settings: Settings,
    prefix: Path,
    columns: int = 12,
) -> list[Path]:
    """Generated samples and localisation per layer (trained vs untrained), and the strongest
    channels' modes of each layer of the first trained generator."""
    plt = pyplot()
    fig = plt.figure(figsize=(12, 3.8), constrained_layout=True)
    grid = fig.add_gridspec(1, 3, width_ratios=[1.1, 1, 1])
    padded = nn.functional.pad(samples[:16, 0], (1, 1, 1, 1), value=-1.0)  # background border
    tiles = padded.reshape(4, 4, 10, 10).permute(0, 2, 1, 3).reshape(40, 40)
    ax = fig.add_subplot(grid[0])
    ax.imshow(tiles.numpy(), cmap="gray_r", vmin=-1, vmax=1)
    ax.set_title(f"generated ({settings.steps} steps)")
    ax.axis("off")
    xs = range(len(LAYERS))
    labels = [
        f"{name}\n{2 << i}x{2 << i}x{w}"
        for i, (name, w) in enumerate(zip(LAYERS, settings.widths, strict=True))
    ]
    for panel, (measure, title) in enumerate(
        (("entropy", "normalised entropy of |φ|"), ("participation", "share of pixels involved"))
    ):
        ax = fig.add_subplot(grid[panel + 1])
        for condition, style in (("trained", "-o"), ("untrained", "--s")):
            colour = "tab:red" if condition == "trained" else "tab:grey"
            for i, gen in enumerate(results[condition]):
                ax.plot(
                    xs,
                    [gen[layer][measure] for layer in LAYERS],
                    style,
                    color=colour,
                    alpha=0.8,
                    label=condition if i == 0 else None,
                )
        ax.set_xticks(list(xs), labels)
        ax.set_title(f"{title} (1 = global)")
        ax.legend(fontsize="small")
    paths = [save_figure(fig, f"{prefix}.png")]

    first = results["trained"][0]
    fig, axes = plt.subplots(
        len(LAYERS),
        columns,
        figsize=(1.0 * columns + 1.2, 1.15 * len(LAYERS) + 0.6),
        constrained_layout=True,
    )
    for row, layer in enumerate(LAYERS):
        modes = first[layer]["modes"]
        order = localisation(modes)["strength"].argsort(descending=True, stable=True)
        limit = float(modes.abs().max())
        for col, ax in enumerate(axes[row]):
            ax.set_xticks([])
            ax.set_yticks([])
            if col < len(order):
                ax.imshow(modes[order[col]].numpy(), cmap="RdBu_r", vmin=-limit, vmax=limit)
        axes[row][0].set_ylabel(f"{layer}\nH={first[layer]['entropy']:.2f}")
    fig.suptitle(
        f"Shapley modes of each layer's {columns} strongest channels on the mean image "
        "(red = more ink; one colour scale per row)"
    )
    paths.append(save_figure(fig, f"{prefix}_modes.png"))
    return paths


def main() -> None:
    args = example_args(__doc__, "1 generator, 500 steps, budget 512", "gan_hierarchy")
    settings = QUICK if args.quick else Settings()
    started = time.perf_counter()
    results, samples = run(settings, args.seed)
    table = summary(results)
    paths = plot(results, samples, settings, args.prefix)
    seconds = time.perf_counter() - started
    print(
        f"{settings.generators} generator(s), {settings.steps} training steps, kernel budget "
        f"{settings.budget} per layer; strength-weighted mean over channels, mean ± sd over "
        f"generators (uniform map: entropy 1, participation 1, spread {UNIFORM_SPREAD:.2f})\n"
    )
    print("| generator | layer | entropy | participation | spread (px) |\n|---|---|---:|---:|---:|")
    for condition, layers_ in table.items():
        for layer, cells in layers_.items():
            values = " | ".join(f"{m:.3f} ± {s:.3f}" for m, s in cells.values())
            print(f"| {condition} | {layer} | {values} |")
    print(f"\n{seconds:.0f} s; figures {', '.join(str(p) for p in paths)}")
    payload = {
        "settings": dataclasses.asdict(settings),
        "first_seed": args.seed,
        "seconds": round(seconds, 1),
        "summary": table,
        "generators": plain(results, drop={"modes"}),
        "modes": f"{args.prefix.name}_modes.safetensors: first trained generator, per layer",
    }
    write_json(f"{args.prefix}.json", payload)
    first = {layer: result["modes"].contiguous() for layer, result in results["trained"][0].items()}
    save_file(first, f"{args.prefix}_modes.safetensors")


if __name__ == "__main__":
    main()
