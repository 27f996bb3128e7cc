"""Signs of life on long work, on stderr (so piped stdout stays clean) and only on a terminal.

    with status("dequantising model.gguf"):          # one line: spinner, what, elapsed time
        ...
    with bar("merging tensors", total=n) as advance:   # a bar; advance(k=1, description=None, total=None)
        for ...: advance()
    with quiet_transformers():                          # transformers' own "Loading weights" bars off
        AutoModelForCausalLM.from_pretrained(...)

    with stages("building synthetic-…") as stage:        # a long job's stages: a status line on a
        stage("expert 3/8 constant3")                   # terminal, one plain line each in a log

Nothing is shown when stderr is not a terminal (a log file, a CI run) or when ``enabled`` is False — except
`stages`, whose lines a log keeps; the bars are transient (gone once done), so a finished command leaves only its
own output.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

_CONSOLE: Any = None


def stderr_console() -> Any:
    """The one stderr console every bar and status line uses (so they nest: a training bar inside a status)."""
    global _CONSOLE
    if _CONSOLE is None:
        from rich.console import Console

        _CONSOLE = Console(stderr=True)
    return _CONSOLE


def shown(enabled: bool = True) -> bool:
    """Whether progress would be shown: asked for, and stderr is a terminal."""
    return enabled and sys.stderr.isatty()


@contextmanager
def status(message: str, *, enabled: bool = True) -> Iterator[Callable[[str], None]]:
    """A one-line spinner with ``message`` and the elapsed time while the block runs; yields ``update(text)``."""
    if not shown(enabled):
        yield lambda text: None
        return
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    with Progress(
        SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
        console=stderr_console(), transient=True, refresh_per_second=8,
    ) as p:  # fmt: skip
        task = p.add_task(message, total=None)
        yield lambda text: p.update(task, description=text)


@contextmanager
def bar(
    description: str, total: int | None, *, enabled: bool = True, transient: bool = True
) -> Iterator[Callable[..., None]]:
    """A progress bar over ``total`` steps (None: not known yet); yields ``advance(n=1, description=None,
    total=None)``."""
    if not shown(enabled):
        yield lambda n=1, description=None, total=None: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=stderr_console(), transient=transient, refresh_per_second=8,
    ) as p:  # fmt: skip
        task = p.add_task(description, total=total)

        def advance(n: int = 1, description: str | None = None, total: int | None = None) -> None:
            extra: dict[str, Any] = {"description": description} if description else {}
            if total is not None:
                extra["total"] = total
            p.update(task, advance=n, **extra)

        yield advance


@contextmanager
def stages(title: str, *, enabled: bool = True) -> Iterator[Callable[[str], None]]:
    """The stages of a long job (minutes to hours, often run with stderr to a log); yields ``stage(text)``. On a
    terminal: one status line ``title: text`` with a spinner and the elapsed time (nested bars, e.g. training
    steps, show beneath it). Otherwise: one plain line per stage on stderr, ``[mm:ss] title: text``, so a log
    shows where the job is (call it per unit of work, not per step). Nothing when ``enabled`` is False."""
    if not enabled:
        yield lambda text: None
        return
    if shown(enabled):
        with status(title) as update:
            yield lambda text: update(f"{title}: {text}")
        return
    start = time.monotonic()

    def stage(text: str) -> None:
        seconds = int(time.monotonic() - start)
        print(f"[{seconds // 60:02d}:{seconds % 60:02d}] {title}: {text}", file=sys.stderr, flush=True)

    yield stage


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' own progress bars ("Loading weights", GGUF conversion) and info/warning chatter
    for the block (moerge shows its own status line instead); the previous settings are restored after."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # transformers not installed: nothing to silence
        yield
        return
    bars = hf_logging.is_progress_bar_enabled()
    verbosity = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
