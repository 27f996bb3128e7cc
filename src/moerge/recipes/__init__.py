"""Recipes: named routing methods as data (taxonomy record + parts). ``moerge recipes`` prints the table."""

from moerge.recipes.base import (
    AXES,
    BuildContext,
    Recipe,
    Requirement,
    Taxonomy,
    get_recipe,
    list_recipes,
    register_recipe,
    taxonomy_rows,
)

__all__ = [
    "AXES",
    "BuildContext",
    "Recipe",
    "Requirement",
    "Taxonomy",
    "get_recipe",
    "list_recipes",
    "register_recipe",
    "taxonomy_rows",
]
