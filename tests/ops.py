"""File operations applied identically to several mounted trees, with their outcome recorded.

An outcome is ("ok", value) or ("err", errno name): the differential tests compare them
between layerfs and kernel overlayfs, step by step.
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

from unionfs import fsutil, syscalls


def outcome(fn, *args):
    try:
        return ("ok", fn(*args))
    except OSError as exc:
        return ("err", errno.errorcode.get(exc.errno or 0, str(exc.errno)))


def value_or_errno(fn, *args):
    """What `fn(*args)` returns, or the name of the errno it fails with (`outcome`'s value)."""
    return outcome(fn, *args)[1]


def write(root: Path, path: str, data: bytes, how: str):
    flags = {
        "w": os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
        "a": os.O_WRONLY | os.O_APPEND,
        "x": os.O_WRONLY | os.O_CREAT | os.O_EXCL,
        "r+": os.O_RDWR,
        "c": os.O_WRONLY | os.O_CREAT,
    }[how]
    fd = os.open(root / path, flags | os.O_NONBLOCK, 0o644)  # a FIFO must not block
    try:
        if how == "r+":
            os.pwrite(fd, data, 2)
        else:
            os.write(fd, data)
    finally:
        os.close(fd)


def read(root: Path, path: str) -> bytes:
    fd = os.open(root / path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        return os.read(fd, 1 << 16)
    finally:
        os.close(fd)


def rename(root: Path, src: str, dst: str, flags: int):
    fsutil.renameat2(bytes(root / src), bytes(root / dst), flags)


def chown(root: Path, path: str, uid: int, gid: int):
    os.chown(root / path, uid, gid, follow_symlinks=False)


def chmod(root: Path, path: str, mode: int):
    os.chmod(root / path, mode)


def truncate(root: Path, path: str, size: int):
    os.truncate(root / path, size)


def truncate_then_utime(root: Path, path: str, size: int):
    os.truncate(root / path, size)
    os.utime(root / path, (1_500_000_000, 1_500_000_000))


def utime(root: Path, path: str, mtime: int):
    os.utime(root / path, (mtime, mtime), follow_symlinks=False)


def setxattr(root: Path, path: str, value: bytes):
    os.setxattr(root / path, "user.k", value, follow_symlinks=False)


def removexattr(root: Path, path: str):
    os.removexattr(root / path, "user.k", follow_symlinks=False)


def setxattr_overlay(root: Path, path: str, value: bytes):
    """An overlay xattr set by a user (an overlay nested on this one): kept escaped."""
    os.setxattr(root / path, "trusted.overlay.k", value, follow_symlinks=False)


def chattr(root: Path, path: str, change: str):
    """chattr +i/-i/+a/-a (read the flags, change one, write them back), and the flags then:
    immutable and append-only, which the overlay keeps in its own xattr and enforces."""
    fd = os.open(root / path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    try:
        buf = bytearray(4)
        fcntl.ioctl(fd, 0x80086601, buf, True)  # FS_IOC_GETFLAGS
        flags = int.from_bytes(buf, "little")
        bit = 0x10 if change[1] == "i" else 0x20  # FS_IMMUTABLE_FL, FS_APPEND_FL
        flags = flags | bit if change[0] == "+" else flags & ~bit
        fcntl.ioctl(fd, 0x40086602, flags.to_bytes(4, "little"))  # FS_IOC_SETFLAGS
        fcntl.ioctl(fd, 0x80086601, buf, True)
        return int.from_bytes(buf, "little") & 0x30
    finally:
        os.close(fd)


def punch(root: Path, path: str, offset: int, length: int):
    """fallocate(PUNCH_HOLE|KEEP_SIZE) through an fd open for writing (a copy-up first), and
    what the file holds then."""
    fd = os.open(root / path, os.O_RDWR | os.O_NONBLOCK)  # a FIFO must not block
    try:
        syscalls.fallocate(fd, 0x03, offset, length)
        return os.pread(fd, 100, 0)
    finally:
        os.close(fd)


def tmpfile_link(root: Path, dirpath: str, name: str, data: bytes):
    """An O_TMPFILE file in `dirpath`, written, then named `name` there by linkat(fd)."""
    fd = os.open(root / dirpath, os.O_TMPFILE | os.O_WRONLY, 0o640)
    try:
        os.write(fd, data)
        syscalls.link_fd(fd, os.fsencode(root / dirpath / name))
    finally:
        os.close(fd)


def link(root: Path, src: str, dst: str):
    os.link(root / src, root / dst, follow_symlinks=False)


def symlink(root: Path, target: str, path: str):
    os.symlink(target, root / path)


def mkdir(root: Path, path: str):
    os.mkdir(root / path, 0o755)


def rmdir(root: Path, path: str):
    os.rmdir(root / path)


def unlink(root: Path, path: str):
    os.unlink(root / path)


def mkfifo(root: Path, path: str):
    os.mkfifo(root / path, 0o644)


def listdir(root: Path, path: str):
    return sorted(os.listdir(root / path))


def unlink_open(root: Path, path: str, names: list[str]):
    """Open `path`, unlink `names` (its last names, say), and report what fstat says then."""
    fd = os.open(root / path, os.O_RDONLY)
    try:
        for name in names:
            os.unlink(root / name)
        st = os.fstat(fd)
        return st.st_nlink, oct(st.st_mode), os.pread(fd, 100, 0)
    finally:
        os.close(fd)


def write_fstat(root: Path, path: str, data: bytes):
    """Append through an fd and report what fstat on that fd says before it is closed."""
    fd = os.open(root / path, os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, data)
        st = os.fstat(fd)
        return st.st_nlink, oct(st.st_mode), st.st_size
    finally:
        os.close(fd)
