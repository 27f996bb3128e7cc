"""Shared CLI plumbing: the one error path every command goes through, and a rich console.

`run_app` turns every way a command can end into an exit status and at most one line on stderr:

- usage errors (a missing argument, an unknown option or command, a bad option value, `moerge` alone): click's
  usage message, exit status 2 — whichever click the installed typer raises (its vendored copy or click itself);
- `MoergeError` (bad input, with the file and the fix in its message) and OS errors (a missing file, a full disk,
  no permission): one ``error:`` line, exit status 1 (`moerge.errors.UsageError`: exit status 2);
- anything else is a bug: one line saying so and how to see the traceback, exit status 1;
- ``typer.Exit(code)`` keeps its code; Ctrl-C exits 130.

``--debug`` anywhere before ``--`` (or ``MOERGE_DEBUG=1``) prints the traceback as well.
"""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Sequence

import typer
from rich.console import Console
from rich.text import Text

console = Console()
err_console = Console(stderr=True)

DEBUG_FLAG = "--debug"
_OS_HINTS = {
    errno.ENOSPC: "the disk is full; free some space (or choose another output folder) and run it again",
    errno.EDQUOT: "the disk quota is exhausted; free some space and run it again",
    errno.EACCES: "no permission; check the file's permissions or choose another location",
    errno.EPERM: "not permitted; check the file's permissions or choose another location",
    errno.EROFS: "the file system is read-only; choose a writable location",
}


def print_error(message: str) -> None:
    """One ``error:`` line on stderr (the message is printed as is: no markup, no wrapping)."""
    err_console.print(Text.assemble(("error:", "bold red"), " ", message), soft_wrap=True, highlight=False)


def fail(message: str) -> None:
    """Print a one-line error and exit 1 (for checks done in the CLI itself)."""
    print_error(message)
    raise typer.Exit(1)


def debug_requested(args: Sequence[str]) -> tuple[bool, list[str]]:
    """``(debug?, args without --debug)``: the flag may stand anywhere before ``--``; MOERGE_DEBUG=1 also sets it."""
    out, debug, literal = [], False, False
    for a in args:
        if a == "--":
            literal = True
        if a == DEBUG_FLAG and not literal:
            debug = True
            continue
        out.append(a)
    env = os.environ.get("MOERGE_DEBUG", "").strip().lower()
    return debug or env in ("1", "true", "yes", "on"), out


def describe_os_error(e: OSError) -> str:
    """One line for an OS error: what failed, on which file, and what to do."""
    from moerge.errors import MoergeError

    if isinstance(e, MoergeError) or (not e.errno and str(e)):
        return str(e)  # our own message already names the file and the fix
    what = e.strerror or str(e) or type(e).__name__
    where = f" {e.filename}" if e.filename else ""
    if e.filename2:
        where += f" -> {e.filename2}"
    hint = _OS_HINTS.get(e.errno or 0)
    if hint is None and isinstance(e, FileNotFoundError):
        hint = "check the path"
    return f"{what}:{where}" + (f" ({hint})" if hint else "")


def _click_kind(e: BaseException) -> str | None:
    """'usage', 'click', 'exit' or 'abort' for the exception classes of typer's click (vendored or not)."""
    import importlib

    for mod_name in ("typer._click.exceptions", "click.exceptions", "typer.exceptions"):
        mod = sys.modules.get(mod_name)
        if mod is None:
            try:
                mod = importlib.import_module(mod_name)
            except ImportError:
                continue
        for kind, cls_name in (
            ("usage", "UsageError"),
            ("click", "ClickException"),
            ("exit", "Exit"),
            ("abort", "Abort"),
        ):
            cls = getattr(mod, cls_name, None)
            if isinstance(cls, type) and isinstance(e, cls):
                return kind
    return None


def run_app(app: typer.Typer, argv: Sequence[str] | None = None) -> int:
    """Run ``app`` on ``argv`` (default: ``sys.argv[1:]``) and return the exit status (see the module doc)."""
    from moerge.errors import MoergeError, UsageError

    debug, args = debug_requested(list(sys.argv[1:] if argv is None else argv))

    def show_traceback() -> None:
        if debug:
            import traceback

            traceback.print_exc()

    try:
        rv = app(args=args, prog_name="moerge", standalone_mode=False)
    except UsageError as e:
        show_traceback()
        print_error(f"{e} (see `moerge --help`)")
        return 2
    except MoergeError as e:
        show_traceback()
        print_error(str(e))
        return 1
    except OSError as e:
        show_traceback()
        print_error(describe_os_error(e))
        return 1
    except KeyboardInterrupt:
        show_traceback()
        print_error("interrupted")
        return 130
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except MemoryError:
        show_traceback()
        print_error("out of memory; try a smaller batch, shard size or model, or a machine with more memory")
        return 1
    except Exception as e:
        kind = _click_kind(e)
        if kind in ("usage", "click"):
            show_traceback()
            e.show()  # click's own message: usage line, hint, "Error: ..."
            return int(getattr(e, "exit_code", 2 if kind == "usage" else 1))
        if kind == "exit":
            return int(getattr(e, "exit_code", getattr(e, "code", 0)) or 0)
        if kind == "abort":
            print_error("aborted")
            return 1
        show_traceback()
        detail = str(e).splitlines()[0][:300] if str(e) else ""
        print_error(
            f"internal error ({type(e).__name__}{': ' + detail if detail else ''}); this is a bug in moerge. "
            f"Rerun with {DEBUG_FLAG} (or MOERGE_DEBUG=1) to see the traceback, and report it."
        )
        return 1
    if isinstance(rv, int) and not isinstance(rv, bool):
        return rv  # typer returns the code of a typer.Exit when not in standalone mode
    return 0
