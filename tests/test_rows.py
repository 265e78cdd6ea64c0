"""Row sampling (`LesionGame(rows_per_set=k)`): each coalition on k rows per target set, the
others filled in from the intact model; unbiased, exact at the ends, the same rows wherever a
coalition is evaluated."""

from __future__ import annotations

from itertools import combinations, product

import pytest
import torch
from tiny_models import build

from msa_edit.errors import MsaEditError
from msa_edit.games import LesionGame, MeanNLL, RowNLL, Targets
from msa_edit.rows import draw_rows, impute, on_every_row
from msa_edit.units import discover


def targets() -> Targets:
    g = torch.Generator().manual_seed(3)
    return Targets.from_dict({"a": torch.randint(0, 90, (4, 10), generator=g),
                              "b": torch.randint(0, 90, (3, 10), generator=g)})  # fmt: skip


@pytest.fixture(scope="module")
def model():
    return build("mixtral").eval()


def games(model, **kwargs) -> tuple[LesionGame, LesionGame, LesionGame]:
    units = [u for u in discover(model) if u.kind == "experts"]
    t = targets()
    make = lambda objective, **kw: LesionGame(model, units, t, objective, "reroute", **kw)  # noqa: E731
    return make(MeanNLL(), **kwargs), make(MeanNLL()), make(RowNLL())


def test_imputed_values_average_to_the_full_value_over_every_draw() -> None:
    """The difference estimator is unbiased: over all k-subsets of each set (equally likely),
    the mean of the imputed value equals the value on every row (exactly, up to rounding)."""
    g = torch.Generator().manual_seed(0)
    group = torch.tensor([0, 0, 0, 0, 1, 1, 1])
    lesioned, intact = torch.rand(7, 2, generator=g), torch.rand(7, 2, generator=g)
    lesioned[:, 1] = intact[:, 1] = 9.0  # MeanNLL's statistics: NLL sum, token count
    t = Targets(("a", "b"), torch.zeros(7, 2, dtype=torch.long), group)
    truth = MeanNLL().reduce(lesioned, t)
    for k in (1, 2, 3):
        draws = [
            torch.tensor(a + b)
            for a, b in product(combinations(range(4), k), combinations(range(4, 7), k))
        ]
        values = [MeanNLL().reduce(impute(lesioned[r], r, intact, group), t) for r in draws]
        mean = torch.stack(values).mean(0)
        assert torch.allclose(mean, truth, atol=1e-12), k
        assert not torch.allclose(values[0], truth, atol=1e-3)  # one draw alone is not exact


def test_a_coalition_is_valued_on_its_drawn_rows_against_the_intact_model(model) -> None:
    """Each set's value = intact mean + mean over the drawn rows of (lesioned - intact), with the
    drawn rows `draw_rows(coalition, group, k, seed)`; computed here from a full per-row game."""
    sampled, full, per_row = games(model, rows_per_set=2, row_seed=5)
    n = sampled.n_players
    coalitions = torch.rand(10, n, generator=torch.Generator().manual_seed(0)) < 0.5
    coalitions[:, :2] = torch.tensor([True, False])  # at least one lesioned and one intact
    coalitions[0, 2:], coalitions[1, 2:] = True, False  # the ends: one lesioned, one intact
    assert on_every_row(coalitions[:2]).all() and not on_every_row(coalitions[2:]).any()
    got = sampled(coalitions)
    rows = per_row(torch.cat([coalitions, torch.ones(1, n, dtype=torch.bool)]))
    lesioned, intact = rows[:-1], rows[-1]
    group = sampled.targets.group
    for b in range(2, len(coalitions)):
        drawn = draw_rows(coalitions[b], group, 2, seed=5)
        expected = torch.stack([intact[group == s].mean()
                                + (lesioned[b, drawn] - intact[drawn])[group[drawn] == s].mean()
                                for s in range(2)])  # fmt: skip
        assert torch.allclose(got[b], expected, atol=1e-5), b
    assert torch.allclose(got[:2], full(coalitions[:2]), atol=1e-6)  # the ends: every row
    assert not torch.allclose(got[2:], full(coalitions[2:]), atol=1e-4)  # the rest: sampled


def test_same_rows_in_any_batch_and_seeded(model) -> None:
    sampled, _, _ = games(model, rows_per_set=1, row_seed=0, max_rows=1)
    coalitions = torch.rand(6, sampled.n_players, generator=torch.Generator().manual_seed(1)) < 0.5
    together = sampled(coalitions)
    alone = torch.cat([sampled(coalitions[i : i + 1]) for i in range(6)])
    assert torch.equal(together, alone)
    other, _, _ = games(model, rows_per_set=1, row_seed=1, max_rows=1)
    assert not torch.equal(other(coalitions), together)
    whole, full, _ = games(model, rows_per_set=4)  # as many rows as the largest set: all of them
    assert torch.allclose(whole(coalitions), full(coalitions), atol=1e-6)


def test_bad_settings_are_refused(model) -> None:
    units = [u for u in discover(model) if u.kind == "experts"]
    with pytest.raises(MsaEditError, match="needs an objective that averages its rows"):
        LesionGame(model, units, targets(), RowNLL(), "reroute", rows_per_set=2)
    with pytest.raises(MsaEditError, match="rows_per_set must be an int >= 1"):
        LesionGame(model, units, targets(), MeanNLL(), "reroute", rows_per_set=0)
    assert LesionGame(model, units, targets(), rows_per_set=2).exact_ends == 1
    assert LesionGame(model, units, targets()).exact_ends is None
