"""Experts and the library where they live. Names are imported lazily (listing a library needs no torch)."""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "Expert": "moerge.experts.expert",
    "LoraModule": "moerge.experts.expert",
    "ExpertMetadata": "moerge.experts.metadata",
    "ExpertLibrary": "moerge.experts.library",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'moerge.experts' has no attribute {name!r}")
