"""``--experts A,B,C``: the option shared by every command that routes over a library (``generate``, ``bench``,
``library prepare``; a server reuses it), so routing can run over a named subset of a library's experts."""

from __future__ import annotations

import typer

EXPERTS_OPTION_HELP = (
    "Route over these experts of the library only, in this order (comma-separated names, repeatable; default: "
    "every LoRA expert). Experts outside the subset need no routing artifacts."
)


def experts_option(help: str = EXPERTS_OPTION_HELP) -> list[str]:
    return typer.Option([], "--experts", help=help, metavar="A,B,C")


def parse_experts(values: list[str] | None) -> list[str] | None:
    """``["a,b", "c"]`` → ``["a", "b", "c"]``; None when none given. A name given twice is a usage error."""
    names = [n.strip() for v in values or [] for n in v.split(",") if n.strip()]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        from moerge.errors import UsageError

        raise UsageError(f"--experts names {', '.join(twice)} more than once; name each expert once")
    return names or None
