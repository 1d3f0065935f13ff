"""Real-filesystem primitives the write side needs and `os` lacks: renameat2 flags and syncfs
(re-exported from syscalls.py), sparse copies with copy_file_range, metadata copies.  Pure
functions over real paths, each reached through a `fsat.Roots` (relative to a layer root's
fd, no path-length limit); they block, so bulk ones (`copy_data`) run in worker threads.
No shared state.
"""

from __future__ import annotations

import errno
import os
import stat

from .syscalls import (  # noqa: F401 (re-exported: the write side's callers use fsutil's names)
    AT_FDCWD,
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    RENAME_WHITEOUT,
    renameat2,
    syncfs,
)

TYPE_CHECKING = False  # typing's own constant, without importing typing before INIT (logs.py)
if TYPE_CHECKING:
    from .fsat import Roots


_KIND_NAMES = {
    stat.S_IFREG: "file",
    stat.S_IFDIR: "directory",
    stat.S_IFLNK: "symlink",
    stat.S_IFCHR: "char device",
    stat.S_IFBLK: "block device",
    stat.S_IFIFO: "fifo",
    stat.S_IFSOCK: "socket",
}


def kind_name(mode: int) -> str:
    """What a user calls the type of a file of this st_mode ("file", "char device", ...)."""
    return _KIND_NAMES.get(stat.S_IFMT(mode), "other")


def copy_data(fs: Roots, src: bytes, dst: bytes | int, mode: int = 0o600,
              sync: bool = False) -> None:  # fmt: skip
    """Copy a regular file's bytes into a new file: a path made here, or an fd open for
    writing on an empty file (an O_TMPFILE one), which stays open.  Holes stay holes
    (SEEK_DATA/SEEK_HOLE), and copy_file_range lets the filesystem reflink.  `sync`: fsync
    the new file (when it has bytes) before returning, so that its data is on disk before
    any rename or link makes it visible."""
    fin = fs.open(src, os.O_RDONLY)
    try:
        made = os.O_WRONLY | os.O_CREAT | os.O_EXCL
        fd = dst if isinstance(dst, int) else fs.open(dst, made, mode)
        try:
            size = os.fstat(fin).st_size
            copy_ranges(fin, fd, size)
            os.ftruncate(fd, size)
            if sync and size:
                os.fsync(fd)
        finally:
            if fd != dst:
                os.close(fd)
    finally:
        os.close(fin)


def copy_ranges(fin: int, fout: int, size: int) -> None:
    """The data of `fin` up to `size` into `fout` at the same offsets, holes left holes."""
    pos = 0
    while pos < size:
        try:
            data = os.lseek(fin, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only a hole remains
                return
            raise
        hole = os.lseek(fin, data, os.SEEK_HOLE)
        copy_between(fin, data, fout, data, hole - data)
        pos = hole


def copy_between(fin: int, off_in: int, fout: int, off_out: int, length: int) -> int:
    """copy_file_range(2) of up to `length` bytes from `fin` at `off_in` to `fout` at
    `off_out`, read and written by hand where the filesystems cannot (EXDEV: layers on two
    filesystems); the bytes copied (fewer at the end of `fin`)."""
    done = 0
    while done < length:
        try:
            n = os.copy_file_range(fin, fout, length - done, off_in + done, off_out + done)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                raise
            data = os.pread(fin, min(length - done, 1 << 20), off_in + done)
            n = os.pwrite(fout, data, off_out + done) if data else 0
        if n == 0:
            break
        done += n
    return done


def copy_xattrs(fs: Roots, src: bytes, dst: bytes | int, skip) -> None:  # type: ignore[no-untyped-def]
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


def copy_meta(fs: Roots, st: os.stat_result, dst: bytes | int) -> None:
    """Owner, mode (after chown, which clears setuid bits) and times, not following links;
    `dst` a path or an fd."""
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
