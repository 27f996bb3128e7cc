"""Plugins: recipes and merge methods from outside the package.

A plugin is a Python module (an importable name, or a ``.py`` file) that defines `moerge.recipes.Recipe`
objects and/or functions decorated with `moerge.merging.merge_method` at module level. It reaches moerge in two
ways:

- installed, through the entry-point groups ``moerge.recipes`` and ``moerge.merge_methods`` (a value may name
  a module, one object, or a list of them), loaded the first time a registry is used;
- per command, with ``--plugin MODULE_OR_FILE`` on ``moerge bench``, ``demo``, ``generate``, ``merge`` and
  ``recipes`` (or `load_plugins` from Python).

docs/extending.md walks through writing one.
"""

from __future__ import annotations

from collections.abc import Iterable

from moerge.entrypoints import import_plugin
from moerge.errors import PluginError
from moerge.merging.registry import register_from
from moerge.recipes.registry import register_recipes_from


def load_plugins(specs: Iterable[str]) -> list[str]:
    """Import each plugin and register its recipes and merge methods; returns what was registered."""
    added: list[str] = []
    for spec in specs:
        module = import_plugin(spec)
        recipes = register_recipes_from(module, source=spec)
        methods = register_from(module, source=spec)
        if not recipes and not methods:
            raise PluginError(
                f"plugin {spec} defines no Recipe and no @merge_method function at module level; "
                "see docs/extending.md"
            )
        added += [f"recipe {n}" for n in recipes] + [f"merge method {n}" for n in methods]
    return added
