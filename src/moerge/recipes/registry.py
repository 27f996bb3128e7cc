"""The recipe registry. Built-in recipes are imported explicitly (one module per method family, each with a
``RECIPES`` list); third-party recipes come from installed ``moerge.recipes`` entry points and from plugins
(`moerge.plugins.load_plugins`, ``--plugin MODULE_OR_FILE``), or `register_recipe` from Python."""

from __future__ import annotations

from types import ModuleType
from typing import Any

from moerge.errors import PluginError, UnknownNameError
from moerge.recipes.recipe import Recipe, canonical_name

_RECIPES: dict[str, Recipe] = {}
_LOADED = False


def register_recipe(recipe: Recipe, *, source: str = "") -> Recipe:
    """Add ``recipe`` to the registry; a second recipe under the same name is refused."""
    if not isinstance(recipe, Recipe):
        raise PluginError(f"{recipe!r} is not a moerge.recipes.Recipe")
    known = _RECIPES.get(recipe.key)
    if known is not None and known is not recipe:
        where = f" (from {source})" if source else ""
        raise PluginError(f"a recipe named {recipe.name!r}{where} is already registered; rename it")
    _RECIPES[recipe.key] = recipe
    return recipe


def register_recipes_from(value: ModuleType | Any, *, source: str = "") -> list[str]:
    """Register every `Recipe` a module (its globals), a list, or a single object offers."""
    from moerge.entrypoints import objects_in

    _ensure_loaded()
    return [register_recipe(r, source=source).name for r in objects_in(value) if isinstance(r, Recipe)]


def _ensure_loaded() -> None:
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    from moerge.entrypoints import RECIPE_GROUP, entry_point_objects, objects_in
    from moerge.recipes import (
        adapter_soup,
        airoboros,
        arrow,
        average_activation,
        baselines,
        btx,
        collaboration,
        embedding,
        learned,
        lora_retriever,
        lorahub,
        molora,
        phatgoose,
        pool_routers,
        routellm,
        token_level,
        twin_merging,
        weight_ensembling,
        what_the_weight,
    )

    for module in (arrow, phatgoose, average_activation, embedding, adapter_soup, lora_retriever, molora,
                   token_level, what_the_weight, airoboros, lorahub, learned, collaboration, baselines, btx,
                   weight_ensembling, twin_merging, pool_routers, routellm):  # fmt: skip
        for recipe in module.RECIPES:
            register_recipe(recipe, source=module.__name__)
    for label, value in entry_point_objects(RECIPE_GROUP):
        for obj in objects_in(value):
            if isinstance(obj, Recipe):
                register_recipe(obj, source=f"entry point {label}")


def get_recipe(name: str | Recipe) -> Recipe:
    """The recipe registered as ``name`` (hyphens and underscores are the same), or ``name`` itself if it is
    already a `Recipe`."""
    if isinstance(name, Recipe):
        return name
    _ensure_loaded()
    key = canonical_name(name)
    if key not in _RECIPES:
        raise UnknownNameError(
            f"unknown recipe {name!r}; known recipes: {', '.join(sorted(_RECIPES))} "
            "(`moerge recipes` lists them; a recipe of your own: --plugin MODULE_OR_FILE, see docs/extending.md)"
        )
    return _RECIPES[key]


def list_recipes() -> list[Recipe]:
    _ensure_loaded()
    return [_RECIPES[k] for k in sorted(_RECIPES)]


def taxonomy_rows() -> list[dict[str, str]]:
    """The taxonomy table as rows (one per recipe): name, the nine axes, paper."""
    return [
        {"recipe": r.name, **r.taxonomy.model_dump(), "paper": r.paper or "baseline"} for r in list_recipes()
    ]
