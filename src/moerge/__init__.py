"""moerge: recycle a library of expert models by routing among them and merging them.

Public names are imported lazily so that ``import moerge`` (and ``moerge --help``) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "Expert": "moerge.experts.expert",
    "ExpertMetadata": "moerge.experts.expert",
    "LoraModule": "moerge.experts.expert",
    "ExpertLibrary": "moerge.experts.library",
    "train_expert": "moerge.train.lora",
    "TrainConfig": "moerge.train.lora",
    "build_tiny_model": "moerge.backbones.tiny",
    "save_tiny_model": "moerge.backbones.tiny",
    "TinyModelConfig": "moerge.backbones.tiny",
    "attach": "moerge.recipes.facade",
    "PagingConfig": "moerge.model.routed",
    "detach": "moerge.model.routed",
    "merge": "moerge.merging.api",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'moerge' has no attribute {name!r}")
