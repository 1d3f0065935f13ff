"""The FUSE vocabulary of the handler layer (operations.py): FUSEError, FileInfo, StatvfsData,
ENOATTR, ...  Under the pyfuse3 transport these are pyfuse3's own, because its C code
type-checks what the handlers return and answers only its own FUSEError with an errno.  Under
the native transport, which packs every reply itself (fuse/bridge.py), they are plain-Python
stand-ins with the same names, fields and defaults, so a native mount never imports pyfuse3:
that import costs ~13 ms of every mount's start-up (9.5 of them pyfuse3's own import of
importlib.metadata), and podman pays a mount's start-up at every container start.

Chosen once per process, when this module is first imported: pyfuse3's when `LAYERFS_FUSE`
says pyfuse3 (the daemon sets it from `-o fuse=` before it imports the handlers), the
stand-ins otherwise.
Concurrency: import time only; plain values.
"""

from __future__ import annotations

import errno
import os

PYFUSE3 = os.environ.get("LAYERFS_FUSE") == "pyfuse3"

if PYFUSE3:
    from pyfuse3 import (
        ENOATTR,
        RENAME_EXCHANGE,
        EntryAttributes,
        FileInfo,
        FUSEError,
        Operations,
        RequestContext,
        SetattrFields,
        StatvfsData,
        get_sup_groups,
        readdir_reply,
    )
else:
    ENOATTR = errno.ENODATA  # what pyfuse3 calls it
    RENAME_EXCHANGE = 2  # renameat2's flag, as the kernel sends it
    EntryAttributes = None  # type: ignore[assignment,misc]  # the native transport: operations.Attrs
    readdir_reply = None  # type: ignore[assignment]  # ... and its own emission function

    class FUSEError(Exception):  # type: ignore[no-redef]
        """A handler's failure with the errno to answer (pyfuse3.FUSEError's shape)."""

        def __init__(self, errno_: int) -> None:
            super().__init__(errno_)
            self.errno = errno_

        def __str__(self) -> str:
            return os.strerror(self.errno)

    class FileInfo:  # type: ignore[no-redef]
        __slots__ = ("fh", "direct_io", "keep_cache", "nonseekable")

        def __init__(self, fh: int = 0, direct_io: bool = False, keep_cache: bool = True,
                     nonseekable: bool = False) -> None:  # fmt: skip
            self.fh, self.direct_io = fh, direct_io
            self.keep_cache, self.nonseekable = keep_cache, nonseekable

    class StatvfsData:  # type: ignore[no-redef]
        __slots__ = ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files",
                     "f_ffree", "f_favail", "f_namemax")  # fmt: skip

        def __init__(self) -> None:
            for name in self.__slots__:
                setattr(self, name, 0)

    class SetattrFields:  # type: ignore[no-redef]
        """Only a type here: the native transport's setattr builds its own (fuse/bridge.py)."""

    class Operations:  # type: ignore[no-redef]
        pass

    class RequestContext:  # type: ignore[no-redef]
        """Never made: the native transport's requests carry fuse/bridge.py's Ctx."""

    def get_sup_groups(pid: int) -> set[int]:  # type: ignore[misc]
        """The supplementary groups of process `pid` (pyfuse3.get_sup_groups)."""
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Groups:"):
                    return {int(x) for x in line.split()[1:]}
        raise RuntimeError(f"no Groups line in /proc/{pid}/status")


__all__ = [
    "ENOATTR", "RENAME_EXCHANGE", "EntryAttributes", "FileInfo", "FUSEError", "Operations",
    "RequestContext", "SetattrFields", "StatvfsData", "get_sup_groups", "readdir_reply",
    "PYFUSE3",
]  # fmt: skip
