"""Unit names from users (recipes, plan.json): out-of-range or odd names are one error line."""

from __future__ import annotations

import pytest

from msa_edit.errors import MsaEditError
from msa_edit.units import MAX_INDEX, Unit

TOO_LARGE = [
    "layers.10000000000000000000000.experts.0",
    "layers.2147483648",
    "layers.0.heads.2147483648",
    "layers.0.mlp.neurons." + "9" * 5000,  # more digits than int() converts
]


@pytest.mark.parametrize(
    "name", TOO_LARGE, ids=["1e22", "layer 2**31", "head 2**31", "5000 digits"]
)
def test_indices_of_2_31_and_above_are_refused(name: str) -> None:
    with pytest.raises(MsaEditError) as info:
        Unit.parse(name)
    message = str(info.value)
    assert f"has an index above {MAX_INDEX}" in message and "\n" not in message
    assert len(message) < 300
    assert MAX_INDEX == 2**31 - 1 and Unit.parse(f"layers.{MAX_INDEX}").layer == MAX_INDEX


@pytest.mark.parametrize("name", ["layers.\u0663", "layers.0.experts.\uff11", None, 7])
def test_non_ascii_digits_and_non_strings_are_malformed(name: object) -> None:
    with pytest.raises(MsaEditError, match="malformed unit name"):
        Unit.parse(name)  # type: ignore[arg-type]
