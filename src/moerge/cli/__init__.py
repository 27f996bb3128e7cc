"""The ``moerge`` command. Sub-command modules import torch & co. inside their commands, never at import,
so ``moerge --help`` stays instant."""

from __future__ import annotations

import importlib
import sys

import typer

app = typer.Typer(
    name="moerge",
    help="MoErging toolkit: a library of expert models, routed among and merged.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Each module defines `register(app)`; add a module here to add a command group.
COMMAND_MODULES = ["library", "train", "merge", "route", "bench"]

for _name in COMMAND_MODULES:
    try:
        _module = importlib.import_module(f"moerge.cli.{_name}")
    except ModuleNotFoundError as e:  # a command group still being built
        if e.name != f"moerge.cli.{_name}":
            raise
        continue
    _module.register(app)


def main() -> None:
    """Entry point: user mistakes (`MoergeError`, missing files) print one line and exit 1."""
    from moerge.cli.common import run_app

    sys.exit(run_app(app))
