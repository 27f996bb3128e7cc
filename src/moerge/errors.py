"""Every user-facing error moerge raises: one tree under `MoergeError`.

Each message names the file or thing at fault and says what to do. The CLI prints a `MoergeError` as one
``error:`` line (exit 1) without a traceback. Modules import their errors from here, never define their own,
so a caller can catch any moerge error (or a family of them) from one place.
"""

from __future__ import annotations


class MoergeError(Exception):
    """Base class for user-facing errors; the CLI prints these as one line, without a traceback."""


# ---------------------------------------------------------------------------------- input files and formats
class UnsafeFormatError(MoergeError):
    """A pickle-based file (.bin, .pt, .pkl, .ckpt) was offered; moerge never unpickles."""


class ConfigWarning(UserWarning):
    """A configuration holds something moerge ignores, as mergekit does (a per-model parameter the method does
    not use); the CLI prints it as one ``warning:`` line."""


class MalformedConfigError(MoergeError):
    """A configuration file (adapter_config.json, metadata, YAML) cannot be read or validated."""


class DataFormatError(MoergeError):
    """A training or evaluation data file (JSONL) or example cannot be read."""


class SuiteError(MalformedConfigError):
    """A suite folder, its suite.yaml or its task files cannot be read or validated."""


# ---------------------------------------------------------------------------------- experts and libraries
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


class LibraryError(MoergeError):
    """The library folder is missing, corrupt or not a moerge library."""


class AdmissionRefusedError(LibraryError):
    """The library's admission policy refused an expert (the checks that failed are in the message)."""


class AdmissionRequiredError(LibraryError):
    """The library has an admission policy and an add came without an admission report."""


class HubError(MoergeError):
    """A Hugging Face Hub repo could not be read or written (not in the cache offline, not found, no access)."""


# ---------------------------------------------------------------------------------- models and data sources
class ModelLoadError(MoergeError):
    """A base model cannot be found or loaded (missing file, missing optional package, offline hub)."""


class EmbedderError(MoergeError):
    """An embedder cannot be built (missing optional package or model files)."""


class SourceMissingError(MoergeError):
    """The text of a real-text domain is not installed."""


# ---------------------------------------------------------------------------------- routing and recipes
class RoutingError(MoergeError):
    """A routed call cannot be made as asked (missing per-call inputs, nested calls, unsupported mode)."""


class RecipeNotApplicableError(MoergeError):
    """A recipe cannot run in the requested setting, per its taxonomy record (or lacks its artifacts)."""


class UnknownNameError(MalformedConfigError):
    """A recipe, merge method or baseline name (in a config, a flag or a call) that is not registered."""


class PluginError(MoergeError):
    """A plugin (``--plugin MODULE_OR_FILE`` or an installed entry point) cannot be loaded or is malformed."""


# ---------------------------------------------------------------------------------- command line, paths, outputs
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
