"""Prefix reuse: a coalition's forward starts at its first lesioned layer, with the same values
(within 1e-6 in fp32) and without computing the layers below it."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from tiny_models import ALL_FAMILIES, build

from msa_edit.games import LesionGame, MeanNLL, Targets
from msa_edit.lesions import unit_means
from msa_edit.units import Unit, decoder_layers, discover

CASES = [("experts", "reroute"), ("heads", "zero"), ("neurons", "mean"), ("layer", "zero"),
         ("shared_experts", "zero")]  # fmt: skip


def first_per_layer(units: list[Unit], k: int) -> list[Unit]:
    """The first `k` units of each layer (so that coalitions lesion layers above the first)."""
    taken: Counter[int] = Counter()
    out = []
    for unit in units:
        if taken[unit.layer] < k:
            out.append(unit)
            taken[unit.layer] += 1
    return out


def targets() -> Targets:
    g = torch.Generator().manual_seed(1)
    return Targets.from_dict({"a": torch.randint(0, 90, (3, 12), generator=g),
                              "b": torch.randint(0, 90, (2, 12), generator=g)})  # fmt: skip


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_prefix_reuse_gives_the_full_forward_values(family: str) -> None:
    model = build(family).eval()
    found = discover(model)
    tried = 0
    for kind, lesion in CASES:
        units = first_per_layer([u for u in found if u.kind == kind], 6)
        if not units:
            continue
        t = targets()
        means = unit_means(model, units, t.input_ids) if lesion == "mean" else None
        coalitions = torch.rand(24, len(units), generator=torch.Generator().manual_seed(0)) < 0.8
        coalitions[0] = True  # the intact model: every layer reused
        reused = LesionGame(model, units, t, MeanNLL(), lesion, means=means, max_rows=7)
        full = LesionGame(model, units, t, MeanNLL(), lesion, means=means, max_rows=7,
                          prefix_reuse=False)  # fmt: skip
        starts = reused.starts(coalitions)
        assert int(starts[0]) == len(decoder_layers(model)) and bool((starts > 0).sum() > 2)
        assert torch.allclose(reused(coalitions), full(coalitions), rtol=0, atol=1e-6), kind
        tried += 1
    assert tried >= 3


def test_layers_below_the_first_lesion_are_not_computed() -> None:
    """Coalitions that lesion only the last layer's experts: the first layer's attention runs on
    the target rows once (the intact pass), not once per coalition."""
    model = build("mixtral").eval()
    units = [u for u in discover(model) if u.kind == "experts"]
    last = max(u.layer for u in units)
    coalitions = torch.ones(6, len(units), dtype=torch.bool)
    for row, col in enumerate(i for i, u in enumerate(units) if u.layer == last):
        coalitions[row % 6, col] = False
    rows_seen: list[int] = []

    def count(module: torch.nn.Module, args: tuple, kwargs: dict, output: object) -> None:
        rows_seen.append((args[0] if args else kwargs["hidden_states"]).shape[0])

    attention = decoder_layers(model)[0].self_attn
    handle = attention.register_forward_hook(count, with_kwargs=True)
    t = targets()
    try:
        LesionGame(model, units, t, MeanNLL(), "reroute", max_rows=64)(coalitions)
        assert sum(rows_seen) == t.n_rows
        rows_seen.clear()
        LesionGame(model, units, t, MeanNLL(), "reroute", max_rows=64,
                   prefix_reuse=False)(coalitions)  # fmt: skip
        assert sum(rows_seen) == 6 * t.n_rows
    finally:
        handle.remove()
