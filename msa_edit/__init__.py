"""msa_edit: find which units of a model produce a behaviour (MSA Shapley modes) and edit them.

    >>> import msa_edit
    >>> # msa_edit.run("recipes/demo.yaml", out="runs/demo")          # the whole pipeline
    >>> # msa_edit.analyze("recipe.yaml", out="runs/a", model=model)  # Shapley modes only

`run` and `analyze` are `msa_edit.api`'s, imported on first use so that `import msa_edit` (and the
`msa-edit` command line's help) stay fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["__version__", "analyze", "run"]

if TYPE_CHECKING:
    from pathlib import Path

    from msa_edit.shapley import ShapleyResult


def run(recipe: Any, **kwargs: Any) -> Path:
    """`msa_edit.api.run`: a recipe end to end into a run directory; returns report.md's path."""
    from msa_edit.api import run as run_recipe

    return run_recipe(recipe, **kwargs)


def analyze(recipe: Any, **kwargs: Any) -> ShapleyResult:
    """`msa_edit.api.analyze`: the recipe's Shapley modes (shapley.json in the run directory)."""
    from msa_edit.api import analyze as analyze_recipe

    return analyze_recipe(recipe, **kwargs)
