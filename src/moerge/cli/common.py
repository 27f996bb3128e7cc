"""Shared CLI plumbing: one-line errors for user mistakes, a rich console."""

from __future__ import annotations

import sys

import typer
from rich.console import Console

console = Console()
err_console = Console(stderr=True)


def run_app(app: typer.Typer) -> int:
    from moerge.errors import MoergeError

    try:
        app(standalone_mode=False)
    except MoergeError as e:
        err_console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        return 1
    except FileNotFoundError as e:
        err_console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        return 1
    except (typer.Exit, SystemExit) as e:
        code = getattr(e, "exit_code", getattr(e, "code", 0))
        return int(code or 0)
    except typer.Abort:
        err_console.print("aborted")
        return 1
    except KeyboardInterrupt:
        err_console.print("interrupted")
        return 130
    except Exception as e:  # click usage errors
        import click

        if isinstance(e, click.ClickException):
            e.show()
            return e.exit_code
        raise
    return 0


def fail(message: str) -> None:
    """Print a one-line error and exit non-zero (for checks done in the CLI itself)."""
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(1)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(0)
