"""Exit codes of `layer`, and the one mapping from exceptions to them.

Commands raise; they never print an error or call `sys.exit`.  `main.py` catches whatever a
command raises, asks `describe` for the exit code and the message, and prints it as
`layer: error: MESSAGE`.  Only an internal error (a bug) comes with a traceback.
Stable codes (scripts may rely on them):

    0    success
    1    the operation failed (a mount failed, a path is not mounted, an I/O error, ...)
    2    usage or bad input (also click's own usage errors); an image that does not exist
         (as skopeo)
    125  internal error: a bug in layer
"""

from __future__ import annotations

import errno
import os
import sys

from imagestore import errors as store_errors
from unionfs.errors import OptionError, UnionError

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERNAL = 125


class CliError(Exception):
    """A failure the user should read about; carries its exit code."""

    exit_code = EXIT_FAILURE

    def __init__(self, message: str | None = None, exit_code: int | None = None) -> None:
        super().__init__(message or "")
        self.message = message
        if exit_code is not None:
            self.exit_code = exit_code


class BadInput(CliError):
    """The command line or its arguments make no sense (exit 2)."""

    exit_code = EXIT_USAGE


class NotMounted(CliError):
    """The path given is not a mountpoint."""


class AlreadyMounted(CliError):
    """Something is mounted on the path already (we do not stack mounts)."""


class ToolFailed(CliError):
    """A helper program failed.  With no message it already told the user on stderr."""


class DemoFailed(CliError):
    """The demo's merged view did not show what the union rules promise."""


# the store this run opened (`note_store`), named when a write fails for want of space
_store_root: str | None = None


def note_store(root: str) -> None:
    global _store_root
    _store_root = root


def describe(exc: BaseException) -> tuple[int, str | None, bool]:
    """(exit code, message or None for "already reported", whether a traceback helps)."""
    if isinstance(exc, CliError):
        return exc.exit_code, exc.message, False
    if isinstance(exc, OptionError):
        return EXIT_USAGE, str(exc), False
    if isinstance(exc, (store_errors.ImageNotFound, store_errors.BadReference)):
        return EXIT_USAGE, str(exc), False
    if isinstance(exc, store_errors.StoreError):
        return EXIT_FAILURE, str(exc), False
    if isinstance(exc, UnionError):
        return EXIT_FAILURE, f"{exc} ({os.strerror(exc.errno)})", False
    sp = sys.modules.get("subprocess")  # not imported: no TimeoutExpired (saves ~5 ms a run)
    if sp is not None and isinstance(exc, sp.TimeoutExpired):
        cmd = exc.cmd[0] if isinstance(exc.cmd, list | tuple) else exc.cmd
        return EXIT_FAILURE, f"{cmd} did not finish within {exc.timeout:g}s", False
    if isinstance(exc, OSError):
        return EXIT_FAILURE, _describe_oserror(exc), False
    return EXIT_INTERNAL, f"internal error: {type(exc).__name__}: {exc}", True


def _describe_oserror(exc: OSError) -> str:
    text = exc.strerror or str(exc)
    if exc.filename is None and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        # a write to an fd names no file: say where the store is, the likely place
        where = f"; the store is at {_store_root}" if _store_root else ""
        return f"{text} (a filesystem this command writes to is full{where})"
    if exc.filename is not None and exc.filename2 is not None:
        return f"{os.fsdecode(exc.filename)} -> {os.fsdecode(exc.filename2)}: {text}"
    if exc.filename is not None:
        return f"{os.fsdecode(exc.filename)}: {text}"
    return text


def status_of(returncode: int) -> int:
    """A child's exit status as ours: its code, or 128+N when killed by signal N (as sh)."""
    return 128 - returncode if returncode < 0 else returncode
