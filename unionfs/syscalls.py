"""The Linux calls `os` lacks, through libc: renameat2 (with its flags) and syncfs.

The bottom of unionfs's import graph: fsat (the *at layer) and fsutil (copies, metadata)
both build on it and it imports neither.  Thin wrappers that raise OSError like `os` does;
no state beyond the loaded libc; thread-safe.
"""

from __future__ import annotations

import ctypes
import os

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
RENAME_WHITEOUT = 4
AT_FDCWD = -100


def _load_libc() -> ctypes.CDLL:
    """glibc's soname directly; find_library (which runs ldconfig: ~10 ms of every mount's
    start-up) only where that is not it (musl)."""
    try:
        return ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        from ctypes.util import find_library  # here: importing it costs ~8 ms of start-up

        return ctypes.CDLL(find_library("c"), use_errno=True)


_libc = _load_libc()
_renameat2 = _libc.renameat2
_renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
_renameat2.restype = ctypes.c_int


def renameat2(
    src: bytes, dst: bytes, flags: int = 0, src_dir_fd: int = AT_FDCWD, dst_dir_fd: int = AT_FDCWD
) -> None:
    if _renameat2(src_dir_fd, src, dst_dir_fd, dst, flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), src, None, dst)


_syncfs = getattr(_libc, "syncfs", None)
if _syncfs is not None:
    _syncfs.argtypes = [ctypes.c_int]
    _syncfs.restype = ctypes.c_int


def syncfs(path: bytes | int) -> None:
    """syncfs(2) on the filesystem holding the directory `path` (or a directory fd), and only
    that one (os has no syncfs; os.sync would also write back every other filesystem — a FUSE
    mount among them, whose daemon may be the caller).  Without syncfs in libc: fsync."""
    if isinstance(path, int):  # an O_PATH fd cannot be synced: reopen it through /proc
        path = b"/proc/self/fd/%d" % path
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if _syncfs is None:
            os.fsync(fd)
        elif _syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"syncfs: {os.strerror(err)}", path)  # a write-back error
    finally:
        os.close(fd)
