"""What the router does on calibration text, per expert: the one-forward compression baselines.

- `frequency`: how many times the router picked the expert (top-k selections), as in the
  frequency-based expert pruning the MoE compression literature compares against;
- `reap`: REAP saliency (Lasby et al. 2025, "REAP the Experts"): the mean, over the tokens routed
  to the expert, of its gate value times the L2 norm of its own (unweighted) output. The gate is
  the router's full-softmax probability, as in the reference implementation — not the top-k
  weight renormalised over the chosen experts (sigmoid routers: the expert's sigmoid score;
  `routers.Router.scores`).

Both come from one pass of the intact model; the experts with the lowest scores are pruned first.
`gate="applied"` takes REAP's gate from the weight the model applies instead (the top-k weight,
renormalised where the family renormalises), for comparison with implementations that do.

>>> # stats = routing_stats(model, calibration_ids)
>>> # stats.reap[i] is the saliency of stats.units[i], e.g. Unit('layers.0.experts.3')
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from msa_edit.errors import MsaEditError
from msa_edit.lesions import run_hooked
from msa_edit.units import (
    Unit,
    architecture,
    decoder_layers,
    discover,
    moe_parts,
    n_experts,
    router,
)

SCORERS = ("reap", "frequency")
Gate = Literal["softmax", "applied"]


@dataclass(frozen=True)
class RoutingStats:
    """Per expert (`units`, canonical order): top-k selections and REAP saliency (float64)."""

    units: tuple[Unit, ...]
    frequency: torch.Tensor
    reap: torch.Tensor

    def score(self, name: str, units: list[Unit]) -> torch.Tensor:
        """Scores `[len(units)]` of `name` ("reap" or "frequency") for `units` (experts)."""
        if name not in SCORERS:
            raise MsaEditError(f"unknown routing score {name!r}; choose one of {SCORERS}")
        index = {u: i for i, u in enumerate(self.units)}
        missing = [str(u) for u in units if u not in index]
        if missing:
            raise MsaEditError(f"{missing[0]} is not an expert of this model; routing scores "
                               "exist for experts only")  # fmt: skip
        values = getattr(self, name)
        return values[torch.tensor([index[u] for u in units], dtype=torch.long)]


@torch.inference_mode()
def routing_stats(
    model: nn.Module, input_ids: torch.Tensor, batch_size: int = 8, gate: Gate = "softmax"
) -> RoutingStats:
    """Router selections and REAP saliency of every expert on `input_ids` `[N, T]`."""
    if gate not in ("softmax", "applied"):
        raise MsaEditError(f"unknown REAP gate {gate!r}; use 'softmax' (reference) or 'applied'")
    units = tuple(discover(model, ["experts"]))
    if not units:
        raise MsaEditError("the model has no MoE experts; routing scores need an MoE model")
    layers = sorted({u.layer for u in units})
    width = n_experts(model)
    count = torch.zeros(len(layers), width, dtype=torch.float64)
    reap = torch.zeros_like(count)
    logits: dict[int, torch.Tensor] = {}
    handles = []
    for row, layer_idx in enumerate(layers):
        router, experts = moe_parts(model, decoder_layers(model)[layer_idx])
        handles.append(router.register_forward_hook(_keep_logits(logits, row)))
        score = _score(model, logits, row, count, reap, gate)
        handles.append(experts.register_forward_pre_hook(score, with_kwargs=True))
    run_hooked(model, input_ids, handles, batch_size)
    saliency = reap / count.clamp_min(1)
    flat = {u: (layers.index(u.layer), u.index) for u in units}
    return RoutingStats(
        units,
        torch.stack([count[flat[u]] for u in units]),
        torch.stack([saliency[flat[u]] for u in units]),
    )


def _keep_logits(store: dict[int, torch.Tensor], row: int) -> Any:
    def hook(gate: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        store[row] = output[0]

    return hook


def _score(
    model: nn.Module,
    logits: dict[int, torch.Tensor],
    row: int,
    count: torch.Tensor,
    reap: torch.Tensor,
    gate: Gate,
) -> Any:
    names = architecture(model).expert_args
    scheme, _ = router(model)

    def pre(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        hidden, index, weights = [*args, *(kwargs[n] for n in names[len(args) :])][:3]
        probs = scheme.scores(logits.pop(row))
        for e in range(count.shape[1]):
            token, slot = torch.where(index == e)
            if token.numel() == 0:
                continue
            one = torch.full((token.numel(), 1), e, dtype=index.dtype, device=index.device)
            ones = torch.ones(token.numel(), 1, dtype=hidden.dtype, device=hidden.device)
            out = module.forward(hidden[token], one, ones)  # unweighted, and no hooks
            g = probs[token, e] if gate == "softmax" else weights[token, slot].float()
            count[row, e] += token.numel()
            reap[row, e] += (g * out.float().norm(dim=-1)).double().sum().cpu()

    return pre
