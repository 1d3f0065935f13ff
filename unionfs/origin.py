"""Origin: which lower object an upper one was copied up from, in kernel overlayfs's format.

At copy-up the kernel stores `trusted.overlay.origin` on the new upper object: a file handle
of the lower object (struct ovl_fb: version 0, magic 0xfb, its length, flags, the handle type,
the lower filesystem's uuid, the handle).  At every later lookup it decodes it and reports
the lower object's st_ino for the upper copy, so a file keeps its inode number across
copy-up *and remount*.  layerfs writes the same bytes at copy-up (`value_for`: the handle is
name_to_handle_at's, the uuid FS_IOC_GETFSUUID's; a test compares them with the kernel's)
and reads origins back, its own and the kernel's (`lower_object`), so numbers stay the same
over remounts of uppers made by either.
Root only (`enabled`: markers.trusted): the origin lives in the trusted namespace, and
open_by_handle_at needs CAP_DAC_READ_SEARCH.  Elsewhere nothing is written or read, and a
copied-up file's number is stable within a mount only.  Best effort both ways: a
filesystem without file handles, an upper without trusted xattrs or a stale handle means no
origin, as on the kernel.
Concurrency: plain functions over their own fds (and a cache of filesystem uuids filled
from the trio thread); safe from any thread.
"""

from __future__ import annotations

import errno
import os
import stat
import sys

from . import markers, syscalls
from .fsat import Roots

XATTR = b"trusted.overlay.origin"
# the link count of an upper copy of a hard-linked lower file, relative ("U+1": the upper
# file's count plus one; "L-1": the lower file's minus one), as ovl_set_nlink_upper writes it
NLINK_XATTR = b"trusted.overlay.nlink"
_MAGIC = 0xFB
_FLAG_BIG_ENDIAN = 1  # OVL_FH_FLAG_BIG_ENDIAN
_FLAG_ANY_ENDIAN = 2  # OVL_FH_FLAG_ANY_ENDIAN
_FLAG_PATH_UPPER = 4  # OVL_FH_FLAG_PATH_UPPER: a handle of an upper object (the index's)
_FLAGS_ALL = 7
_CPU_ENDIAN = _FLAG_BIG_ENDIAN if sys.byteorder == "big" else 0
_HEADER = 5 + 16  # version, magic, len, flags, type; uuid
_NULL_UUID = bytes(16)

# st_dev -> its filesystem's uuid (None: unknown); one per stack (LayerStack.fs_uuids), so a
# device number reused by a later filesystem in the same process is not mistaken for it
Uuids = dict[int, "bytes | None"]


def enabled() -> bool:
    """Are origins written and read?  They are decoded with open_by_handle_at, which needs
    the rights trusted xattrs need (CAP_SYS_ADMIN/CAP_DAC_READ_SEARCH in the host's
    namespace): as root, in `trusted.overlay.origin`, or with `userxattr` in
    `user.overlay.origin`, as the kernel keeps them; rootless, none."""
    return markers.privileged()


def use_user_xattrs() -> None:
    """`userxattr` (markers.use_user_xattrs): origins and link counts in user.overlay.*."""
    global XATTR, NLINK_XATTR
    XATTR = b"user.overlay.origin"
    NLINK_XATTR = b"user.overlay.nlink"


def counts(lower_nlink: int, index: bool) -> bool:
    """Does the origin of a copy of a lower object with `lower_nlink` links count (stored at
    copy-up, its number reported after)?  The kernel's rule: not for a copy that breaks a
    lower hard link (index=off); with index=on the names stay one inode, so it does."""
    return lower_nlink <= 1 or index


def _uuid_of(fs: Roots, directory: bytes, dev: int, uuids: Uuids) -> bytes | None:
    if dev not in uuids:
        try:
            fd = fs.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            return None
        try:
            uuids[dev] = syscalls.fs_uuid(fd)
        finally:
            os.close(fd)
    return uuids[dev]


def value_for(fs: Roots, path: bytes, st: os.stat_result, uuids: Uuids) -> bytes | None:
    """The origin to store on the upper copy of lower object `path` (`st` its lstat): the
    bytes the kernel's copy-up stores (ovl_encode_real_fh); None where its filesystem gives
    no file handles."""
    try:
        kind, handle = fs.file_handle(path)
    except OSError:
        return None
    # the filesystem's uuid from a directory on it: a directory itself (a layer's root may be
    # a filesystem's root, whose parent is on another), a file's parent
    directory = path if stat.S_ISDIR(st.st_mode) else os.path.dirname(path) or b"/"
    uuid = _uuid_of(fs, directory, st.st_dev, uuids)
    if len(handle) > 255 - _HEADER or not 0 <= kind <= 255:
        return None
    header = bytes((0, _MAGIC, _HEADER + len(handle), _CPU_ENDIAN, kind))
    return header + (uuid if uuid is not None else _NULL_UUID) + handle


def parse(value: bytes) -> tuple[int, bytes, bytes] | None:
    """(handle type, handle, uuid) of a stored origin, when it names a lower object in a
    form this machine's kernel would decode (ovl_check_fb_len and its endianness rule);
    None otherwise."""
    if len(value) < _HEADER or value[0] != 0 or value[1] != _MAGIC:
        return None
    size, flags = value[2], value[3]
    if size < _HEADER or size > len(value) or flags & ~_FLAGS_ALL or flags & _FLAG_PATH_UPPER:
        return None
    if not flags & _FLAG_ANY_ENDIAN and flags & _FLAG_BIG_ENDIAN != _CPU_ENDIAN:
        return None
    return value[4], value[_HEADER:size], value[5:_HEADER]


def lower_object(fs: Roots, path: bytes, roots: list[bytes], uuids: Uuids) -> os.stat_result | None:
    """The lstat of the lower object that the upper object `path` was copied up from, by its
    stored origin, decoded on the filesystem of one of `roots` (one lower layer root per
    filesystem) whose uuid matches, as the kernel's ovl_check_origin tries its lower layers;
    None without an origin or where none decodes (stale: the lower object is gone).
    PermissionError where this process may not decode handles at all."""
    try:
        value = fs.getxattr(path, XATTR)
    except OSError:
        return None
    found = parse(value)
    if found is None:
        return None
    kind, handle, uuid = found
    for root in roots:
        try:
            mount_fd = fs.open(root, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            continue
        try:
            known = _uuid_of(fs, root, os.fstat(mount_fd).st_dev, uuids)
            if known is not None and known != uuid:
                continue
            try:
                fd = syscalls.open_by_handle_at(mount_fd, kind, handle, os.O_PATH)
            except OSError as exc:
                if exc.errno == errno.EPERM:  # no CAP_DAC_READ_SEARCH (a user namespace)
                    raise PermissionError(exc.errno, "open_by_handle_at: not permitted") from None
                continue
            try:
                return os.fstat(fd)
            finally:
                os.close(fd)
        finally:
            os.close(mount_fd)
    return None
