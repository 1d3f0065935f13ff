"""The opcode table: per opcode its name, how its arguments are decoded (bounds-checked),
which bridge method serves it, and how the session runs it.

Like go-fuse's `fuse/opcode.go`: the session looks an opcode up here, decodes the arguments
(`wire.Malformed` → an errno reply), and calls `bridge.<method>(header, *args)`.  Modes:
  INLINE   awaited by the session loop itself: handlers that never block (no await that
           can wait: lookups, attributes, reads of data, listings);
  TASK     started as a task, so a request that waits (the freeze gate, a copy-up of a big
           file in a worker thread, fsync) never stalls the others;
  GATED    may wait only in known cases (`Bridge.may_wait`: a frozen mount; for UNLINK
           also a copy-up in progress, or index=on; for the requests that copy their node
           up first, a node not in the upper yet): inline unless one holds now, else a
           task.  A task costs ~30 µs of trio's time (task, cancel scope, checkpoint)
           against ~0.2 µs inline;
  NOREPLY  FORGET, BATCH_FORGET, INTERRUPT: synchronous, the kernel expects no answer;
  BACKGROUND  RELEASE, RELEASEDIR: inline handlers the kernel sends in the background (it
           waits for no answer): the session answers them once it is idle, after the
           requests queued behind them (session.py).
Pure: decoders only read the request's bytes.  Concurrency: none.
"""

from __future__ import annotations

import errno
import os

from . import wire
from .wire import Header, Malformed, cstring, cstrings, unpack

TYPE_CHECKING = False  # typing's own constant, without importing typing before INIT (../logs.py)
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any


INLINE, TASK, GATED, NOREPLY = "inline", "task", "gated", "noreply"
BACKGROUND = "background"


class Op:
    """One opcode's row (plain slots: 34 dataclass rows cost ~1.5 ms of start-up)."""

    __slots__ = ("code", "name", "decode", "method", "mode", "inline_if")

    def __init__(self, code: int, name: str, decode: Callable[[Header], tuple[Any, ...]],
                 method: str, mode: str,
                 inline_if: Callable[[tuple[Any, ...]], bool] | None = None) -> None:  # fmt: skip
        self.code = code
        self.name = name
        self.decode = decode
        self.method = method
        self.mode = mode
        self.inline_if = inline_if  # a TASK that may run inline


def _none(h: Header) -> tuple[Any, ...]:
    return ()


def _name(h: Header) -> tuple[Any, ...]:
    name, _ = cstring(h.body, 0)
    return (name,)


def _two_names(h: Header) -> tuple[Any, ...]:
    (a, b), _ = cstrings(h.body, 0, 2)
    return (a, b)


def _forget(h: Header) -> tuple[Any, ...]:
    (n,) = unpack(wire.FORGET_IN, h.body, "forget_in")
    return ([(h.nodeid, n)],)


def _batch_forget(h: Header) -> tuple[Any, ...]:
    count, _ = unpack(wire.BATCH_FORGET_IN, h.body, "batch_forget_in")
    need = wire.BATCH_FORGET_IN.size + count * wire.FORGET_ONE.size
    if len(h.body) < need:
        raise Malformed(f"batch_forget: {count} entries need {need} bytes, have {len(h.body)}")
    one = wire.FORGET_ONE
    base = wire.BATCH_FORGET_IN.size
    return ([one.unpack_from(h.body, base + i * one.size) for i in range(count)],)


def _interrupt(h: Header) -> tuple[Any, ...]:
    return unpack(wire.INTERRUPT_IN, h.body, "interrupt_in")


def _getattr(h: Header) -> tuple[Any, ...]:
    return ()  # fuse_getattr_in (flags, fh) is not needed: attributes are per inode


def _setattr(h: Header) -> tuple[Any, ...]:
    return (unpack(wire.SETATTR_IN, h.body, "setattr_in"),)


def _mknod(h: Header) -> tuple[Any, ...]:
    mode, rdev, umask, _ = unpack(wire.MKNOD_IN, h.body, "mknod_in")
    name, _ = cstring(h.body, wire.MKNOD_IN.size)
    return (name, mode, rdev, umask)


def _mkdir(h: Header) -> tuple[Any, ...]:
    mode, umask = unpack(wire.MKDIR_IN, h.body, "mkdir_in")
    name, _ = cstring(h.body, wire.MKDIR_IN.size)
    return (name, mode, umask)


def _symlink(h: Header) -> tuple[Any, ...]:
    (name, target), _ = cstrings(h.body, 0, 2)
    return (name, target)


def _rename(h: Header) -> tuple[Any, ...]:
    (newdir,) = unpack(wire.RENAME_IN, h.body, "rename_in")
    (old, new), _ = cstrings(h.body, wire.RENAME_IN.size, 2)
    return (old, newdir, new, 0)


def _rename2(h: Header) -> tuple[Any, ...]:
    newdir, flags, _ = unpack(wire.RENAME2_IN, h.body, "rename2_in")
    (old, new), _ = cstrings(h.body, wire.RENAME2_IN.size, 2)
    return (old, newdir, new, flags)


def _link(h: Header) -> tuple[Any, ...]:
    (old,) = unpack(wire.LINK_IN, h.body, "link_in")
    name, _ = cstring(h.body, wire.LINK_IN.size)
    return (old, name)


def _open(h: Header) -> tuple[Any, ...]:
    flags, _ = unpack(wire.OPEN_IN, h.body, "open_in")
    return (flags,)


def _open_file(h: Header) -> tuple[Any, ...]:
    return unpack(wire.OPEN_IN, h.body, "open_in")  # flags, open_flags


def _create(h: Header) -> tuple[Any, ...]:
    flags, mode, umask, open_flags = unpack(wire.CREATE_IN, h.body, "create_in")
    name, _ = cstring(h.body, wire.CREATE_IN.size)
    return (name, mode, flags, umask, open_flags)


def _read(h: Header) -> tuple[Any, ...]:
    fh, off, size, *_ = unpack(wire.READ_IN, h.body, "read_in")
    return (fh, off, size)


def _write(h: Header) -> tuple[Any, ...]:
    fh, off, size, write_flags, *_ = unpack(wire.WRITE_IN, h.body, "write_in")
    start = wire.WRITE_IN.size
    if len(h.body) - start < size:
        raise Malformed(f"write: {size} bytes announced, {len(h.body) - start} sent")
    # A view of the loop's buffer, not a copy (a 1 MiB WRITE would be copied once more before
    # pwrite): the session copies it if the request outlives the loop's turn (a task).
    return (fh, off, h.body[start : start + size], write_flags)


def _release(h: Header) -> tuple[Any, ...]:
    fh, *_ = unpack(wire.RELEASE_IN, h.body, "release_in")
    return (fh,)


def _fsync(h: Header) -> tuple[Any, ...]:
    fh, flags, _ = unpack(wire.FSYNC_IN, h.body, "fsync_in")
    return (fh, bool(flags & wire.FSYNC_FDATASYNC))


def _fallocate(h: Header) -> tuple[Any, ...]:
    fh, off, length, mode, _ = unpack(wire.FALLOCATE_IN, h.body, "fallocate_in")
    return (fh, off, length, mode)


def _copy_file_range(h: Header) -> tuple[Any, ...]:
    fh_in, off_in, _, fh_out, off_out, length, flags = unpack(
        wire.COPY_FILE_RANGE_IN, h.body, "copy_file_range_in"
    )
    return (fh_in, off_in, fh_out, off_out, length, flags)


def _lseek(h: Header) -> tuple[Any, ...]:
    fh, off, whence, _ = unpack(wire.LSEEK_IN, h.body, "lseek_in")
    return (fh, off, whence)


def _ioctl(h: Header) -> tuple[Any, ...]:
    fh, flags, cmd, _arg, in_size, out_size = unpack(wire.IOCTL_IN, h.body, "ioctl_in")
    start = wire.IOCTL_IN.size
    if len(h.body) - start < in_size:
        raise Malformed(f"ioctl: {in_size} bytes announced, {len(h.body) - start} sent")
    return (fh, flags, cmd, bytes(h.body[start : start + in_size]), out_size)


def _ioctl_reads(args: tuple[Any, ...]) -> bool:
    """An ioctl that changes nothing (reading flags, or one answered ENOTTY) never waits."""
    return args[2] not in wire.IOCTL_SETTERS


def _statx(h: Header) -> tuple[Any, ...]:
    *_, sx_mask = unpack(wire.STATX_IN, h.body, "statx_in")
    return (sx_mask,)


def _setxattr(h: Header) -> tuple[Any, ...]:
    size, flags = unpack(wire.SETXATTR_IN, h.body, "setxattr_in")
    return _setxattr_value(h, wire.SETXATTR_IN.size, size, flags, 0)


def _setxattr_ext(h: Header) -> tuple[Any, ...]:
    """With FUSE_SETXATTR_EXT the header is 16 bytes and says whether to kill setgid."""
    size, flags, sx_flags, _ = unpack(wire.SETXATTR_IN_EXT, h.body, "setxattr_in")
    return _setxattr_value(h, wire.SETXATTR_IN_EXT.size, size, flags, sx_flags)


def _setxattr_value(h: Header, start: int, size: int, flags: int, sx_flags: int
                    ) -> tuple[Any, ...]:  # fmt: skip
    name, end = cstring(h.body, start)
    if len(h.body) - end < size:
        raise Malformed(f"setxattr: value of {size} bytes announced, {len(h.body) - end} sent")
    return (name, bytes(h.body[end : end + size]), flags, sx_flags)


def _getxattr(h: Header) -> tuple[Any, ...]:
    size, _ = unpack(wire.GETXATTR_IN, h.body, "getxattr_in")
    name, _ = cstring(h.body, wire.GETXATTR_IN.size)
    return (name, size)


def _listxattr(h: Header) -> tuple[Any, ...]:
    size, _ = unpack(wire.GETXATTR_IN, h.body, "getxattr_in")
    return (size,)


def _access(h: Header) -> tuple[Any, ...]:
    mask, _ = unpack(wire.ACCESS_IN, h.body, "access_in")
    return (mask & (os.R_OK | os.W_OK | os.X_OK),)


def _read_only_open(args: tuple[Any, ...]) -> bool:
    """An open for reading never waits (no copy-up, not held by a freeze)."""
    flags = args[0]
    return (flags & os.O_ACCMODE) == os.O_RDONLY and not flags & os.O_TRUNC


_TABLE = [
    Op(1, "LOOKUP", _name, "lookup", INLINE),
    Op(2, "FORGET", _forget, "forget", NOREPLY),
    Op(3, "GETATTR", _getattr, "getattr", INLINE),
    Op(4, "SETATTR", _setattr, "setattr", GATED),
    Op(5, "READLINK", _none, "readlink", INLINE),
    Op(6, "SYMLINK", _symlink, "symlink", GATED),
    Op(8, "MKNOD", _mknod, "mknod", GATED),
    Op(9, "MKDIR", _mkdir, "mkdir", GATED),
    Op(10, "UNLINK", _name, "unlink", GATED),
    Op(11, "RMDIR", _name, "rmdir", GATED),
    Op(12, "RENAME", _rename, "rename", TASK),
    Op(13, "LINK", _link, "link", TASK),
    Op(14, "OPEN", _open_file, "open", GATED, _read_only_open),
    Op(15, "READ", _read, "read", INLINE),
    Op(16, "WRITE", _write, "write", GATED),
    Op(17, "STATFS", _none, "statfs", INLINE),
    Op(18, "RELEASE", _release, "release", BACKGROUND),
    Op(20, "FSYNC", _fsync, "fsync", TASK),
    Op(21, "SETXATTR", _setxattr, "setxattr", GATED),
    Op(22, "GETXATTR", _getxattr, "getxattr", INLINE),
    Op(23, "LISTXATTR", _listxattr, "listxattr", INLINE),
    Op(24, "REMOVEXATTR", _name, "removexattr", GATED),
    Op(25, "FLUSH", _release, "flush", INLINE),
    Op(27, "OPENDIR", _open, "opendir", INLINE),
    Op(28, "READDIR", _read, "readdir", INLINE),
    Op(29, "RELEASEDIR", _release, "releasedir", BACKGROUND),
    Op(30, "FSYNCDIR", _fsync, "fsyncdir", TASK),
    Op(34, "ACCESS", _access, "access", INLINE),
    Op(35, "CREATE", _create, "create", GATED),
    Op(36, "INTERRUPT", _interrupt, "interrupt", NOREPLY),
    Op(38, "DESTROY", _none, "destroy", INLINE),
    Op(39, "IOCTL", _ioctl, "ioctl", TASK, _ioctl_reads),
    Op(42, "BATCH_FORGET", _batch_forget, "forget", NOREPLY),
    Op(43, "FALLOCATE", _fallocate, "fallocate", GATED),
    Op(44, "READDIRPLUS", _read, "readdirplus", INLINE),
    Op(45, "RENAME2", _rename2, "rename", TASK),
    Op(46, "LSEEK", _lseek, "lseek", INLINE),
    Op(47, "COPY_FILE_RANGE", _copy_file_range, "copy_file_range", TASK),
    Op(51, "TMPFILE", _create, "tmpfile", GATED),
    Op(52, "STATX", _statx, "statx", INLINE),
    Op(53, "COPY_FILE_RANGE_64", _copy_file_range, "copy_file_range_64", TASK),
]

OPCODES: dict[int, Op] = {op.code: op for op in _TABLE}
INIT = 26
INTERRUPT = 36
DESTROY = 38
NAMES: dict[int, str] = {op.code: op.name for op in _TABLE} | {INIT: "INIT"}
# Answered ENOSYS by the session without a handler (unknown opcodes too): the kernel then
# stops sending most of them (GETLK/SETLK: locks stay local, as with pyfuse3).
UNSUPPORTED_ERRNO = errno.ENOSYS


_SETXATTR_EXT_ROW = Op(21, "SETXATTR", _setxattr_ext, "setxattr", GATED)


def table(setxattr_ext: bool) -> dict[int, Op]:
    """The opcode table of one connection: SETXATTR's header depends on what INIT granted."""
    if not setxattr_ext:
        return OPCODES
    return OPCODES | {_SETXATTR_EXT_ROW.code: _SETXATTR_EXT_ROW}


def decode(op: Op, h: Header) -> tuple[Any, ...]:
    """The arguments of `h` for `op`'s bridge method; raises wire.Malformed."""
    return op.decode(h)
