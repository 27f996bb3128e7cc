"""How far signature computation is: `prepare_signatures` reports each (signature, expert) it computes and the
inner steps of that computation (gate-training steps) to a `SignatureProgress`. The base class ignores them;
`RichSignatureProgress` shows them as bars in a `rich.progress.Progress` (the CLI's own, or the benchmark's)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class SignatureProgress:
    """Progress hooks of signature computation (every method a no-op here)."""

    def add(self, total: int) -> None:
        """``total`` more (signature, expert) computations are about to run."""

    def start(self, label: str) -> None:
        """One computation starts (``label``: e.g. ``phatgoose_gates · expert3``)."""

    def steps(self, done: int, total: int) -> None:
        """``done`` of ``total`` inner steps of the current computation are done."""

    def describe(self, text: str) -> None:
        """Free text from a computation (``BuildContext.describe``)."""

    def finish(self) -> None:
        """The current computation finished."""


class DescribeProgress(SignatureProgress):
    """Progress as one line of text (``describe(text)``), for a caller that shows a description only."""

    def __init__(self, describe: Callable[[str], None]):
        self._describe = describe
        self._label = ""

    def start(self, label: str) -> None:
        self._label = label
        self._describe(label)

    def steps(self, done: int, total: int) -> None:
        self._describe(f"{self._label} step {done}/{total}")

    def describe(self, text: str) -> None:
        self._describe(text)


class RichSignatureProgress(SignatureProgress):
    """Two bars in ``progress`` (a `rich.progress.Progress`, started at the first computation if it is not
    live yet): the computations done (advanced per expert and signature, described by the current one) and the
    current one's steps (shown while it has steps)."""

    def __init__(self, progress: Any, title: str = "routing artifacts"):
        self.progress = progress
        self.title = title
        self.task: Any = None
        self.step_task: Any = None
        self.total = 0

    def add(self, total: int) -> None:
        if total <= 0:
            return
        self.total += total
        if self.task is None:
            if not self.progress.live.is_started:  # shown from the first computation on, not before
                self.progress.start()
            self.task = self.progress.add_task(self.title, total=self.total)
        else:
            self.progress.update(self.task, total=self.total)

    def start(self, label: str) -> None:
        if self.task is not None:
            self.progress.update(self.task, description=f"{self.title}: {label}")

    def steps(self, done: int, total: int) -> None:
        if self.step_task is None:
            self.step_task = self.progress.add_task("  steps", total=total)
        self.progress.update(self.step_task, completed=done, total=total)

    def describe(self, text: str) -> None:
        if self.task is not None:
            self.progress.update(self.task, description=f"{self.title}: {text}")

    def finish(self) -> None:
        if self.step_task is not None:
            self.progress.remove_task(self.step_task)
            self.step_task = None
        if self.task is not None:
            self.progress.advance(self.task)

    def close(self) -> None:
        """Mark the computations bar done (left on screen with its count)."""
        if self.task is not None:
            self.progress.update(self.task, description=self.title)


def as_progress(progress: SignatureProgress | Callable[[str], None] | None) -> SignatureProgress:
    """A `SignatureProgress` from one, a ``describe(text)`` callable, or None."""
    if isinstance(progress, SignatureProgress):
        return progress
    return DescribeProgress(progress) if progress is not None else SignatureProgress()
