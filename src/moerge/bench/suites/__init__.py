"""Suites: the format (`Suite`, `Task`, `Example`, suite folders of YAML + JSONL) and the built-in suites
(`synthetic`, `real_text`), which share one cache/build module (`build`)."""

from moerge.bench.suites.format import (
    CONDITIONS,
    EvalBatch,
    Example,
    RoutingSpan,
    Suite,
    Task,
    collate,
    load_jsonl_suite,
    write_jsonl_suite,
)

__all__ = [
    "CONDITIONS",
    "EvalBatch",
    "Example",
    "RoutingSpan",
    "Suite",
    "Task",
    "collate",
    "load_jsonl_suite",
    "write_jsonl_suite",
]
