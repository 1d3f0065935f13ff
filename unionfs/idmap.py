"""Ownership shifting: fuse-overlayfs's `uidmapping=` / `gidmapping=`, one owner for both ids.

podman gives a container with `--uidmap 0:100000:65536` a mount with
`uidmapping=:0:100000:65536,gidmapping=:0:100000:65536`: the layers keep the ids the image was
built with (0..65535), and the mount shows them shifted into the container's user namespace
(100000..165535), which sees them as 0..65535 again.  Format and meaning are fuse-overlayfs's
(main.c `read_mappings`, `find_mapping`, `get_uid`; rust `src/mapping.rs`):

  - the value is colon-separated triples `STORED:SHOWN:LEN`; empty pieces are skipped (podman's
    leading colon), a piece that is not a whole decimal number, or a count of pieces that is
    not a multiple of three, is refused;
  - shown (stat, readdir) = SHOWN + (id - STORED) for the first triple whose STORED range holds
    the id; stored (chown, the owner of a new file) is the inverse; an id that no triple
    covers becomes the kernel's overflow id (/proc/sys/kernel/overflow{u,g}id, 65534), as
    there.  fuse-overlayfs's C code tried the triples last-given first (a prepended list);
    overlapping triples are refused here, so the order never matters.

Which ids are shifted (the handler layer, so both transports get it): st_uid/st_gid of every
reply; SETATTR's uid/gid; the owner of what CREATE/MKNOD/MKDIR/SYMLINK make (the caller's
ids), and access(2)'s check.  Beyond fuse-overlayfs, which passes xattrs through unchanged,
the ids inside two kinds of xattr are shifted too, since they are ownership by another name:
the root id of a v3 `security.capability` (a namespaced file capability; the kernel reads it
as a uid of the mount), and the user and group entries of `system.posix_acl_access` and
`_default` (with FUSE_POSIX_ACL the kernel checks permissions with them, reading their ids
as ids of the mount, as it reads st_uid).
Copy-up keeps the stored ids as they are (it copies stored to stored), so the upper holds the
ids a mount without mapping shows.

Pure and immutable: built once from the options, shared by every request.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import NamedTuple

from . import acl
from .errors import OptionError

OVERFLOW_DEFAULT = 65534
CAPABILITY_XATTR = b"security.capability"
_CAP_V3 = 0x03000000
_CAP_V3_SIZE = 24  # magic_etc, 2 x (permitted, inheritable), rootid


class Range(NamedTuple):
    stored: int
    shown: int
    length: int


class IdMap(NamedTuple):
    """One direction pair for one kind of id (uids or gids)."""

    ranges: tuple[Range, ...]
    overflow: int

    def shown(self, stored: int) -> int:
        """The id a reply shows for an id stored in the layers."""
        for r in self.ranges:
            if r.stored <= stored < r.stored + r.length:
                return r.shown + (stored - r.stored)
        return self.overflow

    def stored(self, shown: int) -> int:
        """The id written to the upper for an id the kernel (a caller, a chown) gave."""
        for r in self.ranges:
            if r.shown <= shown < r.shown + r.length:
                return r.stored + (shown - r.shown)
        return self.overflow


def parse(value: str, what: str, overflow: int) -> IdMap:
    """`:0:100000:65536` → IdMap; OptionError naming the option when malformed."""
    pieces = [p for p in value.split(":") if p]
    if not pieces or len(pieces) % 3 or not all(p.isdigit() and p.isascii() for p in pieces):
        raise OptionError(f"invalid mapping specified: {what}={value}")
    nums = [int(p) for p in pieces]
    ranges = tuple(Range(*nums[i : i + 3]) for i in range(0, len(nums), 3))
    for r in ranges:
        if r.length == 0 or max(r.stored, r.shown) + r.length > 1 << 32:
            raise OptionError(f"invalid mapping specified: {what}={value} (range out of bounds)")
    for side in ("stored", "shown"):
        spans = sorted((getattr(r, side), getattr(r, side) + r.length) for r in ranges)
        if any(a[1] > b[0] for a, b in zip(spans, spans[1:], strict=False)):
            raise OptionError(f"invalid mapping specified: {what}={value} (ranges overlap)")
    return IdMap(ranges, overflow)


def overflow_ids() -> tuple[int, int]:
    """The kernel's overflow uid and gid (what an unmapped id shows as)."""
    out = []
    for kind in ("uid", "gid"):
        try:
            with open(f"/proc/sys/kernel/overflow{kind}") as f:
                out.append(int(f.read().strip()))
        except (OSError, ValueError):
            out.append(OVERFLOW_DEFAULT)
    return out[0], out[1]


class Owners(NamedTuple):
    """The mount's uid and gid maps; either may be None (that kind is not shifted)."""

    uids: IdMap | None = None
    gids: IdMap | None = None

    def __bool__(self) -> bool:
        return self.uids is not None or self.gids is not None

    def shown(self, uid: int, gid: int) -> tuple[int, int]:
        return (
            self.uids.shown(uid) if self.uids else uid,
            self.gids.shown(gid) if self.gids else gid,
        )

    def stored(self, uid: int, gid: int) -> tuple[int, int]:
        """Stored ids for shown ones; -1 (chown's "leave it") stays -1."""
        return (
            uid if uid == -1 or not self.uids else self.uids.stored(uid),
            gid if gid == -1 or not self.gids else self.gids.stored(gid),
        )

    def xattr_shown(self, name: bytes, value: bytes) -> bytes:
        """An xattr value as read from a layer, with the ids inside it shifted to shown."""
        return self._xattr(name, value, to_shown=True)

    def xattr_stored(self, name: bytes, value: bytes) -> bytes:
        """An xattr value as given by a caller, with the ids inside it shifted to stored."""
        return self._xattr(name, value, to_shown=False)

    def _xattr(self, name: bytes, value: bytes, to_shown: bool) -> bytes:
        if name == CAPABILITY_XATTR and self.uids is not None:
            return _capability(value, self.uids.shown if to_shown else self.uids.stored)
        if name == acl.ACCESS or name == acl.DEFAULT:
            return _acl(value, self, to_shown)
        return value


def _capability(value: bytes, shift: Callable[[int], int]) -> bytes:
    """vfs_ns_cap_data (v3) ends with the root uid of the namespace the capability is for."""
    if len(value) != _CAP_V3_SIZE or struct.unpack_from("<I", value)[0] & 0xFF000000 != _CAP_V3:
        return value
    rootid = struct.unpack_from("<I", value, _CAP_V3_SIZE - 4)[0]
    out = bytearray(value)
    struct.pack_into("<I", out, _CAP_V3_SIZE - 4, shift(rootid))
    return bytes(out)


def _acl(value: bytes, owners: Owners, to_shown: bool) -> bytes:
    """A POSIX ACL (`acl.entries`): ACL_USER entries hold a uid, ACL_GROUP entries a gid.  A
    value of another shape is passed on as it is (the kernel, or the real file system,
    refuses it with EINVAL as it would without a map)."""
    entries = acl.entries(value)
    if entries is None:
        return value
    for e in entries:
        ids = owners.uids if e[0] == acl.USER else owners.gids if e[0] == acl.GROUP else None
        if ids is not None:
            e[2] = ids.shown(e[2]) if to_shown else ids.stored(e[2])
    return acl.pack(entries)
