"""The ``moerge`` command. Sub-command modules import torch & co. inside their commands, never at import,
so ``moerge --help`` stays instant. Every command ends through `moerge.cli.common.run_app`: usage errors exit
2, errors exit 1 with one ``error:`` line (``--debug`` or ``MOERGE_DEBUG=1`` adds the traceback)."""

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


@app.callback()
def _global_options(
    debug: bool = typer.Option(
        False, "--debug", help="Print the traceback of an error (also MOERGE_DEBUG=1); may stand anywhere."
    ),
) -> None:
    """MoErging toolkit: a library of expert models, routed among and merged."""


# Each module defines `register(app)`; add a module here to add a command group.
COMMAND_MODULES = ["library", "hub", "train", "merge", "route", "bench", "serve"]

for _name in COMMAND_MODULES:
    try:
        _module = importlib.import_module(f"moerge.cli.{_name}")
    except ModuleNotFoundError as e:  # a command group still being built
        if e.name != f"moerge.cli.{_name}":
            raise
        continue
    _module.register(app)


def main() -> None:
    """Entry point: see `moerge.cli.common.run_app` for exit statuses and error lines."""
    from moerge.cli.common import run_app

    sys.exit(run_app(app))
