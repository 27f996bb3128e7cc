"""Errors raised by moerge for bad input. Each message names the file or thing at fault and the fix."""

from __future__ import annotations


class MoergeError(Exception):
    """Base class for user-facing errors; the CLI prints these as one line, without a traceback."""


class UnsafeFormatError(MoergeError):
    """A pickle-based file (.bin, .pt, .pkl, .ckpt) was offered; moerge never unpickles."""


class BaseModelMismatchError(MoergeError):
    """An expert was trained on a different base model than the library or model it is offered to."""


class ShapeMismatchError(MoergeError):
    """Tensor shapes do not fit together (LoRA factors, experts on one module, models to merge)."""


class NonFiniteWeightsError(MoergeError):
    """A tensor holds NaN or Inf."""


class ExpertExistsError(MoergeError):
    """An expert of that name is already in the library."""


class ExpertNotFoundError(MoergeError):
    """No expert of that name is in the library."""


class MalformedConfigError(MoergeError):
    """A configuration file (adapter_config.json, metadata, YAML) cannot be read or validated."""


class LibraryError(MoergeError):
    """The library folder is missing, corrupt or not a moerge library."""


class RecipeNotApplicableError(MoergeError):
    """A recipe cannot run in the requested setting, per its taxonomy record."""
