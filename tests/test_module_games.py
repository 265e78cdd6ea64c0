"""ChannelGame: a lesioned channel is the model with that channel's weights cut, per coalition row,
with no hook left behind; Shapley modes of a game linear in its channels are known exactly."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from msa_edit.errors import MsaEditError
from msa_edit.module_games import ChannelGame
from msa_edit.shapley import estimate

GEN = torch.Generator().manual_seed(0)


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).eval()


def generator() -> nn.Sequential:
    """DCGAN-style: latent [N, 4, 1, 1] -> 2x2 -> 4x4 image, BatchNorm with non-trivial stats."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Sequential(nn.ConvTranspose2d(4, 6, 2), nn.BatchNorm2d(6), nn.ReLU()),
        nn.Sequential(nn.ConvTranspose2d(6, 3, 4, 2, 1), nn.BatchNorm2d(3), nn.ReLU()),
        nn.ConvTranspose2d(3, 1, 3, 1, 1),
        nn.Tanh(),
    )
    for bn in (net[0][1], net[1][1]):
        bn.running_mean.uniform_(-0.5, 0.5, generator=GEN)
        bn.running_var.uniform_(0.5, 2.0, generator=GEN)
    return net.eval()


X = torch.randn(7, 6, generator=GEN)
Z = torch.randn(5, 4, 1, 1, generator=GEN)
MASKS = torch.tensor([[1, 1, 1, 1, 1], [0, 1, 1, 0, 1], [0, 0, 0, 0, 0], [1, 0, 1, 0, 0]]).bool()


def test_zeroed_unit_equals_zeroed_weights_per_coalition_row() -> None:
    net = mlp()
    game = ChannelGame(net, {"hidden": net[1]}, X, lambda out: out.mean(0), max_rows=2 * len(X))
    assert game.n_players == 5 and game.names[-1] == "hidden.4"
    values = game(MASKS)  # two coalitions per forward: rows of different coalitions must not mix
    assert values.shape == (4, 3) and values.dtype == torch.float64
    for mask, value in zip(MASKS, values, strict=True):
        edited = copy.deepcopy(net)
        with torch.no_grad():
            edited[0].weight[~mask] = 0
            edited[0].bias[~mask] = 0
        torch.testing.assert_close(value, edited(X).mean(0).double(), rtol=0, atol=1e-6)
    assert not net[1]._forward_hooks  # no hook left after the call


def test_conv_channel_lesion_equals_cutting_the_next_layers_input_weights() -> None:
    net = generator()
    blocks = {"block0": net[0], "block1": net[1]}
    game = ChannelGame(net, blocks, Z, lambda out: out.mean(0)[0])  # mean image [4, 4]
    assert game.channels == {"block0": 6, "block1": 3}
    mask = torch.ones(1, 9, dtype=torch.bool)
    mask[0, [1, 4, 7]] = False  # block0 channels 1 and 4, block1 channel 1
    edited = copy.deepcopy(net)
    with torch.no_grad():
        edited[1][0].weight[[1, 4]] = 0  # ConvTranspose2d weight: [in, out, kh, kw]
        edited[2].weight[1] = 0
    torch.testing.assert_close(game(mask)[0], edited(Z).mean(0)[0].double(), rtol=0, atol=1e-6)


def test_mean_lesion_replaces_a_unit_by_its_mean_over_the_inputs() -> None:
    net = mlp()
    game = ChannelGame(net, {"hidden": net[1]}, X, lambda out: out[:, 0], lesion="mean")
    hidden = net[1](net[0](X)).detach()
    hidden[:, 2] = hidden[:, 2].mean()
    mask = torch.tensor([[True, True, False, True, True]])
    torch.testing.assert_close(game(mask)[0], net[2](hidden)[:, 0].double(), rtol=0, atol=1e-6)


def test_modes_of_a_game_linear_in_its_units_are_exact() -> None:
    """Without the output nonlinearity, unit c adds W2[:, c] * h_c to every output."""
    net = mlp()
    game = ChannelGame(net, {"hidden": net[1]}, X, lambda out: out.mean(0))
    res = estimate(game, game.n_players, method="exact", progress=False)
    hidden = net[1](net[0](X)).detach().mean(0)
    expected = (net[2].weight.detach() * hidden).T  # [units, outputs]
    torch.testing.assert_close(res.values, expected.double(), rtol=0, atol=1e-6)


def test_no_hook_is_left_when_the_readout_raises() -> None:
    net = mlp()

    def broken(out: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("readout failed")

    game = ChannelGame(net, {"hidden": net[1]}, X, broken)
    with pytest.raises(RuntimeError, match="readout failed"):
        game(MASKS)
    assert not net[1]._forward_hooks
    assert torch.equal(net(X), mlp()(X))


def test_refuses_what_it_cannot_lesion() -> None:
    net = mlp()
    with pytest.raises(MsaEditError, match="not a submodule"):
        ChannelGame(net, {"other": nn.ReLU()}, X, lambda out: out.mean(0))
    with pytest.raises(MsaEditError, match="unknown channel lesion"):
        ChannelGame(net, {"hidden": net[1]}, X, lambda out: out.mean(0), lesion="reroute")  # type: ignore[arg-type]
    game = ChannelGame(net, {"hidden": net[1]}, X, lambda out: out.mean(0))
    with pytest.raises(MsaEditError, match=r"bool tensor \[B, 5\]"):
        game(torch.ones(2, 4, dtype=torch.bool))
    net.train()
    with pytest.raises(MsaEditError, match="eval"):
        game(MASKS)


class Twice(nn.Module):
    """Stacks its input twice: its output's dim 0 is not the input's rows."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, x])


def test_refuses_a_module_whose_rows_are_not_the_inputs_rows() -> None:
    twice = Twice()
    net = nn.Sequential(nn.Linear(6, 4), twice).eval()
    game = ChannelGame(net, {"twice": twice}, X, lambda out: out.mean(0))
    with pytest.raises(MsaEditError, match="dim 0 is the input's rows"):
        game(torch.zeros(1, 4, dtype=torch.bool))
    assert not twice._forward_hooks
