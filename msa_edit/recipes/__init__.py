"""Recipes: the YAML schema of one run (`schema`) and the runner that carries it out (`runner`)."""

from msa_edit.recipes import schema
from msa_edit.recipes.schema import *  # noqa: F403

__all__ = schema.__all__
