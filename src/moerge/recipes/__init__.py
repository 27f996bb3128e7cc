"""Recipes: named routing methods as data (taxonomy record + options + signatures + builder), one file per
method family; the registry (built-ins, entry points, plugins); and the `attach` facade. ``moerge recipes``
prints the taxonomy table."""

from __future__ import annotations

from typing import Any

from moerge.recipes.recipe import (
    AXES,
    BuildContext,
    BuiltModel,
    Recipe,
    RecipeOptions,
    Routing,
    Signature,
    TargetData,
    Taxonomy,
)
from moerge.recipes.registry import (
    get_recipe,
    list_recipes,
    register_recipe,
    register_recipes_from,
    taxonomy_rows,
)

__all__ = [
    "AXES",
    "BuildContext",
    "BuiltModel",
    "Recipe",
    "RecipeOptions",
    "Routing",
    "Signature",
    "TargetData",
    "Taxonomy",
    "attach",
    "build_model",
    "detach",
    "get_recipe",
    "list_recipes",
    "prepare_signatures",
    "register_recipe",
    "register_recipes_from",
    "taxonomy_rows",
]


def __getattr__(name: str) -> Any:
    if name in ("attach", "build_model", "detach", "prepare_signatures"):
        from moerge.recipes import facade

        return getattr(facade, name)
    raise AttributeError(f"module 'moerge.recipes' has no attribute {name!r}")
