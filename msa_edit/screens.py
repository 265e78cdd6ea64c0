"""Cheap language-specificity screens for dense models, as baselines for Shapley-based plans.

Two one-pass rankings of heads and MLP neurons by how specific they are to one target language
among several, to compare against msa_edit's plans at equal unit count:

- LAPE (Tang et al. 2024, "Language-Specific Neurons: The Key to Multilingual Capabilities in
  Large Language Models"): each MLP neuron's activation probability per language (share of the
  language's tokens on which the input of the MLP down projection is > 0), normalised over
  languages; neurons with the lowest entropy whose most active language is the target are
  specific to it (`activation_probability`, `lape_entropy`, `lape_select`).
- Gradient x activation: a multiplicative gate g = 1 on every head or neuron; -dL/dg of each
  language's mean next-token NLL is the first-order estimate of the loss increase when the unit
  is removed (g: 1 -> 0). Units whose estimate for the target most exceeds every other language's
  are specific to it (`gate_attribution`, `specific_select`).

>>> # prob = activation_probability(model, {"en": en_ids, "fr": fr_ids})  # [L, I, 2]
>>> # units = lape_select(prob, ["en", "fr"], "fr", count=64)
>>> # units, scores = gate_attribution(model, {"en": en_ids, "fr": fr_ids}, "heads")
>>> # heads = specific_select(scores, units, ["en", "fr"], "fr", count=8)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from msa_edit.errors import MsaEditError, short
from msa_edit.games import token_nll
from msa_edit.units import (
    UNIT_KINDS,
    Unit,
    architecture,
    decoder_layers,
    discover,
    mlp_width,
    moe_block,
    submodule,
)

GATE_KINDS = tuple(k.name for k in UNIT_KINDS.values() if k.channels is not None)
"""Kinds a gradient screen ranks: those carried by input channels (heads, neurons, shared
experts)."""


# -- LAPE ---------------------------------------------------------------------------------------
def activation_probability(
    model: nn.Module, blocks: Mapping[str, torch.Tensor], *, batch_size: int = 8
) -> torch.Tensor:
    """Share of each language's tokens on which each MLP neuron is active (> 0): its activation
    function's output (LAPE's definition; Llama: act(gate_proj(x)), before the up projection).

    `blocks` maps a language to token ids `[n_seq, seq_len]`; the result is float32
    `[n_layers, intermediate_size, n_languages]`, languages in the order of `blocks`.
    Every layer must have a dense MLP.
    """
    languages = _check_blocks(blocks, min_len=1)
    arch = architecture(model)
    downs = []
    for i, layer in enumerate(decoder_layers(model)):
        down = submodule(layer, arch.mlp_down)
        if down is None or moe_block(model, layer) is not None:
            raise MsaEditError(
                f"layer {i} has no dense MLP, so it has no neurons for LAPE; use a dense model "
                "(llama, mistral, qwen2, qwen3, gpt2)"
            )
        downs.append(down)
    widths = {mlp_width(d) for d in downs}
    if len(widths) != 1:
        raise MsaEditError(f"MLP widths differ across layers {sorted(widths)}; LAPE needs one")
    counts = torch.zeros(len(downs), widths.pop(), dtype=torch.float64)

    def count(layer: int, x: torch.Tensor) -> None:
        counts[layer] += (x.reshape(-1, x.shape[-1]) > 0).sum(0).double().cpu()

    def attach(i: int, layer: nn.Module, down: nn.Module) -> RemovableHandle:
        """The paper's activation: the activation function's output (gated MLPs: act(gate(x)),
        before the up projection multiplies it); else the down projection's input."""
        mlp = submodule(layer, (arch.mlp_down or "").rsplit(".", 1)[0])
        act = getattr(mlp, "act_fn", None)
        if isinstance(act, nn.Module):
            return act.register_forward_hook(lambda _m, _a, out: count(i, out))
        return down.register_forward_pre_hook(lambda _m, args: count(i, args[0]))

    columns = []
    with _eval(model), torch.inference_mode(), _removing() as handles:
        for i, (layer, down) in enumerate(zip(decoder_layers(model), downs, strict=True)):
            handles.append(attach(i, layer, down))
        for lang in languages:
            counts.zero_()
            _forward_batches(model, blocks[lang], batch_size)
            columns.append(counts / blocks[lang].numel())
    return torch.stack(columns, -1).float()


def lape_entropy(prob: torch.Tensor) -> torch.Tensor:
    """LAPE of each neuron: the entropy of its activation probabilities normalised over
    languages (last dimension); +inf for a neuron active in no language.

    >>> lape_entropy(torch.tensor([[1.0, 0.0], [0.3, 0.3], [0.0, 0.0]]))
    tensor([0.0000, 0.6931,    inf])
    """
    total = prob.sum(-1, keepdim=True)
    p = prob / torch.where(total > 0, total, torch.ones_like(total))
    entropy = 0.0 - torch.xlogy(p, p).sum(-1)  # 0 - x, not -x: no -0.0
    return torch.where(total[..., 0] > 0, entropy, torch.full_like(entropy, float("inf")))


def lape_select(
    prob: torch.Tensor,
    languages: Sequence[str],
    target: str,
    count: int,
    *,
    min_probability: float = 0.0,
) -> list[Unit]:
    """The `count` neurons most specific to `target` by LAPE, most specific first.

    `prob` is `activation_probability`'s `[n_layers, intermediate, n_languages]`. A neuron
    qualifies when `target` is strictly its most active language (and its probability there is
    at least `min_probability`, the paper's filter against rarely active neurons); qualifying
    neurons are ranked by lowest entropy, then highest target probability, then unit order.

    >>> prob = torch.tensor([[[0.9, 0.1], [0.2, 0.0], [0.5, 0.0], [0.1, 0.8]]])
    >>> lape_select(prob, ["en", "fr"], "en", 2)
    [Unit('layers.0.mlp.neurons.2'), Unit('layers.0.mlp.neurons.1')]
    """
    if prob.dim() != 3:
        raise MsaEditError(
            f"prob must be [n_layers, intermediate, n_languages], got shape {list(prob.shape)}"
        )
    t = _target_column(languages, target, prob.shape[-1])
    _check_count(count)
    flat = prob.reshape(-1, prob.shape[-1]).double()
    others = torch.cat([flat[:, :t], flat[:, t + 1 :]], 1)
    best_other = others.max(1).values if others.shape[1] else torch.zeros(flat.shape[0])
    own = flat[:, t]
    ok = (own > best_other) & (own > 0) & (own >= min_probability)
    candidates = ok.nonzero().flatten()
    if candidates.numel() < count:
        raise MsaEditError(
            f"only {candidates.numel()} neurons are most active on {target!r} (count={count}); "
            f"lower count or min_probability, or give more {target!r} text"
        )
    candidates = candidates[torch.argsort(-own[candidates], stable=True)]
    entropy = lape_entropy(flat)[candidates]
    chosen = candidates[torch.argsort(entropy, stable=True)][:count]
    width = prob.shape[1]
    return [Unit(i // width, "neurons", i % width) for i in chosen.tolist()]


def lape_ranking(prob: torch.Tensor, languages: Sequence[str], target: str) -> list[Unit]:
    """Every neuron whose most active language is `target`, most specific first (`lape_select`
    without a count).

    >>> prob = torch.tensor([[[0.9, 0.1], [0.2, 0.0], [0.5, 0.0], [0.1, 0.8]]])
    >>> lape_ranking(prob, ["en", "fr"], "fr")
    [Unit('layers.0.mlp.neurons.3')]
    """
    t = _target_column(languages, target, prob.shape[-1])
    flat = prob.reshape(-1, prob.shape[-1])
    others = torch.cat([flat[:, :t], flat[:, t + 1 :]], 1)
    best_other = others.max(1).values if others.shape[1] else torch.zeros(flat.shape[0])
    own = flat[:, t]
    return lape_select(prob, languages, target, int(((own > best_other) & (own > 0)).sum()))


# -- gradient x activation ----------------------------------------------------------------------
def gate_attribution(
    model: nn.Module,
    blocks: Mapping[str, torch.Tensor],
    kind: str,
    *,
    batch_size: int = 8,
) -> tuple[list[Unit], torch.Tensor]:
    """First-order estimate of each unit's loss increase on removal, per language.

    Returns every unit of `kind` (one of `GATE_KINDS`) of the model, in canonical order, and
    `[n_units, n_languages]` (float32, languages in the order of `blocks`): -dL/dg, where g is a
    gate multiplying the unit's output at g = 1 and L the language's mean next-token NLL over
    the predicted tokens of its blocks (`msa_edit.games.MeanNLL`). The model's parameters get no
    gradients and the model computes exactly what it did before.
    """
    if kind not in GATE_KINDS:
        choose = ", ".join(GATE_KINDS)
        raise MsaEditError(f"unknown unit kind {short(kind)}; choose one of {choose}")
    languages = _check_blocks(blocks, min_len=2)
    units = discover(model, [kind])
    if not units:
        raise MsaEditError(f"this model has no {kind}; choose one of {', '.join(GATE_KINDS)}")
    spec = UNIT_KINDS[kind]
    layers = decoder_layers(model)
    sizes: dict[int, int] = {}
    for unit in units:
        sizes[unit.layer] = max(sizes.get(unit.layer, 0), unit.index + 1)
    params = list(model.parameters())
    dtype = torch.promote_types(params[0].dtype, torch.float32)
    gates = {
        i: torch.ones(size, dtype=dtype, device=params[0].device, requires_grad=True)
        for i, size in sorted(sizes.items())
    }
    scores = torch.zeros(len(units), len(languages), dtype=torch.float64)
    with _eval(model), _frozen(params), torch.enable_grad(), _removing() as handles:
        for i, gate in gates.items():
            site = spec.site(model, layers[i])
            handles.append(site.register_forward_pre_hook(_gate_hook(gate)))
        device = params[0].device
        for column, lang in enumerate(languages):
            ids = blocks[lang]
            n_predicted = ids.shape[0] * (ids.shape[1] - 1)
            total = [torch.zeros_like(g) for g in gates.values()]
            for start in range(0, ids.shape[0], batch_size):
                batch = ids[start : start + batch_size].to(device)
                logits = model(input_ids=batch, use_cache=False).logits
                loss = token_nll(logits, batch).sum() / n_predicted
                grads = torch.autograd.grad(loss, list(gates.values()))
                total = [t + g for t, g in zip(total, grads, strict=True)]
            scores[:, column] = -torch.cat(total).double().cpu()
    return units, scores.float()


def specific_select(
    scores: torch.Tensor,
    units: Sequence[Unit],
    languages: Sequence[str],
    target: str,
    count: int,
) -> list[Unit]:
    """The `count` units most specific to `target`, most specific first.

    Specificity is `scores[:, target]` minus the largest score of any other language (`scores`
    as from `gate_attribution`: `[n_units, n_languages]`); ties go to the unit earlier in `units`.

    >>> units = [Unit(0, "heads", h) for h in range(3)]
    >>> scores = torch.tensor([[1.0, 0.5], [2.0, 0.0], [0.5, 0.1]])
    >>> specific_select(scores, units, ["en", "fr"], "en", 2)
    [Unit('layers.0.heads.1'), Unit('layers.0.heads.0')]
    """
    if scores.dim() != 2 or scores.shape[0] != len(units):
        raise MsaEditError(
            f"scores must be [n_units={len(units)}, n_languages], got shape {list(scores.shape)}"
        )
    t = _target_column(languages, target, scores.shape[1])
    _check_count(count)
    if count > len(units):
        raise MsaEditError(f"count={count} but there are only {len(units)} units; lower count")
    if not bool(torch.isfinite(scores).all()):
        raise MsaEditError("scores contain NaN or infinite values; recompute them")
    scores = scores.double()
    others = torch.cat([scores[:, :t], scores[:, t + 1 :]], 1)
    selectivity = scores[:, t] - (others.max(1).values if others.shape[1] else 0.0)
    order = torch.argsort(-selectivity, stable=True)[:count]
    return [units[i] for i in order.tolist()]


# -- a screen: candidates for the analysis ------------------------------------------------------
SCREENS = ("lape", "gradient")
"""Screen methods `screen` knows: LAPE over MLP neurons, gradient x activation over heads and
neurons."""


def screen(
    model: nn.Module,
    blocks: Mapping[str, torch.Tensor],
    units: Sequence[Unit],
    target: str,
    methods: Sequence[str],
    keep: int,
) -> list[Unit]:
    """The `keep` units among `units` most specific to `target` by the screens `methods`, which
    take turns (each adds its most specific unit not yet kept), in the order they were taken.

    `blocks` maps each language (target set) to token ids `[n_seq, seq_len]`. A method that
    cannot rank some of the units (LAPE: only neurons) ranks the rest.
    """
    wanted = set(units)
    if not 0 < keep <= len(wanted):
        raise MsaEditError(f"screen keep={keep} but there are {len(wanted)} units; lower keep")
    unknown = [m for m in methods if m not in SCREENS]
    if not methods or unknown:
        raise MsaEditError(f"unknown screen {short(unknown)}; choose from {list(SCREENS)}")
    languages = list(blocks)
    _target_column(languages, target, len(languages))
    kinds = sorted({u.kind for u in wanted})
    rankings: list[list[Unit]] = []
    for method in methods:
        if method == "lape" and kinds != ["neurons"]:
            raise MsaEditError(
                f"screen lape ranks MLP neurons only, but the units are {kinds}; use gradient"
            )
        if method == "lape":
            ranked = lape_ranking(activation_probability(model, blocks), languages, target)
        else:
            ranked = _gradient_ranking(model, blocks, kinds, target)
        rankings.append([u for u in ranked if u in wanted])
    kept: dict[Unit, None] = {}
    for position in range(max(map(len, rankings))):
        for ranked in rankings:
            if position < len(ranked) and len(kept) < keep:
                kept.setdefault(ranked[position])
    if len(kept) < keep:
        raise MsaEditError(
            f"the screens rank only {len(kept)} of the units as {target!r}-specific (keep="
            f"{keep}); lower screen.keep or add gradient to screen.method"
        )
    return list(kept)


def _gradient_ranking(
    model: nn.Module, blocks: Mapping[str, torch.Tensor], kinds: Sequence[str], target: str
) -> list[Unit]:
    """Heads and/or neurons by gradient x activation specificity, most specific first (one
    ranking across kinds: the scores are first-order loss increases of each)."""
    found: list[Unit] = []
    scores = []
    for kind in kinds:
        if kind not in GATE_KINDS:
            raise MsaEditError(f"screen gradient ranks {', '.join(GATE_KINDS)}, not {kind}")
        units, s = gate_attribution(model, blocks, kind)
        found += units
        scores.append(s)
    return specific_select(torch.cat(scores), found, list(blocks), target, len(found))


# -- helpers ------------------------------------------------------------------------------------
@contextmanager
def _removing() -> Iterator[list[RemovableHandle]]:
    """A list for hook handles; every hook in it is removed after the block, also after an
    exception."""
    handles: list[RemovableHandle] = []
    try:
        yield handles
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def _eval(model: nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) inside the block; the previous mode after it."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for module, mode in modes.items():
            module.training = mode


@contextmanager
def _frozen(params: Sequence[nn.Parameter]) -> Iterator[None]:
    """Parameters without gradients inside the block; their `requires_grad` restored after."""
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)


def _gate_hook(gate: torch.Tensor) -> Callable[[nn.Module, tuple[Any, ...]], tuple[Any, ...]]:
    """Pre-hook scaling the projection's input channels in `gate.numel()` equal groups."""

    def hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        x = args[0]
        g = gate.to(device=x.device, dtype=x.dtype)
        view = x.reshape(*x.shape[:-1], gate.numel(), -1) * g[:, None]
        return (view.reshape(x.shape), *args[1:])

    return hook


def _forward_batches(model: nn.Module, ids: torch.Tensor, batch_size: int) -> None:
    device = next(model.parameters()).device
    for start in range(0, ids.shape[0], batch_size):
        model(input_ids=ids[start : start + batch_size].to(device), use_cache=False)


def _check_blocks(blocks: Mapping[str, torch.Tensor], min_len: int) -> list[str]:
    if not blocks:
        raise MsaEditError("no token blocks; give one [n_seq, seq_len] tensor per language")
    for lang, ids in blocks.items():
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.is_floating_point():
            raise MsaEditError(
                f"blocks[{short(lang)}] must be integer token ids [n_seq, seq_len]; "
                "build them with msa_edit.texts.text_blocks"
            )
        if ids.shape[0] < 1 or ids.shape[1] < min_len:
            raise MsaEditError(
                f"blocks[{short(lang)}] has shape {list(ids.shape)}; give at least one block of "
                f"{min_len} or more tokens"
            )
    return list(blocks)


def _target_column(languages: Sequence[str], target: str, n: int) -> int:
    if len(languages) != n:
        raise MsaEditError(f"{len(languages)} languages named but the scores have {n} columns")
    if target not in languages:
        raise MsaEditError(f"target {short(target)} is not one of the languages {list(languages)}")
    return list(languages).index(target)


def _check_count(count: int) -> None:
    if not isinstance(count, int) or count < 0:
        raise MsaEditError(f"count must be a non-negative integer, got {short(count)}")
