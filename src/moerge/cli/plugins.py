"""``--plugin MODULE_OR_FILE``: the option shared by every command that runs recipes or merge methods."""

from __future__ import annotations

import typer

PLUGIN_OPTION_HELP = (
    "A Python module or .py file defining extra recipes and/or @merge_method functions (repeatable; "
    "docs/extending.md)."
)


def plugin_option() -> list[str]:
    return typer.Option([], "--plugin", help=PLUGIN_OPTION_HELP, metavar="MODULE_OR_FILE")


def load(plugins: list[str] | None) -> None:
    """Register the plugins' recipes and merge methods (imports torch only when there are plugins)."""
    if plugins:
        from moerge.plugins import load_plugins

        load_plugins(plugins)
