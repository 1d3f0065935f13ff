"""POSIX ACL inheritance for what layerfs creates: the kernel's `posix_acl_create`.

A new file, device or directory in a directory with a default ACL gets that ACL, masked by
the mode it was created with, as its access ACL (a directory also gets it as its default
ACL), and the caller's umask is not applied; without a default ACL the umask is applied and
no ACL is made.  Kernel overlayfs gets this from the upper file system when it creates in
place, and applies it itself when it creates in the work dir first
(`ovl_create_over_whiteout`: posix_acl_create on the overlay parent, then
`ovl_set_upper_acl`).  layerfs makes directories, devices and symlinks in the work dir, and
files there when they replace a whiteout, so it computes the inheritance here, from the
merged parent's default ACL, for every create.  The mode must arrive without the umask
applied, which FUSE_DONT_MASK asks of the kernel (native transport; with pyfuse3 the kernel
applies the umask first, so a default ACL is masked by it as well).

The value format is posix_acl_xattr (include/uapi/linux/posix_acl_xattr.h): a version word
(2), then (tag, perm, id) entries.  Pure functions.  Concurrency: none.
"""

from __future__ import annotations

import stat
import struct

ACCESS = b"system.posix_acl_access"
DEFAULT = b"system.posix_acl_default"
_VERSION = 2
_HEAD = struct.Struct("<I")
_ENTRY = struct.Struct("<HHI")
USER_OBJ, USER, GROUP_OBJ, GROUP, MASK, OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20


class Inherited:
    """What a create gets: its mode, and the ACLs to set on the new object (or None)."""

    __slots__ = ("mode", "access", "default")

    def __init__(self, mode: int, access: bytes | None, default: bytes | None) -> None:
        self.mode = mode
        self.access = access
        self.default = default


def entries(value: bytes) -> list[list[int]] | None:
    """[tag, perm, id] of each entry; None when `value` is not a version-2 ACL."""
    if len(value) < _HEAD.size or (len(value) - _HEAD.size) % _ENTRY.size:
        return None
    if _HEAD.unpack_from(value)[0] != _VERSION:
        return None
    return [list(e) for e in _ENTRY.iter_unpack(value[_HEAD.size :])]


def pack(acl: list[list[int]]) -> bytes:
    return _HEAD.pack(_VERSION) + b"".join(_ENTRY.pack(*e) for e in acl)


def inherit(default: bytes | None, mode: int, umask: int, kind: int) -> Inherited:
    """The mode and ACLs of a new object of type `kind` (S_IFREG, S_IFDIR, ...) created with
    `mode` under a parent whose default ACL is `default` (None: it has none)."""
    acl = entries(default) if default is not None and kind != stat.S_IFLNK else None
    if not acl:
        return Inherited(mode & ~umask, None, None)
    bits, equivalent = _create_masq(acl, mode & 0o777)
    return Inherited(
        (mode & ~0o777) | bits,
        None if equivalent else pack(acl),
        default if kind == stat.S_IFDIR else None,
    )


def _create_masq(acl: list[list[int]], mode: int) -> tuple[int, bool]:
    """posix_acl_create_masq: narrow `acl` (in place) and `mode` by each other; True when the
    result says no more than the mode bits (then no access ACL is stored)."""
    group_obj = mask = None
    equivalent = True
    for e in acl:
        tag = e[0]
        if tag == USER_OBJ:
            e[1] &= mode >> 6 & 7
            mode &= e[1] << 6 | 0o077
        elif tag == OTHER:
            e[1] &= mode & 7
            mode &= e[1] | 0o770
        elif tag == GROUP_OBJ:
            group_obj = e
        elif tag == MASK:
            mask = e
            equivalent = False
        else:  # named users and groups
            equivalent = False
    narrowed = mask if mask is not None else group_obj
    if narrowed is not None:
        narrowed[1] &= mode >> 3 & 7
        mode &= narrowed[1] << 3 | 0o707
    return mode, equivalent
