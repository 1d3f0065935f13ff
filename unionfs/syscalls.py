"""The Linux calls `os` lacks, through libc: renameat2 (with its flags), syncfs, fallocate
(with its modes), linkat with AT_EMPTY_PATH, and the file-handle calls and filesystem uuid
that overlayfs's origin needs (origin.py).

The bottom of unionfs's import graph: fsat (the *at layer) and fsutil (copies, metadata)
both build on it and it imports neither.  Thin wrappers that raise OSError like `os` does;
no state beyond the loaded libc; thread-safe.
"""

from __future__ import annotations

import ctypes
import errno
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


_fallocate = getattr(_libc, "fallocate64", None) or getattr(_libc, "fallocate", None)
if _fallocate is not None:
    _fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    _fallocate.restype = ctypes.c_int


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with its `mode` (os has only posix_fallocate, mode 0): FUSE's FALLOCATE
    passes KEEP_SIZE, PUNCH_HOLE and ZERO_RANGE on to the upper file as they come."""
    if _fallocate is None:
        raise OSError(errno.EOPNOTSUPP, "fallocate: not in libc")
    if _fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


_linkat = _libc.linkat
_linkat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
_linkat.restype = ctypes.c_int
AT_EMPTY_PATH = 0x1000


def link_fd(fd: int, dst: bytes, dst_dir_fd: int = AT_FDCWD) -> None:
    """linkat(fd, "", dst_dir_fd, dst, AT_EMPTY_PATH): a new name for the file open as `fd`,
    which may have none (an O_TMPFILE file opened without O_EXCL; one whose last link went:
    ENOENT).  Needs CAP_DAC_READ_SEARCH before Linux 6.10."""
    if _linkat(fd, b"", dst_dir_fd, dst, AT_EMPTY_PATH) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), dst)


_statx = getattr(_libc, "statx", None)
if _statx is not None:
    _statx.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint, ctypes.c_void_p]
    _statx.restype = ctypes.c_int
STATX_BTIME = 0x800
AT_SYMLINK_NOFOLLOW = 0x100


def btime(path: bytes, dir_fd: int = AT_FDCWD) -> tuple[int, int] | None:
    """The birth time (seconds, nanoseconds) of `path` (b"": the fd `dir_fd` itself), a final
    symlink not followed, or None where the filesystem keeps none (statx(2); os.stat has no
    st_birthtime on Linux before Python 3.12)."""
    if _statx is None:
        return None
    buf = ctypes.create_string_buffer(256)  # struct statx
    flags = AT_SYMLINK_NOFOLLOW | (AT_EMPTY_PATH if not path else 0)
    if _statx(dir_fd, path, flags, STATX_BTIME, buf) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    import struct

    (mask,) = struct.unpack_from("<I", buf.raw, 0)
    if not mask & STATX_BTIME:
        return None
    sec, nsec = struct.unpack_from("<qI", buf.raw, 80)  # stx_btime
    return sec, nsec


# ----- file handles (overlayfs's `origin`, origin.py) -----------------------------------
MAX_HANDLE_SZ = 128  # the kernel's limit for name_to_handle_at
FS_IOC_GETFSUUID = 0x80111500  # _IOR(0x15, 0, struct fsuuid2 { u8 len; u8 uuid[16]; })
_name_to_handle_at = getattr(_libc, "name_to_handle_at", None)
_open_by_handle_at = getattr(_libc, "open_by_handle_at", None)
if _name_to_handle_at is not None:
    _name_to_handle_at.argtypes = [
        ctypes.c_int, ctypes.c_char_p, ctypes.c_char_p, ctypes.POINTER(ctypes.c_int), ctypes.c_int
    ]  # fmt: skip
    _name_to_handle_at.restype = ctypes.c_int
if _open_by_handle_at is not None:
    _open_by_handle_at.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    _open_by_handle_at.restype = ctypes.c_int


def name_to_handle_at(path: bytes, dir_fd: int = AT_FDCWD) -> tuple[int, bytes]:
    """(handle type, handle bytes) of `path`, a final symlink not followed: what exportfs
    encodes, the same bytes kernel overlayfs stores as an origin.  OSError where the
    filesystem gives no handles (EOPNOTSUPP)."""
    import struct

    buf = ctypes.create_string_buffer(struct.pack("Ii", MAX_HANDLE_SZ, 0), 8 + MAX_HANDLE_SZ)
    mount_id = ctypes.c_int()
    if _name_to_handle_at is None:
        raise OSError(errno.ENOSYS, "name_to_handle_at: not in libc", path)
    if _name_to_handle_at(dir_fd, path, buf, ctypes.byref(mount_id), 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    size, kind = struct.unpack_from("Ii", buf.raw, 0)
    return kind, buf.raw[8 : 8 + size]


def open_by_handle_at(mount_fd: int, kind: int, handle: bytes, flags: int) -> int:
    """An fd of the object a handle names on the filesystem of `mount_fd` (needs
    CAP_DAC_READ_SEARCH; ESTALE when it no longer exists)."""
    import struct

    if _open_by_handle_at is None:
        raise OSError(errno.ENOSYS, "open_by_handle_at: not in libc")
    buf = ctypes.create_string_buffer(struct.pack("Ii", len(handle), kind) + handle)
    fd = _open_by_handle_at(mount_fd, buf, flags | os.O_CLOEXEC)
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return int(fd)


def fs_uuid(fd: int) -> bytes | None:
    """The uuid of the filesystem holding `fd` (its superblock's s_uuid, 16 bytes, zeros
    when it has none), or None where the kernel cannot say (FS_IOC_GETFSUUID, Linux 6.5)."""
    import fcntl

    buf = bytearray(17)
    try:
        fcntl.ioctl(fd, FS_IOC_GETFSUUID, buf)
    except OSError:
        return None
    return bytes(buf[1 : 1 + min(buf[0], 16)]).ljust(16, b"\0")
