"""Domain exceptions of the union filesystem, each carrying the errno it stands for.

The model raises these (or plain `OSError` from the real layers); only the FUSE adapter
turns them into `pyfuse3.FUSEError`, in one place.  No concurrency concerns: plain values.
"""

from __future__ import annotations

import errno


class UnionError(Exception):
    """Base class: a failure of the union model that maps to one errno."""

    errno: int = errno.EIO

    def __init__(self, message: str = "", err: int | None = None) -> None:
        super().__init__(message or self.__class__.__name__)
        if err is not None:
            self.errno = err


class NotFound(UnionError):
    errno = errno.ENOENT


class NotADirectory(UnionError):
    errno = errno.ENOTDIR


class NotEmpty(UnionError):
    errno = errno.ENOTEMPTY


class NameTooLong(UnionError):
    """A name longer than the layers' filesystems allow (NAME_MAX, usually 255 bytes)."""

    errno = errno.ENAMETOOLONG


class Exists(UnionError):
    errno = errno.EEXIST


class StaleHandle(UnionError):
    """An inode or file handle the model no longer knows (a kernel/daemon mismatch)."""

    errno = errno.ESTALE


class OptionError(ValueError):
    """A bad mount option or command line; the message names the problem for the user."""


class WorkDirUnusable(OSError):
    """The work dir could not be made ready (a full or read-only upper filesystem): the
    mount goes on read-only, as kernel overlayfs's ("mounting read-only")."""
