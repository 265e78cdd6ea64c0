"""The MLP-hubs finding on a reduced run (3 seeds, 40 epochs, 600 coalitions; ~10 s): L1 nets
concentrate their hidden units' Shapley contributions, and the hubs are real — lesioning them
directly (no Shapley estimate involved) removes more of the function than random lesions.

The full run is `python evals/mlp_hubs.py`.
"""

from __future__ import annotations

import statistics

import pytest
import torch
from mlp_hubs import Settings, gini, run

pytest.importorskip("sklearn")

SETTINGS = Settings(hidden=32, epochs=40, seeds=3, budget=600, top_k=4, random_sets=16)


@pytest.fixture(scope="module")
def results() -> dict:
    return run(SETTINGS, 0, ("none", "l1"))


def test_l1_nets_concentrate_contributions_in_fewer_units(results) -> None:
    none = [net["gini"] for net in results["none"]]
    l1 = [net["gini"] for net in results["l1"]]
    assert min(l1) > max(none) + 0.1, (none, l1)
    assert statistics.fmean(n["units_for_90"] for n in results["l1"]) < statistics.fmean(
        n["units_for_90"] for n in results["none"]
    )
    for nets in results.values():  # both conditions still solve the task
        assert all(net["accuracy"] > 0.85 for net in nets)


def test_the_shapley_hubs_are_hubs_when_lesioned_directly(results) -> None:
    """Would fail if the concentration were estimation noise: then the top units by Shapley value
    would be arbitrary, and lesioning them would cost no more than lesioning random units."""
    for net in results["l1"]:
        assert net["lesion_top_share"] > 1.3 * net["lesion_random_share"], net
        assert net["accuracy_without_top"] < net["accuracy"] - 0.1
    top = {c: statistics.fmean(n["lesion_top_share"] for n in nets) for c, nets in results.items()}
    assert top["l1"] > 2 * top["none"], top


def test_gini_is_zero_for_equal_and_maximal_for_one_holder() -> None:
    assert gini(torch.full((32,), 0.3)) == pytest.approx(0.0, abs=1e-12)
    assert gini(torch.eye(32)[0]) == pytest.approx(31 / 32)
