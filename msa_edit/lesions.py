"""Reversible lesions on a live model: `reroute`, `zero`, `mean`, `scale`, per batch row.

Lesions are forward hooks, never weight copies; they are removed when the `with` block ends,
even after an exception, so the model then computes exactly what it computed before.

- `reroute` (experts only): the expert's router logit is set to -inf before softmax/top-k, so tokens
  go to the remaining experts (top-k weights renormalised as the model does) — the same model as one
  with the expert sliced out of router and expert weights.
- `zero`: the unit's output is dropped (experts: top-k weight set to 0, routing unchanged).
- `mean`: the unit's output is replaced by its mean over a reference set (`unit_means`).
- `scale`: the unit's output is multiplied by alpha (zero is alpha = 0).

Batched: `Lesion.set_coalitions(mask)` takes `bool [R, n_units]` (True = intact); row r of every
batch that goes through the model uses coalition r. A single row applies to every batch row.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal, cast

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from msa_edit.errors import MsaEditError
from msa_edit.units import (
    UNIT_KINDS,
    Unit,
    architecture,
    decoder_layers,
    moe_parts,
    n_experts,
    router,
)

LesionKind = Literal["reroute", "zero", "mean", "scale"]


@dataclass(frozen=True)
class LesionRule:
    """What one lesion kind does to a lesioned unit's output."""

    routed_only: bool = False
    """Experts only: the router skips them (all-or-nothing factors)."""
    uses_means: bool = False
    """The lost output is replaced by the unit's mean output (`unit_means`)."""
    scales: bool = False
    """A lesioned unit keeps `alpha` times its output (else 0)."""


LESIONS: dict[str, LesionRule] = {
    "reroute": LesionRule(routed_only=True),
    "zero": LesionRule(),
    "mean": LesionRule(uses_means=True),
    "scale": LesionRule(scales=True),
}
LESION_KINDS = cast(tuple[LesionKind, ...], tuple(LESIONS))


@dataclass(frozen=True)
class _Site:
    """The units of one kind in one layer: their columns in the factor matrix and their indices."""

    layer: int
    kind: str
    columns: torch.Tensor
    indices: torch.Tensor
    size: int
    mean: torch.Tensor | None


class Lesion:
    """Hooks lesioning `units` per batch row; a context manager.

    >>> from msa_edit.units import Unit
    >>> # with Lesion(model, [Unit(0, "experts", 3)], "reroute") as lesion:
    >>> #     lesion.set_coalitions(torch.tensor([[True], [False]]))   # row 1 loses the expert
    >>> #     logits = model(input_ids_with_2_rows).logits
    """

    def __init__(
        self,
        model: nn.Module,
        units: Sequence[Unit],
        kind: LesionKind = "zero",
        *,
        alpha: float = 0.0,
        means: Mapping[Unit, torch.Tensor] | None = None,
    ) -> None:
        if kind not in LESION_KINDS:
            raise MsaEditError(f"unknown lesion {kind!r}; choose one of {', '.join(LESION_KINDS)}")
        if not units:
            raise MsaEditError("no units to lesion; pass at least one unit")
        rule = LESIONS[kind]
        if rule.routed_only and any(not u.spec.routed for u in units):
            other = next(u for u in units if not u.spec.routed)
            raise MsaEditError(
                f"lesion 'reroute' applies to experts only, got {other}; use 'zero' or 'mean'"
            )
        if rule.uses_means and (means is None or any(u not in means for u in units)):
            raise MsaEditError(
                "lesion 'mean' needs the units' mean outputs; compute them with "
                "msa_edit.lesions.unit_means(model, units, reference_input_ids)"
            )
        self.model = model
        self.units = list(units)
        self.kind = kind
        self.rule = rule
        self.alpha = alpha if rule.scales else 0.0
        self.factors = torch.zeros(1, len(self.units))
        self._sites = _sites(model, self.units, means if rule.uses_means else None)
        self._handles: list[RemovableHandle] = []
        self._pending: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    # -- what each row keeps --------------------------------------------------------------------
    def set_coalitions(self, coalitions: torch.Tensor) -> None:
        """Per-row coalitions `bool [R, n_units]`, True = intact (factor 1), else lesioned."""
        if coalitions.dtype != torch.bool or coalitions.dim() != 2:
            raise MsaEditError(f"coalitions must be a bool tensor [R, {len(self.units)}]")
        if coalitions.shape[1] != len(self.units):
            raise MsaEditError(
                f"coalitions have {coalitions.shape[1]} columns but the lesion has "
                f"{len(self.units)} units"
            )
        self.factors = torch.where(coalitions, 1.0, self.alpha).float()

    def set_factors(self, factors: torch.Tensor) -> None:
        """Per-row output factors `float [R, n_units]` (1 = intact, 0 = lesioned, else scaled)."""
        if factors.dim() != 2 or factors.shape[1] != len(self.units):
            raise MsaEditError(f"factors must be a float tensor [R, {len(self.units)}]")
        if self.rule.routed_only and not bool(((factors == 0) | (factors == 1)).all()):
            raise MsaEditError("reroute lesions are all-or-nothing: factors must be 0 or 1")
        self.factors = factors.float()

    # -- hooks ----------------------------------------------------------------------------------
    def __enter__(self) -> Lesion:
        try:
            for site in self._sites:
                self._install(site)
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def remove(self) -> None:
        """Remove every hook this lesion installed."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._pending.clear()

    def _install(self, site: _Site) -> None:
        kind = UNIT_KINDS[site.kind]
        layer = decoder_layers(self.model)[site.layer]
        if kind.segment is None:
            self._hook(layer.register_forward_hook(self._layer_hook(site), with_kwargs=True))
        elif not kind.routed:
            channels = kind.site(self.model, layer)
            self._hook(channels.register_forward_pre_hook(self._channel_hook(site)))
        else:
            gate, experts = moe_parts(self.model, layer)
            if self.rule.routed_only:
                self._hook(gate.register_forward_hook(self._reroute_hook(site)))
            else:
                pre, post = self._expert_hooks(site)
                self._hook(experts.register_forward_pre_hook(pre, with_kwargs=True))
                if site.mean is not None:
                    self._hook(experts.register_forward_hook(post, with_kwargs=True))

    def _hook(self, handle: RemovableHandle) -> None:
        self._handles.append(handle)

    def _row_factors(self, site: _Site, rows: int) -> torch.Tensor | None:
        """Factors `[rows, site.size]` for this site, or None when every row is intact."""
        own = self.factors[:, site.columns]
        if bool((own == 1).all()):
            return None
        if own.shape[0] not in (1, rows):
            raise MsaEditError(
                f"the model got a batch of {rows} rows but the lesion has {own.shape[0]} "
                "coalition rows; repeat the inputs once per coalition"
            )
        full = torch.ones(own.shape[0], site.size)
        full[:, site.indices] = own
        return full.expand(rows, -1)

    def _channel_hook(self, site: _Site) -> Any:
        """Pre-hook on a projection whose input channels are `site.size` equal slices, one per
        unit (a head's columns, one neuron, a shared expert's share)."""

        def hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
            x = args[0]
            n = x.shape[0]  # rows, or rows * seq tokens (a shared expert on flattened tokens)
            rows = self.factors.shape[0]
            f = self._row_factors(site, n) if rows in (1, n) else self._token_factors(site, n)
            if f is None:
                return None
            per = x.shape[-1] // site.size
            shape = (x.shape[0], *([1] * (x.dim() - 2)), site.size, 1)
            view = x.reshape(*x.shape[:-1], site.size, per)
            fac = f.to(device=x.device, dtype=x.dtype).reshape(shape)
            out = view * fac
            if site.mean is not None:
                mean = site.mean.to(device=x.device, dtype=x.dtype).reshape(site.size, per)
                out = out + (1 - fac) * mean
            return (out.reshape(x.shape), *args[1:])

        return hook

    def _layer_hook(self, site: _Site) -> Any:
        def hook(
            module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
        ) -> Any:
            hidden_in = args[0] if args else kwargs["hidden_states"]
            hidden_out = output[0] if isinstance(output, tuple) else output
            f = self._row_factors(site, hidden_in.shape[0])
            if f is None:
                return None
            fac = f[:, 0].to(device=hidden_in.device, dtype=hidden_in.dtype)
            fac = fac.reshape(-1, *([1] * (hidden_in.dim() - 1)))
            delta = hidden_out - hidden_in
            new = hidden_in + fac * delta
            if site.mean is not None:
                new = new + (1 - fac) * site.mean.to(device=hidden_in.device, dtype=hidden_in.dtype)
            new = torch.where(fac == 1, hidden_out, new)
            return (new, *output[1:]) if isinstance(output, tuple) else new

        return hook

    def _token_factors(self, site: _Site, n_tokens: int) -> torch.Tensor | None:
        """Factors `[n_tokens, n_experts]` for flattened [rows * seq, ...] MoE inputs."""
        rows = self.factors.shape[0]
        if n_tokens % rows:
            raise MsaEditError(
                f"the MoE layer got {n_tokens} tokens, not a multiple of {rows} coalition rows"
            )
        f = self._row_factors(site, rows)
        return None if f is None else f.repeat_interleave(n_tokens // rows, dim=0)

    def _reroute_hook(self, site: _Site) -> Any:
        scheme, flags = router(self.model)

        def hook(gate: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
            width = cast(torch.Tensor, gate.weight).shape[1]
            hidden = args[0].reshape(-1, width)
            f = self._token_factors(site, hidden.shape[0])
            if f is None:
                return None
            weights, index = scheme.route(gate, hidden, (f == 0).to(hidden.device), flags)
            return (output[0], weights, index)

        return hook

    def _expert_hooks(self, site: _Site) -> tuple[Any, Any]:
        key = id(site)
        names = architecture(self.model).expert_args

        def unpack(args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Any]:
            values = list(args) + [kwargs[n] for n in names[len(args) :]]
            return values[:3]

        def pre(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            hidden, index, weights = unpack(args, kwargs)
            f = self._token_factors(site, hidden.shape[0])
            if f is None:
                self._pending.pop(key, None)
                return None
            chosen = f.to(weights.device).gather(1, index).to(weights.dtype)
            if site.mean is not None:
                self._pending[key] = (index, weights * (1 - chosen))
            new = (hidden, index, weights * chosen)
            rest = {k: v for k, v in kwargs.items() if k not in names}
            return new, rest

        def post(
            module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
        ) -> Any:
            pending = self._pending.pop(key, None)
            if pending is None or site.mean is None:
                return None
            index, rest = pending
            mean = site.mean.to(device=output.device, dtype=output.dtype)  # [n_experts, hidden]
            return output + (rest[..., None].to(output.dtype) * mean[index]).sum(1)

        return pre, post


def _sites(
    model: nn.Module, units: Sequence[Unit], means: Mapping[Unit, torch.Tensor] | None
) -> list[_Site]:
    """Group units by (layer, kind) and check each exists in the model."""
    layers = decoder_layers(model)
    groups: dict[tuple[int, str], list[int]] = {}
    for column, unit in enumerate(units):
        groups.setdefault((unit.layer, unit.kind), []).append(column)
    sites = []
    for (layer_idx, kind), columns in sorted(groups.items()):
        if not 0 <= layer_idx < len(layers):
            raise MsaEditError(
                f"unit {units[columns[0]]} names layer {layer_idx}, but the model has layers "
                f"0-{len(layers) - 1}"
            )
        layer = layers[layer_idx]
        size = UNIT_KINDS[kind].count(model, layer)
        if size == 0:
            raise MsaEditError(
                f"unit {units[columns[0]]} does not exist: layer {layer_idx} has no "
                f"{UNIT_KINDS[kind].holder or kind}"
            )
        indices = torch.tensor([max(units[c].index, 0) for c in columns])
        if int(indices.max()) >= size:
            raise MsaEditError(
                f"unit {units[columns[int(indices.argmax())]]} does not exist: layer {layer_idx} "
                f"has {size} {kind} (0-{size - 1})"
            )
        mean = None
        if means is not None:
            mean = _site_mean(model, kind, size, [units[c] for c in columns], indices, means)
        sites.append(_Site(layer_idx, kind, torch.tensor(columns), indices, size, mean))
    return sites


def _site_mean(
    model: nn.Module,
    kind: str,
    size: int,
    units: list[Unit],
    indices: torch.Tensor,
    means: Mapping[Unit, torch.Tensor],
) -> torch.Tensor:
    """Stack per-unit means into the site's layout (zeros where a unit is not lesioned)."""
    first = means[units[0]]
    table = torch.zeros(size, *first.shape, dtype=first.dtype)
    for unit, idx in zip(units, indices.tolist(), strict=True):
        table[idx] = means[unit]
    return table[0] if UNIT_KINDS[kind].segment is None else table


@contextmanager
def lesioned(
    model: nn.Module,
    units: Sequence[Unit],
    kind: LesionKind = "zero",
    *,
    means: Mapping[Unit, torch.Tensor] | None = None,
) -> Iterator[Lesion]:
    """Lesion `units` in every batch row for the duration of the block.

    >>> # with lesioned(model, select(model, "layers.0.experts.3"), "reroute"):
    >>> #     logits = model(input_ids).logits
    """
    with Lesion(model, units, kind, means=means) as lesion:
        lesion.set_coalitions(torch.zeros(1, len(units), dtype=torch.bool))
        yield lesion


@contextmanager
def scaled(
    model: nn.Module,
    factors: Mapping[Unit, float],
    *,
    baseline: Literal["zero", "mean"] = "zero",
    means: Mapping[Unit, torch.Tensor] | None = None,
) -> Iterator[Lesion]:
    """Multiply each unit's output by its factor (towards its mean with `baseline="mean"`).

    `lesioned(model, units, "zero")` is `scaled(model, {u: 0.0 for u in units})`.
    """
    units = sorted(factors)
    kind: LesionKind = "mean" if baseline == "mean" else "scale"
    with Lesion(model, units, kind, means=means) as lesion:
        lesion.set_factors(torch.tensor([[float(factors[u]) for u in units]]))
        yield lesion


@torch.no_grad()
def unit_means(
    model: nn.Module, units: Sequence[Unit], input_ids: torch.Tensor, batch_size: int = 8
) -> dict[Unit, torch.Tensor]:
    """Each unit's mean output over the tokens of `input_ids` `[N, T]`, for `mean` lesions.

    Heads: mean of the head's slice of the attention output projection's input; neurons: mean
    activation; experts: mean expert output over the tokens the router sends to it; layers: mean
    residual update.
    """
    sums: dict[tuple[int, str], torch.Tensor] = {}
    counts: dict[tuple[int, str], torch.Tensor] = {}
    handles = []
    layers = decoder_layers(model)

    def add(key: tuple[int, str], total: torch.Tensor, count: torch.Tensor) -> None:
        total, count = total.double().cpu(), count.double().cpu()
        sums[key] = sums[key] + total if key in sums else total
        counts[key] = counts[key] + count if key in counts else count

    for layer_idx, kind in sorted({(u.layer, u.kind) for u in units}):
        layer = layers[layer_idx]
        key = (layer_idx, kind)
        spec = UNIT_KINDS[kind]
        if spec.segment is None:
            handles.append(layer.register_forward_hook(_capture_layer(add, key), with_kwargs=True))
        elif not spec.routed:
            capture = _capture_channels(add, key, spec.count(model, layer))
            handles.append(spec.site(model, layer).register_forward_pre_hook(capture))
        else:
            _, experts = moe_parts(model, layer)
            hook = _capture_experts(add, key, n_experts(model))
            handles.append(experts.register_forward_pre_hook(hook, with_kwargs=True))
    run_hooked(model, input_ids, handles, batch_size)
    out: dict[Unit, torch.Tensor] = {}
    for unit in units:
        key = (unit.layer, unit.kind)
        mean = sums[key] / counts[key].clamp_min(1).reshape(-1, *([1] * (sums[key].dim() - 1)))
        out[unit] = mean[0] if unit.spec.segment is None else mean[max(unit.index, 0)]
    return out


def run_hooked(
    model: nn.Module,
    input_ids: torch.Tensor,
    handles: Sequence[RemovableHandle],
    batch_size: int = 8,
) -> None:
    """Run `input_ids` `[N, T]` through `model` `batch_size` rows at a time for the hooks behind
    `handles` to observe; the hooks are removed afterwards, also after an exception."""
    try:
        device = next(model.parameters()).device
        for start in range(0, input_ids.shape[0], batch_size):
            model(input_ids[start : start + batch_size].to(device))
    finally:
        for handle in handles:
            handle.remove()


def _capture_channels(add: Any, key: tuple[int, str], groups: int) -> Any:
    def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0].detach()
        flat = x.reshape(-1, x.shape[-1])
        per = flat.reshape(flat.shape[0], groups, -1)
        add(key, per.sum(0), torch.full((groups,), float(flat.shape[0])))

    return hook


def _capture_layer(add: Any, key: tuple[int, str]) -> Any:
    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        hidden_in = args[0] if args else kwargs["hidden_states"]
        hidden_out = output[0] if isinstance(output, tuple) else output
        delta = (hidden_out - hidden_in).detach().reshape(-1, hidden_in.shape[-1])
        add(key, delta.sum(0, keepdim=True), torch.tensor([float(delta.shape[0])]))

    return hook


def _capture_experts(add: Any, key: tuple[int, str], experts: int) -> Any:
    busy = False

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        nonlocal busy
        if busy:  # the calls below go through this module too
            return
        hidden = args[0] if args else kwargs["hidden_states"]
        index = args[1] if len(args) > 1 else kwargs["top_k_index"]
        total = torch.zeros(experts, hidden.shape[-1], dtype=torch.float64)
        count = torch.zeros(experts)
        busy = True
        try:
            for e in range(experts):
                tokens = (index == e).any(-1).nonzero().flatten()
                if tokens.numel() == 0:
                    continue
                one = torch.full((tokens.numel(), 1), e, dtype=index.dtype, device=index.device)
                ones = torch.ones(tokens.numel(), 1, dtype=hidden.dtype, device=hidden.device)
                out = module(hidden[tokens], one, ones)
                total[e] = out.double().sum(0).cpu()
                count[e] = tokens.numel()
        finally:
            busy = False
        add(key, total, count)

    return hook
