"""The project's error type: every error mpo-jax raises on purpose is an `MpoError`.

An `MpoError` means the input was refused (a value, a file, a configuration, a model) and its
message says which and how to fix it. The command-line tools print it as one line,
`error: <message>`, and exit with status 2; any other exception is a bug and keeps its
traceback.

Each error also keeps the built-in base its callers caught before it existed (`ValueError`,
`FileNotFoundError`, `ImportError`, ...), so `except ValueError` still works. The specific errors
live with the code that raises them and derive from `MpoError` or one of the general errors
here: `RubricError` and `ScaleError` (`mpo_jax.rubric`), `RubricTooLongError` (the judge),
`ConfigError` (`mpo_jax.train.config`), `CheckpointMismatchError`, `CheckpointCorruptError`,
`NoRestorableCheckpointError`, `RunDirError`, `ReportError`, `ExportError`,
`PresetNotFoundError` and `PresetIntegrityError`, `RemoteBackendError`, `CatalogUnavailableError`,
`NonFiniteUpdateError`.

This module is the lowest layer of the package and imports nothing.
"""

from __future__ import annotations

__all__ = ["FileFormatError", "InvalidValueError", "MissingDependencyError", "MissingFileError", "MpoError"]


class MpoError(Exception):
    """Base of every error mpo-jax raises on purpose; the message names the problem and the fix."""


class InvalidValueError(MpoError, ValueError):
    """A value mpo-jax was given is out of range or of the wrong kind: an argument, an option, a record."""


class FileFormatError(MpoError, ValueError):
    """A file mpo-jax reads is not in the form it expects: a JSONL line, a model, tokenizer or run file."""


class MissingFileError(MpoError, FileNotFoundError):
    """A file or folder mpo-jax was pointed to, or needs, does not exist."""


class MissingDependencyError(MpoError, ImportError):
    """A feature needs an optional package that is not installed; the message says how to install it."""
