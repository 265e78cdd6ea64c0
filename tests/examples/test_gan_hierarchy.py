"""The GAN-hierarchy example: channel modes follow the channels they belong to, and on a reduced
run (~15 s) training makes the lowest-resolution layer's modes more localised than both its
untrained self and the full-resolution layer's modes. The full run is
`python evals/gan_hierarchy.py`.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from gan_hierarchy import (
    LAYERS,
    Settings,
    analyse,
    digit_images,
    latents,
    layer_modes,
    train_gan,
)
from torch import nn

pytest.importorskip("sklearn")


def permute_channels(gen: nn.Sequential, layer: int, perm: torch.Tensor) -> nn.Sequential:
    """The same generator with hidden layer `layer`'s channels reordered: new channel i is old
    channel perm[i] (its transposed convolution's outputs, its BatchNorm, the next layer's
    inputs)."""
    out = copy.deepcopy(gen)
    conv, norm, _ = out[layer]
    nxt = out[layer + 1][0] if isinstance(out[layer + 1], nn.Sequential) else out[layer + 1]
    with torch.no_grad():
        conv.weight.copy_(conv.weight[:, perm])  # ConvTranspose2d weight: [in, out, kh, kw]
        for t in (norm.weight, norm.bias, norm.running_mean, norm.running_var):
            t.copy_(t[perm])
        nxt.weight.copy_(nxt.weight[perm])
    return out


def test_permuting_a_layers_channels_permutes_its_modes_exactly() -> None:
    settings = Settings(widths=(8, 6, 4), steps=30, n_latents=16)
    gen = train_gan(digit_images(), settings, seed=0)  # a few steps: non-trivial BatchNorm stats
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    permuted = permute_channels(gen, 1, perm)
    z = latents(settings)
    with torch.inference_mode():
        torch.testing.assert_close(permuted(z), gen(z), rtol=0, atol=1e-6)
    for layer in LAYERS:
        before = layer_modes(gen, layer, z, None, seed=0)  # exact: <= 8 players
        after = layer_modes(permuted, layer, z, None, seed=0)
        assert before.method == "exact"
        expected = before.values[perm] if layer == "layer1" else before.values
        torch.testing.assert_close(after.values, expected, rtol=0, atol=1e-6)
        assert float(before.values.abs().max()) > 1e-3  # the modes are not trivially zero
        if layer == "layer1":  # the channels' modes differ, so the check above is not vacuous
            assert (after.values - before.values).abs().max() > 1e-3


def test_training_localises_the_low_resolution_layers_modes() -> None:
    """Would fail if the localisation ordering came from the architecture alone (the untrained
    generator's layers are all about equally global) or from estimation noise."""
    settings = Settings(widths=(32, 16, 8), steps=400, budget=256, n_latents=32)
    images = digit_images()
    trained = analyse(train_gan(images, settings, seed=0), settings, seed=0)
    untrained_gen = train_gan(images, dataclasses.replace(settings, steps=0), seed=0)
    untrained = analyse(untrained_gen, settings, seed=0)
    assert trained["layer0"]["entropy"] < untrained["layer0"]["entropy"] - 0.02
    assert trained["layer0"]["entropy"] < trained["layer2"]["entropy"] - 0.01
    assert trained["layer0"]["participation"] < trained["layer2"]["participation"] - 0.03
    for layer in LAYERS:  # every layer still matters for the image
        assert float(trained[layer]["modes"].abs().sum()) > 1.0
