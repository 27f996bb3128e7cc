"""Finding plugin code: importing a plugin given as a module name or a ``.py`` file, listing what a module
offers, and loading installed entry points. Each registry (`moerge.recipes.registry`, `moerge.merging.registry`)
collects the objects of its own kind; `moerge.plugins.load_plugins` feeds both.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from importlib.metadata import entry_points
from pathlib import Path
from types import ModuleType
from typing import Any

from moerge.errors import PluginError

RECIPE_GROUP = "moerge.recipes"
MERGE_METHOD_GROUP = "moerge.merge_methods"


def import_plugin(spec: str) -> ModuleType:
    """Import a plugin given as a module name (``mypkg.recipes``) or a path to a ``.py`` file."""
    path = Path(spec).expanduser()
    if spec.endswith(".py") or path.is_file():
        if not path.is_file():
            raise PluginError(
                f"plugin file {spec} does not exist; give a .py file or an importable module name"
            )
        resolved = path.resolve()
        name = "moerge_plugin_" + hashlib.sha256(str(resolved).encode()).hexdigest()[:12]
        if name in sys.modules:
            return sys.modules[name]
        loader_spec = importlib.util.spec_from_file_location(name, resolved)
        if loader_spec is None or loader_spec.loader is None:
            raise PluginError(f"plugin file {spec} cannot be loaded as a Python module")
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[name] = module
        try:
            loader_spec.loader.exec_module(module)
        except Exception as err:
            del sys.modules[name]
            raise PluginError(f"plugin file {spec} failed to import: {type(err).__name__}: {err}") from err
        return module
    try:
        return importlib.import_module(spec)
    except ModuleNotFoundError as err:
        raise PluginError(
            f"plugin {spec!r} is neither a .py file nor an importable module ({err}); check the name, or "
            "install the package that provides it"
        ) from err
    except Exception as err:
        raise PluginError(f"plugin module {spec} failed to import: {type(err).__name__}: {err}") from err


def objects_in(value: Any) -> list[Any]:
    """The candidate objects a plugin offers: a module's globals (less the modules it imported), a list's items,
    or the value itself."""
    if isinstance(value, ModuleType):
        return [v for k, v in vars(value).items() if not k.startswith("_") and not isinstance(v, ModuleType)]
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


def entry_point_objects(group: str) -> list[tuple[str, Any]]:
    """``(entry point, loaded value)`` for every installed entry point of ``group``."""
    out = []
    for ep in entry_points(group=group):
        try:
            out.append((f"{ep.name} = {ep.value}", ep.load()))
        except Exception as err:
            raise PluginError(
                f"entry point {ep.name!r} ({ep.value}) in group {group} failed to load: {type(err).__name__}: "
                f"{err}; fix or uninstall the package that declares it"
            ) from err
    return out
