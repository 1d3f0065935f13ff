"""Inode flags (lsattr/chattr: FS_IOC_GETFLAGS/SETFLAGS, FS_IOC_FSGETXATTR/FSSETXATTR), kept
as kernel overlayfs keeps them (fs/overlayfs/inode.c `ovl_fileattr_get/set`, copy_up.c
`ovl_copy_fileattr`, util.c `ovl_set_protattr`).

- Read: the flags of the object's topmost real file or directory, plus immutable and
  append-only from its `overlay.protattr` xattr ("a", "i"), which only upper objects carry.
- Set: the object is copied up; immutable and append-only go into `overlay.protattr`
  (removed once both are cleared), every other flag onto the real upper object.  The real
  object never gets those two: an immutable upper file could not be linked into place,
  nor carry the overlay's own xattrs, nor have children copied up into it.
- Copy-up: a lower object's immutable/append-only go into its copy's protattr, its
  sync/noatime flags onto the copy (`carried`).
- Kept: FUSE gives the kernel no S_IMMUTABLE/S_APPEND for its inodes, so the checks the
  VFS makes on an overlay inode with them (may_open, notify_change, may_delete, may_linkat,
  xattr_permission, vfs_fallocate) are the daemon's: operations.py asks `refuses_*`.
Only regular files and directories have flags here, as for the kernel's FUSE client (it
asks for no other kind).  Concurrency: none; plain functions over paths and fds.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct

from . import markers
from .fsat import Roots

FS_IOC_GETFLAGS = 0x80086601
FS_IOC_SETFLAGS = 0x40086602
FS_IOC_FSGETXATTR = 0x801C581F
FS_IOC_FSSETXATTR = 0x401C5820
FSXATTR = struct.Struct("<IIIII8x")  # xflags extsize nextents projid cowextsize pad
FLAGS = struct.Struct("<I")

FS_SYNC_FL = 0x00000008
FS_IMMUTABLE_FL = 0x00000010
FS_APPEND_FL = 0x00000020
FS_NOATIME_FL = 0x00000080
FS_XFLAG_IMMUTABLE = 0x00000008
FS_XFLAG_APPEND = 0x00000010
FS_XFLAG_SYNC = 0x00000020
FS_XFLAG_NOATIME = 0x00000040

PROT = FS_IMMUTABLE_FL | FS_APPEND_FL  # kept in overlay.protattr, never on the real object
_PROT_X = FS_XFLAG_IMMUTABLE | FS_XFLAG_APPEND
_COPIED = FS_SYNC_FL | FS_NOATIME_FL  # copied onto the upper copy at copy-up
# errnos of a real filesystem (or object) without inode flags: nothing to carry
_NONE_HERE = frozenset({errno.ENOTTY, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS})


def _xprot(flags: int) -> int:
    """PROT flags as FS_XFLAG_* bits."""
    return (FS_XFLAG_IMMUTABLE if flags & FS_IMMUTABLE_FL else 0) | (
        FS_XFLAG_APPEND if flags & FS_APPEND_FL else 0
    )


def _prot_of_x(xflags: int) -> int:
    return (FS_IMMUTABLE_FL if xflags & FS_XFLAG_IMMUTABLE else 0) | (
        FS_APPEND_FL if xflags & FS_XFLAG_APPEND else 0
    )


def open_real(fs: Roots, path: bytes, kind: int) -> int:
    """An fd of a real file or directory to ask or set its flags through (as chattr opens:
    read-only, not blocking, never following a symlink)."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW
    if kind == stat.S_IFDIR:
        flags |= os.O_DIRECTORY
    return fs.open(path, flags)


class _RealFd:
    """`with _RealFd(fs, target, kind) as fd`: `target` itself when it is an fd, else an fd
    of that path (`open_real`), closed at the end."""

    __slots__ = ("fs", "target", "kind", "fd")

    def __init__(self, fs: Roots, target: bytes | int, kind: int) -> None:
        self.fs, self.target, self.kind, self.fd = fs, target, kind, -1

    def __enter__(self) -> int:
        t = self.target
        self.fd = t if isinstance(t, int) else open_real(self.fs, t, self.kind)
        return self.fd

    def __exit__(self, *exc: object) -> None:
        if self.fd != self.target:
            os.close(self.fd)


def real_flags(fd: int) -> int:
    buf = bytearray(FLAGS.size)
    fcntl.ioctl(fd, FS_IOC_GETFLAGS, buf, True)
    return int(FLAGS.unpack(buf)[0])


def get(fs: Roots, path: bytes | int, kind: int, prot: int, xattr_form: bool) -> bytes:
    """The reply to FS_IOC_GETFLAGS (4 bytes) or FS_IOC_FSGETXATTR (struct fsxattr) for the
    real object `path` (or an fd open on it), with the overlay's `prot` flags added."""
    with _RealFd(fs, path, kind) as fd:
        if not xattr_form:
            return FLAGS.pack(real_flags(fd) | prot)
        buf = bytearray(FSXATTR.size)
        fcntl.ioctl(fd, FS_IOC_FSGETXATTR, buf, True)
    xflags, *rest = FSXATTR.unpack(buf)
    return FSXATTR.pack(xflags | _xprot(prot), *rest)


def set_real(fs: Roots, path: bytes | int, kind: int, value: bytes, xattr_form: bool) -> int:
    """Apply a FS_IOC_SETFLAGS / FS_IOC_FSSETXATTR value to the real upper object `path`
    without its immutable/append-only flags; returns those (for overlay.protattr).  A value
    too short is EINVAL, as the kernel's copy from the caller would fault."""
    st = FSXATTR if xattr_form else FLAGS
    if len(value) < st.size:
        raise OSError(errno.EINVAL, "short fileattr value")
    fields = list(st.unpack_from(value))
    if xattr_form:
        prot = _prot_of_x(fields[0])
        fields[0] &= ~_PROT_X
    else:
        prot = fields[0] & PROT
        fields[0] &= ~PROT
    with _RealFd(fs, path, kind) as fd:
        fcntl.ioctl(fd, FS_IOC_FSSETXATTR if xattr_form else FS_IOC_SETFLAGS, st.pack(*fields))
    return prot


def lower_flags(fs: Roots, path: bytes, kind: int) -> int:
    """The real flags of a lower object about to be copied up (0 for any other kind, or a
    filesystem without them)."""
    if kind not in (stat.S_IFREG, stat.S_IFDIR):
        return 0
    try:
        with _RealFd(fs, path, kind) as fd:
            return real_flags(fd)
    except OSError as exc:
        if exc.errno in _NONE_HERE or exc.errno in (errno.EACCES, errno.ENOENT, errno.ELOOP):
            return 0  # no flags here, or none to be read: copied up without them
        raise


def carry(fs: Roots, flags: int, dst: bytes | int, kind: int) -> None:
    """At copy-up (`ovl_copy_fileattr`): a lower object's `flags` onto its copy `dst` (a
    path, or an fd of a regular file), before the copy goes into place: immutable and
    append-only into overlay.protattr, sync and noatime onto the copy itself."""
    if flags & PROT:
        markers.set_protattr(dst, flags & PROT, fs)
    if flags & _COPIED:
        with _RealFd(fs, dst, kind) as fd:
            try:
                mine = real_flags(fd)
                fcntl.ioctl(fd, FS_IOC_SETFLAGS, FLAGS.pack(mine & ~_COPIED | flags & _COPIED))
            except OSError as exc:
                if exc.errno not in _NONE_HERE:
                    raise


# ----- what the flags refuse (the VFS's checks on an overlay inode that has them) ---------
def refuses_open(prot: int, flags: int) -> bool:
    """may_open: an immutable file opens for reading only; an append-only one for
    appending, never truncated."""
    writes = flags & os.O_ACCMODE != os.O_RDONLY or bool(flags & os.O_TRUNC)
    if prot & FS_IMMUTABLE_FL:
        return writes
    if prot & FS_APPEND_FL:
        return bool(flags & os.O_TRUNC) or (writes and not flags & os.O_APPEND)
    return False


def refuses_setattr(prot: int, changes_owner_mode_or_size: bool, sets_times: bool,
                    touches: bool) -> bool:  # fmt: skip
    """notify_change: nothing changes an immutable object's attributes but its ctime; an
    append-only one's times may only be set to now (touch), and its size never changes."""
    if prot & FS_IMMUTABLE_FL:
        return changes_owner_mode_or_size or sets_times or touches
    if prot & FS_APPEND_FL:
        return changes_owner_mode_or_size or sets_times
    return False


def refuses_fallocate(prot: int, mode: int) -> bool:
    """vfs_fallocate: never on an immutable file; on an append-only one only to keep the
    size (FALLOC_FL_KEEP_SIZE = 1)."""
    return bool(prot & FS_IMMUTABLE_FL) or bool(prot & FS_APPEND_FL and mode & ~1)
