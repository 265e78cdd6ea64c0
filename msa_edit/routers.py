"""How each MoE family's router picks its top-k experts and their weights, with some experts gone.

One `Router` per routing scheme; `units.ARCHITECTURES` names the scheme each family uses. A
router's `route` is what the `reroute` lesion runs: the model's own selection with the dropped
experts' logits at -inf, which equals the model with those experts sliced out of the router and
expert weights (checked per family in the editor tests). `scores` is the per-expert gate score
REAP weighs expert outputs by.

- `softmax_top_k` (Mixtral, Qwen2/3-MoE, OLMoE): softmax over the experts, top-k, optionally
  renormalised to sum 1;
- `sigmoid_group_top_k` (DeepSeek-V3, GLM-4 MoE): sigmoid scores plus a correction bias choose
  `topk_group` of `n_group` expert groups by each group's two best scores, then the top-k inside
  them; the weights are the uncorrected scores, optionally renormalised, times
  `routed_scaling_factor`. Removing experts keeps the groups' shape only when every group loses
  the same number (`Router.groups`);
- `top_k_softmax` (gpt-oss): top-k of the logits (a linear layer with bias), softmax over those k.

>>> ROUTERS["sigmoid_group_top_k"].name
'sigmoid_group_top_k'
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

Selection = tuple[torch.Tensor, torch.Tensor]
"""(weights `[N, k]`, expert index `[N, k]`) as the family's router returns them."""


@dataclass(frozen=True)
class RouterFlags:
    """The per-family switches a router reads from the architecture table."""

    renormalize: bool = True
    keep_dtype: bool = True


@dataclass(frozen=True)
class Router:
    """One routing scheme: `route(gate, hidden [N, H], dropped bool [N, E], flags) -> Selection`,
    `scores(logits [N, E]) -> float32 [N, E]`, and the config key of its expert-group count."""

    name: str
    route: Callable[[nn.Module, torch.Tensor, torch.Tensor, RouterFlags], Selection]
    scores: Callable[[torch.Tensor], torch.Tensor]
    groups: str | None = None


def _weight(gate: nn.Module) -> torch.Tensor:
    return cast(torch.Tensor, gate.weight)


def _softmax_top_k(
    gate: nn.Module, hidden: torch.Tensor, dropped: torch.Tensor, flags: RouterFlags
) -> Selection:
    logits = F.linear(hidden, _weight(gate))
    probs = F.softmax(logits.masked_fill(dropped, float("-inf")).float(), dim=-1)
    top, index = torch.topk(probs, cast(int, gate.top_k), dim=-1)
    if flags.renormalize:
        total = top.sum(dim=-1, keepdim=True)
        top = top / torch.where(total > 0, total, torch.ones_like(total))
    top = torch.where(dropped.all(-1, keepdim=True), torch.zeros_like(top), top)
    return (top.to(logits.dtype) if flags.keep_dtype else top), index


def _sigmoid_group_top_k(
    gate: nn.Module, hidden: torch.Tensor, dropped: torch.Tensor, flags: RouterFlags
) -> Selection:
    g: Any = gate
    logits = F.linear(hidden.float(), _weight(gate).float())
    scores = logits.sigmoid()
    choice = (scores + g.e_score_correction_bias).masked_fill(dropped, float("-inf"))
    n_group = int(g.num_group)
    grouped = choice.view(-1, n_group, choice.shape[-1] // n_group)
    group_scores = grouped.topk(2, dim=-1)[0].sum(dim=-1)
    chosen = torch.topk(group_scores, k=int(g.topk_group), dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores).scatter_(1, chosen, 1.0).bool()
    keep = group_mask.unsqueeze(-1).expand_as(grouped).reshape(choice.shape)
    choice = choice.masked_fill(~keep, float("-inf"))
    index = torch.topk(choice, int(g.top_k), dim=-1)[1]
    weights = scores.gather(1, index) * choice.gather(1, index).isfinite()  # too few left: 0
    if bool(g.norm_topk_prob):
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * float(g.routed_scaling_factor), index


def _top_k_softmax(
    gate: nn.Module, hidden: torch.Tensor, dropped: torch.Tensor, flags: RouterFlags
) -> Selection:
    logits = F.linear(hidden, _weight(gate), cast(torch.Tensor | None, gate.bias))
    top_k = cast(int, gate.top_k)
    top, index = torch.topk(logits.masked_fill(dropped, float("-inf")), top_k, dim=-1)
    weights = F.softmax(top, dim=1, dtype=top.dtype)
    return torch.where(dropped.all(-1, keepdim=True), torch.zeros_like(weights), weights), index


def _softmax_scores(logits: torch.Tensor) -> torch.Tensor:
    return F.softmax(logits.float(), dim=-1)


def _sigmoid_scores(logits: torch.Tensor) -> torch.Tensor:
    return logits.float().sigmoid()


ROUTERS: dict[str, Router] = {
    r.name: r
    for r in (
        Router("softmax_top_k", _softmax_top_k, _softmax_scores),
        Router("sigmoid_group_top_k", _sigmoid_group_top_k, _sigmoid_scores, groups="n_group"),
        Router("top_k_softmax", _top_k_softmax, _softmax_scores),
    )
}
