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


class UsageError(MoergeError):
    """The command line was used wrongly (a missing or contradictory argument); the CLI exits with status 2."""

    exit_code = 2


class UnsafePathError(MoergeError):
    """A path read from a library, an expert's files or a config points outside the folder it must stay in
    (an absolute path, ``..``, or a symlink leaving the folder); nothing is read, written or deleted there."""


class ChecksumMismatchError(LibraryError):
    """An expert's file no longer matches the checksum recorded when it was added (bit rot or an edit)."""


class LibraryLockedError(LibraryError):
    """Another process holds the library's write lock longer than the lock timeout."""


class OutputExistsError(MoergeError):
    """The output folder already holds files (or is one of the inputs); pass --overwrite, or pick a new one."""


class ParameterRangeError(MalformedConfigError):
    """A merge parameter lies outside the range where the method means anything (density, t, weights …)."""


class InputNotFoundError(MoergeError, FileNotFoundError):
    """A file or folder the user named (an adapter, a model, a config, a data file) does not exist. Also a
    `FileNotFoundError`, so code that catches that keeps working."""
