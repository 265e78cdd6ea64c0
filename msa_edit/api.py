"""The Python entry points: a recipe run end to end, or its analysis alone, in one call.

    >>> import msa_edit
    >>> # report = msa_edit.run("recipes/demo.yaml", out="runs/demo")
    >>> # report = msa_edit.run(recipe_dict, model=my_model, tokenizer=my_tokenizer, out="runs/x")
    >>> # result = msa_edit.analyze("recipe.yaml", out="runs/a", overrides=["estimator.budget=200"])

`recipe` is a YAML file, a plain dict or a `Recipe`; `model`/`tokenizer` may be objects already in
memory (then the recipe's `model.path` only names the base model for plan.json and the card, and
the model is edited in place). Everything else is what `msa-edit run` / `msa-edit analyze` do: the
same run directory, the same checks, errors as one-line `MsaEditError`s.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer, PreTrainedModel

from msa_edit.recipes import runner
from msa_edit.recipes.schema import Recipe, as_recipe
from msa_edit.shapley import ShapleyResult

RecipeLike = str | os.PathLike[str] | Mapping[str, Any] | Recipe


def run(
    recipe: RecipeLike,
    *,
    out: str | os.PathLike[str],
    model: PreTrainedModel | None = None,
    tokenizer: Any = None,
    overrides: Sequence[str] = (),
) -> Path:
    """Carry out every stage of `recipe` into the run directory `out`; returns report.md's path."""
    r = _recipe(recipe, overrides)
    return runner.run(r, Path(out), loaded=_loaded(r, model, tokenizer))


def analyze(
    recipe: RecipeLike,
    *,
    out: str | os.PathLike[str],
    model: PreTrainedModel | None = None,
    tokenizer: Any = None,
    overrides: Sequence[str] = (),
) -> ShapleyResult:
    """The Shapley modes of the recipe's units on its target sets (writes shapley.json in `out`)."""
    r = _recipe(recipe, overrides)
    return runner.analyze(r, Path(out), _loaded(r, model, tokenizer))


def _recipe(recipe: RecipeLike, overrides: Sequence[str]) -> Recipe:
    if isinstance(recipe, os.PathLike):
        recipe = Path(recipe)
    return as_recipe(recipe, overrides)


def _loaded(recipe: Recipe, model: PreTrainedModel | None, tokenizer: Any) -> runner.Loaded | None:
    """The caller's model as the runner's `Loaded` (None: the runner loads the recipe's)."""
    if model is None:
        return None
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(runner.model_source(recipe.model))
    folder = str(getattr(model, "name_or_path", "") or recipe.model.name)
    model.eval()
    return runner.Loaded(model, tokenizer, folder, recipe.model.name, in_memory=True)
