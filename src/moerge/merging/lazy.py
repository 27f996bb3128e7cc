"""``torch``, imported on first attribute access.

The merge methods, the registry and the checkpoint engine use torch, but planning a merge (parsing the YAML,
validating parameters against a method's spec) and the numpy engine (`moerge.merging.numpy_engine`) need none of
it. Importing torch is 1.5 s — most of a small merge's wall time — so these modules bind ``torch`` to this proxy
and the import happens when a tensor is first made::

    if TYPE_CHECKING:
        import torch
    else:
        from moerge.merging.lazy import torch

Module-level code of such a module must not touch ``torch.<anything>`` (that would import it at once);
``tests/merging/test_numpy_engine.py`` checks that a linear merge never imports torch.
"""

from __future__ import annotations

import importlib
import types
from typing import Any


class LazyModule(types.ModuleType):
    """A stand-in for module ``name`` that imports it when an attribute is first read. Every read is passed on
    to the real module (nothing is copied), so a test that monkeypatches ``torch.bernoulli`` is seen here too."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self._module: types.ModuleType | None = None

    def __getattr__(self, attr: str) -> Any:
        if self._module is None:
            self._module = importlib.import_module(self.__name__)
        return getattr(self._module, attr)


torch = LazyModule("torch")
