"""Executors for moerge's expensive fan-outs (training many experts, computing signatures, running a
benchmark's recipes): ``local`` runs the items one after another in this process (the default); ``ray`` runs
each item as a Ray task (`ray.init()` on first use when no cluster is connected — a local one with this
machine's cores, or the cluster named by ``RAY_ADDRESS``).

The work function and its items must be picklable (module-level functions; plain data, tensors); results come
back in the order of the items. Whatever writes to a library stays in the calling process: workers return
experts and tensors, the caller stores them — so a library is written by one process, as its lock expects.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal, Protocol, TypeVar

from moerge.errors import MoergeError

T = TypeVar("T")
R = TypeVar("R")

ExecutorName = Literal["local", "ray"]
RAY_INSTALL = "pip install 'moerge[ray]'  (or: pip install ray)"


class ExecutorError(MoergeError):
    """An executor could not be started (Ray missing or its cluster unreachable)."""


class Executor(Protocol):
    name: str

    def map(
        self,
        fn: Callable[..., R],
        items: Sequence[T],
        *,
        shared: Any = None,
        on_done: Callable[[int, R], None] | None = None,
    ) -> list[R]:
        """``[fn(item) for item in items]`` — or ``fn(item, shared)`` when ``shared`` is given (a large object
        every item needs, e.g. the base model: sent to the workers once); ``on_done(i, result)`` as item ``i``
        finishes (in completion order, in this process: where results are stored as they come)."""
        ...


class LocalExecutor:
    """One item after another, in this process."""

    name = "local"

    def map(
        self,
        fn: Callable[..., R],
        items: Sequence[T],
        *,
        shared: Any = None,
        on_done: Callable[[int, R], None] | None = None,
    ) -> list[R]:
        out = []
        for i, item in enumerate(items):
            out.append(fn(item) if shared is None else fn(item, shared))
            if on_done is not None:
                on_done(i, out[-1])
        return out


class RayExecutor:
    """Each item a Ray task with ``num_cpus`` CPUs (one by default). ``init`` are `ray.init` keyword arguments
    for when no Ray cluster is connected yet (e.g. ``num_cpus=2`` for a local instance)."""

    name = "ray"

    def __init__(self, num_cpus: float = 1, **init: Any):
        try:
            import ray
        except ImportError:
            raise ExecutorError(f"--executor ray needs Ray, which is not installed: {RAY_INSTALL}") from None
        self.ray = ray
        self.num_cpus = num_cpus
        if not ray.is_initialized():
            init.setdefault("include_dashboard", False)
            init.setdefault("log_to_driver", False)
            try:
                ray.init(**init)
            except Exception as e:  # a RAY_ADDRESS that does not answer, a port in use …
                raise ExecutorError(
                    f"could not start or reach Ray ({type(e).__name__}: {e}); check RAY_ADDRESS"
                ) from None

    def map(
        self,
        fn: Callable[..., R],
        items: Sequence[T],
        *,
        shared: Any = None,
        on_done: Callable[[int, R], None] | None = None,
    ) -> list[R]:
        ray = self.ray
        remote = ray.remote(num_cpus=self.num_cpus, max_retries=0)(fn)
        if shared is None:
            refs = [remote.remote(item) for item in items]
        else:
            shared_ref = ray.put(shared)  # one copy in the object store, dereferenced in each worker
            refs = [remote.remote(item, shared_ref) for item in items]
        index = {ref: i for i, ref in enumerate(refs)}
        results: dict[int, R] = {}
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            for ref in done:
                try:
                    result = ray.get(ref)  # a failed task's error is raised here
                except ray.exceptions.RayTaskError as e:
                    cause = getattr(e, "cause", None)
                    if isinstance(cause, MoergeError):  # a user-facing error inside a task: raised as itself
                        raise cause from None
                    raise
                results[index[ref]] = result
                if on_done is not None:
                    on_done(index[ref], result)
        return [results[i] for i in range(len(refs))]


def get_executor(name: str, **options: Any) -> Executor:
    """The executor called ``name`` (``local`` or ``ray``)."""
    if name == "local":
        return LocalExecutor()
    if name == "ray":
        return RayExecutor(**options)
    raise ExecutorError(f"unknown executor {name!r}: use local or ray")
