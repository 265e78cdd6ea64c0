"""Batched games with known structure: classic cooperative games and a small trained MLP.

The classic games have closed-form Shapley values (tests check the estimators against them); the MLP
game is model-like (hidden units as players, lesion = unit output zeroed) and is used by the
estimator benchmark and the `msa-edit example` command.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from msa_edit.shapley.cache import Game


def glove_game(n_left: int, n_right: int) -> Game:
    """v(S) = number of matched pairs: min(left gloves in S, right gloves in S); left players first.

    >>> glove_game(1, 2)(torch.tensor([[True, False, True]])).tolist()
    [1.0]
    """

    def game(c: torch.Tensor) -> torch.Tensor:
        left = c[:, :n_left].sum(1)
        right = c[:, n_left : n_left + n_right].sum(1)
        return torch.minimum(left, right).double()

    return game


def airport_game(costs: Sequence[float]) -> Game:
    """v(S) = max cost of a player in S (the runway S needs); 0 for the empty coalition."""
    cost = torch.tensor(list(costs), dtype=torch.float64)

    def game(c: torch.Tensor) -> torch.Tensor:
        return torch.where(c, cost, torch.zeros_like(cost)).amax(1)

    return game


def weighted_majority_game(weights: Sequence[float], quota: float) -> Game:
    """v(S) = 1 if the weights in S reach the quota, else 0."""
    w = torch.tensor(list(weights), dtype=torch.float64)

    def game(c: torch.Tensor) -> torch.Tensor:
        return ((c.double() @ w) >= quota).double()

    return game


def unanimity_game(carriers: Sequence[Sequence[int]], coefficients: torch.Tensor) -> Game:
    """v(S) = sum over carriers T contained in S of coefficients[T]; coefficients `[T, *shape]`
    make a vector-valued game (its Shapley modes are sums of coefficient tensors)."""
    coef = coefficients.double()
    members = [torch.tensor(list(t), dtype=torch.long) for t in carriers]

    def game(c: torch.Tensor) -> torch.Tensor:
        present = torch.stack([c[:, t].all(1) for t in members], 1).double()  # [B, T]
        return (present @ coef.reshape(len(members), -1)).reshape(c.shape[0], *coef.shape[1:])

    return game


def layered_game(n_layers: int = 20, width: int = 10, seed: int = 0) -> tuple[Game, torch.Tensor]:
    """A model-like unanimity game and its exact Shapley values `[n]`: `n_layers` x `width`
    players, 3n random carriers of 1-3 players inside one layer each with standard-normal
    weights — strong interactions within a layer, none across.

    >>> game, values = layered_game(n_layers=2, width=3)
    >>> everyone = torch.ones(1, 6, dtype=torch.bool)
    >>> bool(torch.isclose(game(everyone)[0] - game(~everyone)[0], values.sum()))
    True
    """
    g = torch.Generator().manual_seed(seed)
    n = n_layers * width
    carriers = []
    for _ in range(3 * n):
        layer = int(torch.randint(0, n_layers, (1,), generator=g))
        size = int(torch.randint(1, 4, (1,), generator=g))
        drawn = layer * width + torch.randint(0, width, (size,), generator=g)
        carriers.append(sorted(set(drawn.tolist())))
    coefficients = torch.randn(len(carriers), generator=g, dtype=torch.float64)
    values = torch.zeros(n, dtype=torch.float64)
    for members, a in zip(carriers, coefficients, strict=True):
        values[members] += a / len(members)
    return unanimity_game(carriers, coefficients), values


def mlp_game(n_hidden: int = 10, seed: int = 0, per_class: bool = False) -> Game:
    """A one-hidden-layer MLP trained (deterministically) on a synthetic 3-class task.

    Players are its hidden units; a lesioned unit outputs 0. The value is the mean log-likelihood
    of the true class on 512 points (scalar), or its mean per true class (`per_class`: shape [3]).
    """
    hidden, w2, b2, onehot = _trained_mlp(n_hidden, seed)

    def game(c: torch.Tensor) -> torch.Tensor:
        logits = torch.einsum("ph,bh,hk->bpk", hidden, c.double(), w2) + b2
        loglik = (logits.log_softmax(-1) * onehot).sum(-1)  # [B, P]
        if not per_class:
            return loglik.mean(1)
        return (loglik @ onehot) / onehot.sum(0)

    return game


@functools.lru_cache(maxsize=16)
def _trained_mlp(
    n_hidden: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hidden activations [512, H], output layer and one-hot labels of the trained MLP (cached)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(512, 6, generator=gen, dtype=torch.float64)
    teacher = torch.randn(6, 3, generator=gen, dtype=torch.float64)
    y = (x @ teacher + torch.sin(2 * x) @ teacher.flip(0)).argmax(1)
    w1 = (torch.randn(6, n_hidden, generator=gen, dtype=torch.float64) / 6**0.5).requires_grad_()
    b1 = torch.zeros(n_hidden, dtype=torch.float64, requires_grad=True)
    w2 = (
        torch.randn(n_hidden, 3, generator=gen, dtype=torch.float64) / n_hidden**0.5
    ).requires_grad_()
    b2 = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([w1, b1, w2, b2], lr=0.05)
    for _ in range(300):
        opt.zero_grad()
        logits = torch.relu(x @ w1 + b1) @ w2 + b2
        torch.nn.functional.cross_entropy(logits, y).backward()
        opt.step()
    hidden = torch.relu(x @ w1 + b1).detach()  # [P, H]
    w2, b2 = w2.detach(), b2.detach()
    onehot = torch.nn.functional.one_hot(y, 3).double()  # [P, 3]
    return hidden, w2, b2, onehot
