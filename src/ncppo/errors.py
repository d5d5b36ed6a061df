"""Expected failures: what the `ncppo` command reports as one line instead of a traceback.

Raise `InputError` (a `ValueError`) for a bad flag, file, folder, row or column, and
`MissingInputError` (also a `FileNotFoundError`) for one that does not exist; the message names
the flag or path. `RunError` is an expected failure of the run itself (a full disk while saving,
a checkpoint that does not fit the run). `ncppo.cli.main` prints these (and `ConfigError`) as
`ncppo <command>: error: <message>` with exit code 2; `--debug` shows the traceback. Anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations


class NcppoError(Exception):
    """Base of the expected failures the CLI reports in one line."""


class InputError(NcppoError, ValueError):
    """A flag, file, folder, row or column the command cannot use; the message names it."""


class MissingInputError(InputError, FileNotFoundError):
    """A file or folder a flag names does not exist (or lacks a required part)."""


class RunError(NcppoError, RuntimeError):
    """The run cannot go on for a reason outside the code: full disk, a checkpoint of another run."""


class OutputExistsError(InputError, FileExistsError):
    """An output folder a flag names exists and would be overwritten."""


class MissingPackageError(InputError, ImportError):
    """An optional package a flag needs is not installed; the message says what to install."""


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (library errors can run to many lines)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
