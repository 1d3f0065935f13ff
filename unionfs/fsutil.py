"""Real-filesystem primitives the write side needs and `os` lacks: renameat2 flags, syncfs,
sparse copies with copy_file_range, metadata copies.  Pure functions over real paths, each
reached through a `fsat.Roots` (relative to a layer root's fd, no path-length limit); they
block, so bulk ones (`copy_data`) run in worker threads.  No shared state.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .fsat import Roots

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


def make_whiteout(fs: Roots, path: bytes) -> None:
    """A kernel-format whiteout: a character device 0/0."""
    fs.mknod(path, stat.S_IFCHR | 0o000, os.makedev(0, 0))


def copy_data(fs: Roots, src: bytes, dst: bytes, mode: int = 0o600) -> None:
    """Copy a regular file's bytes into a new file, keeping holes (SEEK_DATA/SEEK_HOLE) and
    using copy_file_range, which the filesystem may turn into a reflink."""
    fin = fs.open(src, os.O_RDONLY)
    try:
        fd = fs.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        try:
            size = os.fstat(fin).st_size
            _copy_ranges(fin, fd, size)
            os.ftruncate(fd, size)
        finally:
            os.close(fd)
    finally:
        os.close(fin)


def _copy_ranges(fin: int, fout: int, size: int) -> None:
    pos = 0
    while pos < size:
        try:
            data = os.lseek(fin, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only a hole remains
                return
            raise
        hole = os.lseek(fin, data, os.SEEK_HOLE)
        _copy_range(fin, fout, data, hole - data)
        pos = hole


def _copy_range(fin: int, fout: int, offset: int, length: int) -> None:
    done = 0
    while done < length:
        try:
            n = os.copy_file_range(fin, fout, length - done, offset + done, offset + done)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                raise
            n = _copy_plain(fin, fout, offset + done, length - done)
        if n == 0:
            return
        done += n


def _copy_plain(fin: int, fout: int, offset: int, length: int) -> int:
    data = os.pread(fin, min(length, 1 << 20), offset)
    return os.pwrite(fout, data, offset) if data else 0


def copy_xattrs(fs: Roots, src: bytes, dst: bytes, skip) -> None:  # type: ignore[no-untyped-def]
    """Copy every xattr for which `skip(name)` is false (internal markers stay behind)."""
    try:
        names = fs.listxattr(src)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EPERM):
            return
        raise
    for raw in names:
        name = os.fsencode(raw)
        if skip(name):
            continue
        try:
            value = fs.getxattr(src, name)
            fs.setxattr(dst, name, value)
        except OSError as exc:
            if exc.errno not in (errno.ENOTSUP, errno.EPERM, errno.ENODATA):
                raise


def copy_meta(fs: Roots, st: os.stat_result, dst: bytes) -> None:
    """Owner, mode (after chown, which clears setuid bits) and times, not following links."""
    fs.chown(dst, st.st_uid, st.st_gid)
    if not stat.S_ISLNK(st.st_mode):
        fs.chmod(dst, stat.S_IMODE(st.st_mode))
    fs.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))


def make_like(fs: Roots, st: os.stat_result, src: bytes, dst: bytes) -> None:
    """Create at `dst` a non-regular, non-directory object like `src` (no data to copy)."""
    kind = stat.S_IFMT(st.st_mode)
    if kind == stat.S_IFLNK:
        fs.symlink(fs.readlink(src), dst)
    elif kind in (stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO, stat.S_IFSOCK):
        fs.mknod(dst, kind | 0o600, st.st_rdev)
    else:
        raise OSError(errno.EINVAL, "cannot copy this kind of object", src)
