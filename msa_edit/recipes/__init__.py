"""Recipes: the YAML schema of one run (`schema`) and the runner that carries it out (`runner`)."""

from msa_edit.recipes.schema import (
    EditStage,
    EstimatorStage,
    EvaluateStage,
    ExportStage,
    HealStage,
    LesionStage,
    ModelStage,
    PlanStage,
    Recipe,
    TargetSet,
    TargetsStage,
    TinyMoeStage,
    load_recipe,
)

__all__ = [
    "EditStage",
    "EstimatorStage",
    "EvaluateStage",
    "ExportStage",
    "HealStage",
    "LesionStage",
    "ModelStage",
    "PlanStage",
    "Recipe",
    "TargetSet",
    "TargetsStage",
    "TinyMoeStage",
    "load_recipe",
]
