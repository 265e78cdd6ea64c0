"""The examples' reduced runs use one torch thread, as the scripts do (same numbers whatever the
machine's core count); the caller's thread count is restored afterwards."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module", autouse=True)
def _every_module_on_one_thread(one_thread: None) -> None:
    """`one_thread` (tests/conftest.py) for every module here."""
