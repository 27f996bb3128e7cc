"""moerge.merging: parameter aggregation. A registry of merge methods (pure functions over stacked tensors),
streamed full-checkpoint merges, LoRA merges with an explicit mode (exact / factor / svd / dense), data
statistics for Fisher and RegMean, greedy soup, and the ``merge(...)`` entry point."""

from moerge.merging.registry import (
    MethodSpec,
    available_methods,
    get_method,
    merge_tensor,
    register_merge_method,
)
from moerge.merging.spec import merge_method

__all__ = [
    "MethodSpec",
    "available_methods",
    "get_method",
    "merge",
    "merge_method",
    "merge_tensor",
    "register_merge_method",
]


def __getattr__(name: str):
    if name == "merge":
        from moerge.merging.api import merge

        return merge
    raise AttributeError(name)
