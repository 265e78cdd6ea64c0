"""The recipe's screen stage: the recipe's units narrowed to a few candidates by a cheap screen
(`msa_edit.screens.screen`) before the analysis or the plan evaluates coalitions of them.

The pick is kept in the run directory's screen.json (`{"method", "keep", "target", "from",
"units", "rows", "seconds"}`, units most specific first) and read back by later stages, so every
stage works on the same candidates and a rerun does not screen again. The players are the
candidates in canonical order; a removal search also measures the screen's own top pick.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from torch import nn

from msa_edit.atomic import read_json, write_json
from msa_edit.errors import MsaEditError
from msa_edit.games import Targets
from msa_edit.recipes.schema import Recipe
from msa_edit.rundir import SCREEN_JSON
from msa_edit.screens import screen
from msa_edit.units import Unit


def screen_record(
    recipe: Recipe, model: nn.Module, units: list[Unit], targets: Targets
) -> dict[str, Any]:
    """Run the recipe's screen over `units` on the target sets' blocks; screen.json's record."""
    stage = recipe.screen
    target = recipe.screen_target
    assert stage is not None and target is not None  # the schema checks both
    blocks = {name: targets.input_ids[targets.group == i] for i, name in enumerate(targets.names)}
    start = time.perf_counter()
    kept = screen(model, blocks, units, target, stage.method, stage.keep)
    return {
        "method": list(stage.method),
        "keep": stage.keep,
        "target": target,
        "from": len(units),
        "units": [str(u) for u in kept],
        "rows": targets.n_rows,
        "seconds": round(time.perf_counter() - start, 3),
    }


def read_screen(recipe: Recipe, out: Path, ranked: bool = False) -> list[Unit] | None:
    """The candidates in `out`'s screen.json if it was made by this recipe's screen, else None:
    in canonical order, or most specific first (`ranked`)."""
    path = out / SCREEN_JSON
    if recipe.screen is None or not path.is_file():
        return None
    fix = "delete it to screen again"
    record = read_json(path, fix)
    if not isinstance(record, dict):
        raise MsaEditError(f"{path} is not a screen record; {fix}")
    made = (record.get("method"), record.get("keep"), record.get("target"))
    if made != (list(recipe.screen.method), recipe.screen.keep, recipe.screen_target):
        return None
    try:
        units = [Unit.parse(name) for name in record["units"]]
    except (KeyError, TypeError, MsaEditError):
        raise MsaEditError(f"{path} is damaged; {fix}") from None
    return units if ranked else sorted(units)


def screened(
    recipe: Recipe, model: nn.Module, units: list[Unit], targets: Targets, out: Path
) -> tuple[list[Unit], dict[str, Any] | None]:
    """The analysis' units: `units` narrowed by the recipe's screen (read from screen.json when
    it holds this screen's pick), and the record to write when the screen ran now."""
    if recipe.screen is None:
        return units, None
    saved = read_screen(recipe, out)
    if saved is not None:
        return saved, None
    record = screen_record(recipe, model, units, targets)
    return sorted(Unit.parse(name) for name in record["units"]), record


def write_screen(out: Path, record: dict[str, Any] | None) -> None:
    """Write screen.json (when the screen ran now)."""
    if record is not None:
        write_json(out / SCREEN_JSON, record)
