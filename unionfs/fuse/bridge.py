"""The bridge: drives the shared handler class (`UnionOperations`) from wire requests.

Like go-fuse's `fs/bridge.go`: each method takes the request header and the decoded arguments,
calls the same handler the pyfuse3 transport calls, and packs the handler's pyfuse3 objects
(EntryAttributes, FileInfo, StatvfsData) into the wire reply.  Failures are not translated
here: the handlers raise FUSEError (which carries an errno) and the session turns any
exception into an errno in one place (`session.errno_of`).  So both transports sit over one
handler layer and cannot drift.

Kernel caching decided here, each only when INIT negotiated it (`Conn`):
  - OPEN answers FOPEN_KEEP_CACHE (when the handler asks, as today) and FOPEN_NOFLUSH;
    an OPEN for reading of a small lower file first stores its data in the page cache
    (FUSE_NOTIFY_STORE, `Bridge._store`), so its reads send no READ;
  - OPENDIR answers FOPEN_CACHE_DIR|FOPEN_KEEP_CACHE for directories that are not in the
    upper (lower-only: their listing changes only by a request through this mount, and the
    kernel drops its cached listing itself when it sends one: fuse_dir_changed bumps the
    directory's i_version); upper directories are not cached;
  - a stack without an upper answers OPEN/OPENDIR with ENOSYS (no-open): the kernel then
    sends fh 0, and this bridge keeps one handle per inode, released at FORGET.
FUSE_HANDLE_KILLPRIV_V2: the kernel leaves setuid/setgid to us and flags the requests where
its VFS would clear them (a write, a truncate, an open with O_TRUNC by a caller without
CAP_FSETID); the bridge then calls `kill_suidgid`.  security.capability needs nothing: the
real file system drops it itself on our write and truncate, and chown clears all three.
Lookup counts: the handlers count every entry they hand out (lookup, create, every
READDIRPLUS entry but . and ..); for plain READDIR, which creates no kernel reference, the
bridge gives the counts back.
Concurrency: trio, one thread; no state is held across an await except the no-open maps,
which are filled after the await that opened the handle.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import struct
import time
from collections.abc import Callable
from typing import Any

from ..operations import Attrs, shown_ino  # imported after INIT (run.py)
from . import wire
from .init import Conn
from .passthrough import Backings, Conflict
from .wire import Header

log = logging.getLogger("layerfs")

# Lower files up to this size are stored at open (`Bridge._store`): the kernel's first
# read(2) of a file would read ahead this far anyway (the default window), and measured
# per file (first read, lower in the page cache), storing wins up to 200 KiB (64 KiB:
# 119 → 79 µs, 200 KiB: 195 → 156 µs) and no longer at 900 KiB.
STORE_MAX = 128 << 10
_O_DIRECT = getattr(os, "O_DIRECT", 0)


# fields of a packed fuse_entry_out (wire.ENTRY_OUT): the node id; from the attributes at
# byte 40, st_ino as shown, st_size, and (with the shown st_ino) st_mode at byte 100
_NODEID = struct.Struct("<Q")
_SHOWN_INO = struct.Struct("<40xQ")
_SIZE = struct.Struct("<48xQ")
_INO_MODE = struct.Struct("<40xQ52xI")


class Kept:
    """A lower object's reply as the handlers keep it on its node (`Node.reply`: the `keep`
    UnionOperations is given): its fuse_entry_out alone, ~220 bytes.  The `Attrs` it is made
    from kept its numbers as Python ints beside the same bytes, ~540 bytes for every lower
    object the kernel knows (a `find` of a million-file image keeps a million).  A kept
    reply is handed out again and again (LOOKUP, GETATTR, every READDIRPLUS entry) and never
    changed: a change of the object drops it (Node.invalidate).  The fields its readers use
    are read from the bytes (the node id, the st_ino shown, st_size; st_mode with the st_ino
    in `ino_mode`); any other through `expand`, which makes the `Attrs` again (FUSE_STATX;
    tests)."""

    __slots__ = ("entry",)
    kept = True  # operations.shown_ino's sign

    def __init__(self, entry: bytes) -> None:
        self.entry = entry

    @property
    def st_ino(self) -> int:  # the node id, as in an Attrs
        return int(_NODEID.unpack_from(self.entry)[0])

    @property
    def shown_ino(self) -> int:
        return int(_SHOWN_INO.unpack_from(self.entry)[0])

    @property
    def st_size(self) -> int:
        return int(_SIZE.unpack_from(self.entry)[0])

    def ino_mode(self) -> tuple[int, int]:
        """The st_ino shown and st_mode, in one unpack (a READDIRPLUS entry's dirent)."""
        ino, mode = _INO_MODE.unpack_from(self.entry)
        return ino, mode

    def attr_out(self) -> bytes:
        """fuse_attr_out (a GETATTR's reply): fuse_entry_out's attr_valid, its nanoseconds,
        padding and the same attributes."""
        e = self.entry
        return e[24:32] + e[36:40] + b"\0\0\0\0" + e[40:]

    def expand(self) -> Attrs:
        """The reply as the `Attrs` it was made from (timeouts to the nanosecond)."""
        fields = wire.ENTRY_OUT.unpack(self.entry)
        nodeid, generation, es, ats, ens, atn, ino, size, blocks, at, mt, ct = fields[:12]
        atns, mtns, ctns, mode, nlink, uid, gid, rdev, blksize = fields[12:21]
        a = Attrs()
        a.st_ino, a.generation = nodeid, generation
        a.shown_ino = None if ino == nodeid else ino
        a.entry_timeout, a.attr_timeout = es + ens / 1e9, ats + atn / 1e9
        a.st_mode, a.st_nlink, a.st_uid, a.st_gid, a.st_rdev = mode, nlink, uid, gid, rdev
        a.st_size, a.st_blksize, a.st_blocks = size, blksize, blocks
        a.st_atime_ns = wire.signed64(at) * 1_000_000_000 + atns
        a.st_mtime_ns = wire.signed64(mt) * 1_000_000_000 + mtns
        a.st_ctime_ns = wire.signed64(ct) * 1_000_000_000 + ctns
        a.packed_entry = self.entry
        return a

    def __getattr__(self, name: str) -> Any:  # a field not read from the bytes above
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.expand(), name)


def keep(attrs: Any) -> Any:
    """What UnionOperations keeps of a lower object's reply: a `Kept` (a device node keeps
    its `Attrs`: the wire's rdev is 32 bits, its dev_t may not be)."""
    if type(attrs) is not Attrs or attrs.st_rdev:
        return attrs
    return Kept(_entry(attrs))


def _packed(attrs: Any, slot: str, pack: Callable[[Any, int], bytes]) -> bytes:
    """A handler's reply packed by `pack` (node id and shown st_ino apart), once per reply:
    kept in its `slot` (`Attrs.packed_entry`, `packed_attr`), as a lower object's reply is
    handed out again and again (1.6 µs saved each time)."""
    if type(attrs) is not Attrs:  # pyfuse3's EntryAttributes (tests on that transport)
        return pack(attrs, shown_ino(attrs))
    packed = getattr(attrs, slot)
    if packed is None:
        packed = pack(attrs, shown_ino(attrs))
        setattr(attrs, slot, packed)
    return packed


def _entry(attrs: Any) -> bytes:
    """fuse_entry_out of a handler's reply."""
    if type(attrs) is Kept:
        return attrs.entry
    return _packed(attrs, "packed_entry", wire.pack_entry)


def _attr_out(attrs: Any) -> bytes:
    """fuse_attr_out of a handler's reply."""
    if type(attrs) is Kept:
        return attrs.attr_out()
    return _packed(attrs, "packed_attr", wire.pack_attr_out)


def _ino_mode(attrs: Any) -> tuple[int, int]:
    """A reply's st_ino as shown, and its st_mode (a dirent's)."""
    if type(attrs) is Kept:
        return attrs.ino_mode()
    return shown_ino(attrs), attrs.st_mode


class Ctx:
    """What pyfuse3's RequestContext offers handlers."""

    __slots__ = ("uid", "gid", "pid", "umask")

    def __init__(self, h: Header, umask: int = 0) -> None:
        self.uid, self.gid, self.pid, self.umask = h.uid, h.gid, h.pid, umask

    def __repr__(self) -> str:
        return f"ctx(uid={self.uid},gid={self.gid},pid={self.pid})"


class Errno(Exception):
    def __init__(self, err: int) -> None:
        super().__init__(os.strerror(err))
        self.errno = err


class SetattrFields:
    """pyfuse3.SetattrFields' names, settable."""

    __slots__ = ("update_atime", "update_mtime", "update_ctime", "update_mode", "update_uid",
                 "update_gid", "update_size", "sets_times", "flushes_times")  # fmt: skip

    def __init__(self, valid: int) -> None:
        self.update_atime = bool(valid & (wire.FATTR_ATIME | wire.FATTR_ATIME_NOW))
        self.update_mtime = bool(valid & (wire.FATTR_MTIME | wire.FATTR_MTIME_NOW))
        self.update_ctime = bool(valid & wire.FATTR_CTIME)
        self.update_mode = bool(valid & wire.FATTR_MODE)
        self.update_uid = bool(valid & wire.FATTR_UID)
        self.update_gid = bool(valid & wire.FATTR_GID)
        self.update_size = bool(valid & wire.FATTR_SIZE)
        # a time given, not "now" (the VFS's ATTR_TIMES_SET: refused on append-only files)
        explicit_a = valid & wire.FATTR_ATIME and not valid & wire.FATTR_ATIME_NOW
        explicit_m = valid & wire.FATTR_MTIME and not valid & wire.FATTR_MTIME_NOW
        self.sets_times = bool(explicit_a or explicit_m)
        # the writeback cache's own times (fuse_flush_times: mtime and ctime, nothing else),
        # kept by the kernel for writes already made: no caller's change (Bridge.setattr)
        self.flushes_times = False


class NewAttrs:
    """The values of a SETATTR, with EntryAttributes' names."""

    __slots__ = ("st_mode", "st_uid", "st_gid", "st_size", "st_atime_ns", "st_mtime_ns",
                 "st_ctime_ns")  # fmt: skip

    def __init__(self, mode: int, uid: int, gid: int, size: int, times: tuple[int, int, int]):
        self.st_mode, self.st_uid, self.st_gid, self.st_size = mode, uid, gid, size
        self.st_atime_ns, self.st_mtime_ns, self.st_ctime_ns = times


def setattr_args(fields: tuple[int, ...]) -> tuple[NewAttrs, SetattrFields, int | None]:
    valid, _, fh, size, _lo, atime, mtime, ctime, atns, mtns, ctns, mode, _, uid, gid, _ = fields
    now = time.time_ns()
    times = (  # before 1970, the seconds come as two's complement
        now if valid & wire.FATTR_ATIME_NOW else wire.signed64(atime) * 1_000_000_000 + atns,
        now if valid & wire.FATTR_MTIME_NOW else wire.signed64(mtime) * 1_000_000_000 + mtns,
        wire.signed64(ctime) * 1_000_000_000 + ctns,
    )
    attrs = NewAttrs(mode, uid, gid, size, times)
    which = SetattrFields(valid)
    if (
        which.sets_times
        and valid & wire.FATTR_ATIME_NOW
        and not valid & wire.FATTR_MTIME_NOW
        and abs(times[1] - now) < 2_000_000_000
    ):
        # utime(NULL) under the writeback cache: the kernel trusts its own mtime and sends it
        # as a time (its clock's now), with atime still "now"; the VFS counts it as "now",
        # which an append-only file allows (a time that close to now changes nothing else)
        which.sets_times = False
    return attrs, which, (fh if valid & wire.FATTR_FH else None)


class DirBuffer:
    """The readdir token: entries packed until the kernel's buffer is full."""

    __slots__ = ("size", "plus", "parts", "used", "counted")

    def __init__(self, size: int, plus: bool) -> None:
        self.size, self.plus = size, plus
        self.parts: list[bytes] = []
        self.used = 0
        self.counted: list[int] = []  # inodes the handler counted for a plain READDIR

    def add(self, name: bytes, attrs: Any, next_id: int) -> bool:
        reclen = wire.dirent_size(name, self.plus)
        if self.used + reclen > self.size:
            return False
        dot = name in (b".", b"..")
        entry = None
        if self.plus:
            entry = bytes(wire.ENTRY_OUT.size) if dot else _entry(attrs)
        elif not dot:
            self.counted.append(attrs.st_ino)  # the node id
        ino, mode = _ino_mode(attrs)  # d_ino is what stat shows
        self.parts.append(wire.pack_dirent(ino, next_id, mode, name, entry))
        self.used += reclen
        return True

    def add_bare(self, name: bytes, ino: int, mode: int, next_id: int) -> bool:
        """An entry listed without attributes (nodeid 0 in READDIRPLUS: the kernel makes no
        reference and looks the name up when asked), for an object whose lookup fails."""
        reclen = wire.dirent_size(name, self.plus)
        if self.used + reclen > self.size:
            return False
        entry = bytes(wire.ENTRY_OUT.size) if self.plus else None
        self.parts.append(wire.pack_dirent(ino, next_id, mode, name, entry))
        self.used += reclen
        return True


def readdir_reply(token: DirBuffer, name: bytes, attrs: Any, next_id: int) -> bool:
    """The emission function handed to UnionOperations (pyfuse3.readdir_reply's shape)."""
    return token.add(name, attrs, next_id)


def _sized(value: bytes, size: int) -> bytes:
    """getxattr/listxattr: size 0 asks for the length; a short buffer is ERANGE."""
    if size == 0:
        return wire.GETXATTR_OUT.pack(len(value), 0)
    if len(value) > size:
        raise Errno(errno.ERANGE)
    return value


_COPY_UP_FIRST = frozenset({"SETATTR", "SETXATTR", "REMOVEXATTR", "OPEN"})


class Bridge:
    def __init__(self, ops: Any, conn: Conn, devfd: int = -1) -> None:
        self.ops = ops
        self.conn = conn
        self.backings = Backings(devfd, conn.passthrough and devfd >= 0, ops.gate)
        self.devfd = devfd
        if devfd >= 0:
            ops.stack.listing_changed = self._listing_changed
            ops.stack.attrs_changed = self._attrs_changed
        self._node_fh: dict[int, int] = {}  # no-open: inode → the handler's file handle
        self._node_dh: dict[int, int] = {}  # no-opendir: inode → the handler's dir handle
        self._opened: set[int] = set()  # inodes with an OPEN answered since the kernel made
        # them (`_store`)

    def may_wait(self, name: str, nodeid: int) -> bool:
        """Might the GATED request `name` on node `nodeid` wait now?  At the freeze gate while
        the mount is frozen (a live commit).  An UNLINK also behind a copy-up in progress
        (`_quiesce`), or, with index=on, for its own copy-up of a hard-linked file; a request
        that copies its node up first (SETATTR, SETXATTR, REMOVEXATTR, an OPEN for writing)
        while the node is not in the upper yet, or holds only metadata there (metacopy=on): a
        copy-up takes the node's lock, and a big one goes to a worker thread; measured no
        faster inline when small."""
        ops = self.ops
        if ops.gate.frozen:
            return True
        if name == "UNLINK":
            return ops.copying > 0 or ops.stack.index
        if name in _COPY_UP_FIRST:
            node = ops.stack.known(nodeid)
            if node is None or node.data is not None:  # metacopy=on: its data to copy up
                return True
            return not (node.is_dir or ops.stack.in_upper(node))
        return False

    def _listing_changed(self, node: Any) -> None:
        """The kernel keeps every listing (no-opendir: FOPEN_CACHE_DIR for all directories)
        and drops one itself only when a request through it changes the directory; for any
        other change, drop its pages and attributes (offset 0, the whole length).  A
        directory cannot hold dirty pages, so this never waits on a writeback."""
        self._inval_inode(node, 0)

    def _attrs_changed(self, node: Any) -> None:
        """The node's attributes changed behind the kernel's back: it drops the ones it keeps
        (offset -1: attributes only, the pages stay; no lock is taken, so this is safe while
        a request on the node is in flight)."""
        self._inval_inode(node, -1)

    def _inval_inode(self, node: Any, offset: int) -> None:
        """FUSE_NOTIFY_INVAL_INODE for `node` from `offset` (-1: attributes only); ENOENT
        (the kernel does not know the node) is fine."""
        message = wire.pack_notify(
            wire.NOTIFY_INVAL_INODE_CODE, wire.NOTIFY_INVAL_INODE.pack(node.ino, offset, 0)
        )
        try:
            os.write(self.devfd, message)
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                log.warning("notify_inval_inode(%d, offset %d): %s", node.ino, offset, exc)

    # ----- names and attributes --------------------------------------------------------
    async def lookup(self, h: Header, name: bytes) -> bytes:
        return _entry(await self.ops.lookup(h.nodeid, name, Ctx(h)))

    async def forget(self, h: Header, pairs: list[tuple[int, int]]) -> None:
        await self.ops.forget(pairs)
        nodes = self.ops.stack.nodes
        for ino, _ in pairs:
            if ino not in nodes:
                self._opened.discard(ino)  # the kernel's inode, and its pages, are gone
                await self._drop_node_handles(ino)

    async def _drop_node_handles(self, ino: int) -> None:
        fh = self._node_fh.pop(ino, None)
        if fh is not None:
            await self.ops.release(fh)
        dh = self._node_dh.pop(ino, None)
        if dh is not None:
            await self.ops.releasedir(dh)

    async def close(self) -> None:
        """Release the no-open handles (at the end of the session)."""
        for ino in list(self._node_fh) + list(self._node_dh):
            await self._drop_node_handles(ino)

    async def getattr(self, h: Header) -> bytes:
        return _attr_out(await self.ops.getattr(h.nodeid, Ctx(h)))

    async def statx(self, h: Header, sx_mask: int) -> bytes:
        """FUSE_STATX (protocol 7.39): the kernel asks it only for what GETATTR lacks, the
        birth time (`statx(2)` with STATX_BTIME: `stat(1)`'s "Birth")."""
        attrs = await self.ops.getattr(h.nodeid, Ctx(h))
        if type(attrs) is Kept:
            attrs = attrs.expand()
        btime = await self.ops.btime(h.nodeid) if sx_mask & wire.STATX_BTIME else None
        return wire.pack_statx_out(attrs, shown_ino(attrs), btime)

    async def setattr(self, h: Header, fields: tuple[int, ...]) -> bytes:
        attrs, which, fh = setattr_args(fields)
        if self.conn.flags & wire.WRITEBACK_CACHE:
            which.flushes_times = fields[0] & ~wire.FATTR_FH == wire.FATTR_MTIME | wire.FATTR_CTIME
        entry = await self.ops.setattr(h.nodeid, attrs, which, fh, Ctx(h))
        if self.conn.killpriv and fields[0] & wire.FATTR_KILL_SUIDGID and which.update_size:
            entry = self.ops.kill_suidgid(h.nodeid, fh, Ctx(h))  # a truncate, as the VFS would
        return _attr_out(entry)

    async def readlink(self, h: Header) -> bytes:
        return bytes(await self.ops.readlink(h.nodeid, Ctx(h)))

    async def access(self, h: Header, mask: int) -> bytes:
        if not await self.ops.access(h.nodeid, mask, Ctx(h)):
            raise Errno(errno.EACCES)
        return b""

    async def statfs(self, h: Header) -> bytes:
        s = await self.ops.statfs(Ctx(h))
        return wire.STATFS_OUT.pack(s.f_blocks, s.f_bfree, s.f_bavail, s.f_files, s.f_ffree,
                                    s.f_bsize, s.f_namemax, s.f_frsize, 0)  # fmt: skip

    # ----- xattrs -------------------------------------------------------------------------
    async def getxattr(self, h: Header, name: bytes, size: int) -> bytes | int:
        value = self.ops.xattr_value(h.nodeid, name)
        if isinstance(value, int):
            return value  # the errno (see Session._answer)
        return _sized(value, size)

    async def listxattr(self, h: Header, size: int) -> bytes:
        names = await self.ops.listxattr(h.nodeid, Ctx(h))
        return _sized(b"".join(n + b"\0" for n in names), size)

    async def setxattr(self, h: Header, name: bytes, value: bytes, flags: int, sx_flags: int
                       ) -> bytes:  # fmt: skip
        kill_sgid = bool(sx_flags & wire.SETXATTR_ACL_KILL_SGID)
        await self.ops.setxattr(h.nodeid, name, value, Ctx(h), flags, kill_sgid)
        return b""

    async def removexattr(self, h: Header, name: bytes) -> bytes:
        await self.ops.removexattr(h.nodeid, name, Ctx(h))
        return b""

    # ----- ioctl: inode flags (lsattr/chattr) ---------------------------------------------
    async def ioctl(self, h: Header, fh: int, flags: int, cmd: int, data: bytes,
                    out_size: int) -> bytes:  # fmt: skip
        """FUSE_IOCTL: the inode flags' ioctls (operations.fileattr_get/_set); ENOTTY for any
        other (isatty's TCGETS on a file, ...), and for an unrestricted one (CUSE only)."""
        if flags & wire.IOCTL_UNRESTRICTED:
            raise Errno(errno.ENOTTY)
        out = b""
        if cmd in wire.IOCTL_GETTERS:
            out = (await self.ops.fileattr_get(h.nodeid, wire.IOCTL_GETTERS[cmd]))[:out_size]
        elif cmd in wire.IOCTL_SETTERS:
            await self.ops.fileattr_set(h.nodeid, data, wire.IOCTL_SETTERS[cmd])
            self._attrs_changed(self.ops.stack.node(h.nodeid))  # its ctime
        else:
            raise Errno(errno.ENOTTY)
        return wire.IOCTL_OUT.pack(0, 0, 0, 0) + out

    # ----- the namespace --------------------------------------------------------------------
    async def mknod(self, h: Header, name: bytes, mode: int, rdev: int, umask: int) -> bytes:
        return _entry(await self.ops.mknod(h.nodeid, name, mode, rdev, Ctx(h, umask)))

    async def mkdir(self, h: Header, name: bytes, mode: int, umask: int) -> bytes:
        return _entry(await self.ops.mkdir(h.nodeid, name, mode, Ctx(h, umask)))

    async def symlink(self, h: Header, name: bytes, target: bytes) -> bytes:
        return _entry(await self.ops.symlink(h.nodeid, name, target, Ctx(h)))

    async def link(self, h: Header, old: int, name: bytes) -> bytes:
        return _entry(await self.ops.link(old, h.nodeid, name, Ctx(h)))

    async def unlink(self, h: Header, name: bytes) -> bytes:
        await self.ops.unlink(h.nodeid, name, Ctx(h))
        return b""

    async def rmdir(self, h: Header, name: bytes) -> bytes:
        await self.ops.rmdir(h.nodeid, name, Ctx(h))
        return b""

    async def rename(self, h: Header, old: bytes, newdir: int, new: bytes, flags: int) -> bytes:
        await self.ops.rename(h.nodeid, old, newdir, new, flags, Ctx(h))
        return b""

    # ----- files ------------------------------------------------------------------------------
    def _open_flags(self, info: Any) -> int:
        flags = wire.FOPEN_KEEP_CACHE if info.keep_cache else 0
        if info.direct_io:
            flags |= wire.FOPEN_DIRECT_IO
        if self.conn.noflush:
            flags |= wire.FOPEN_NOFLUSH
        return flags

    async def _open_out(self, ino: int, info: Any, store: bool = False,
                        created: bool = False) -> bytes:  # fmt: skip
        """fuse_open_out of a new handle: cached, or passed through (passthrough.py).  With
        `store` (an open for reading), a small lower file's data is first put into the
        kernel's page cache (`_store`); `created`: CREATE made the handle, for writing
        only, not appending (it may pass through)."""
        oflags, backing_id = self._open_flags(info), 0
        if not (self.backings.enabled or store):
            return wire.OPEN_OUT.pack(info.fh, oflags, backing_id)
        stack = self.ops.stack
        node = stack.node(ino)
        lower = not stack.in_upper(node)
        size = self.ops.lower_size(node) if lower else 0
        if self.backings.enabled:
            writable = self.ops.handle_writable(info.fh)
            # a created handle passes through when it is its new inode's only open file
            # and no freezer holds or waits; an open for writing that would join one was
            # held at the gate while frozen (UnionOperations.open)
            created = (created and self.ops.gate.may_bypass
                       and self.ops.open_handles(ino) == 1)  # fmt: skip
            fd = -1  # a lazy handle stays unopened unless it passes through (FileHandle)
            if created or self.backings.needs_fd(ino, writable, lower, size):
                fd = self.ops.handle_fd(info.fh)
            try:
                backing_id = self.backings.open(ino, info.fh, fd, writable, lower, size,
                                                created)  # fmt: skip
            except Conflict:
                await self.ops.release(info.fh)
                raise
            if backing_id:
                oflags = (oflags & ~wire.FOPEN_KEEP_CACHE) | wire.FOPEN_PASSTHROUGH
        if (store and lower and node.kind == stat.S_IFREG and 0 < size <= STORE_MAX
                and oflags & wire.FOPEN_KEEP_CACHE and ino not in self._opened):  # fmt: skip
            self._store(ino, info.fh, size)
        return wire.OPEN_OUT.pack(info.fh, oflags, backing_id)

    def _store(self, ino: int, fh: int, size: int) -> None:
        """Put the whole of a small lower file (`size` bytes) into the kernel's page cache
        (FUSE_NOTIFY_STORE), before the OPEN reply that keeps it (FOPEN_KEEP_CACHE), so the
        reader's read(2) is served from the cache instead of a READ request.  That also saves
        a GETATTR later: on a writable mount the kernel drops an inode's cached atime after
        every READ it sends (fuse_invalidate_atime), and a stored page is no READ.  Lower
        files never change (the real fd is O_NOATIME), so the data is what READ would give;
        the size is the one the kernel already has, so the store changes no attribute.
        Only while no OPEN of the kernel's inode has been answered (`_opened`, emptied of it
        at its FORGET): the kernel locks a page while a READ of it is in flight, and a store
        into a locked page waits for that READ, which this loop would answer only after the
        store: a deadlock.  Before any OPEN is answered no file of the inode is open (no
        read, no mmap), so no page of it can be locked.  Pages the kernel drops later come
        back by READ, as before.  Best effort: any failure leaves it to READ.  The data goes
        out by writev beside its header (wire.pack_notify would copy it once more)."""
        fd = self.ops.handle_fd(fh)
        try:
            data = os.pread(fd, size, 0)
            if len(data) != size:
                return
            head = wire.OUT_HEADER.pack(wire.OUT_HEADER.size + wire.NOTIFY_STORE.size + size,
                                        wire.NOTIFY_STORE_CODE, 0)  # fmt: skip
            os.writev(self.devfd, [head, wire.NOTIFY_STORE.pack(ino, 0, size, 0), data])
        except OSError as exc:
            log.debug("notify_store(%d): %s", ino, exc)

    async def open(self, h: Header, flags: int, open_flags: int = 0) -> bytes:
        if self.conn.no_open:
            raise Errno(errno.ENOSYS)  # once: the kernel stops sending OPEN/RELEASE/FLUSH
        info = await self.ops.open(h.nodeid, flags, Ctx(h))
        if self.conn.killpriv and open_flags & wire.OPEN_KILL_SUIDGID:
            self.ops.kill_suidgid(h.nodeid, info.fh, Ctx(h))  # open(O_TRUNC), as the VFS would
        store = self.devfd >= 0 and flags & (os.O_ACCMODE | os.O_TRUNC | _O_DIRECT) == os.O_RDONLY
        out = await self._open_out(h.nodeid, info, store)
        self._opened.add(h.nodeid)  # answered next, with no await between (see `_store`)
        return out

    async def create(self, h: Header, name: bytes, mode: int, flags: int, umask: int,
                     open_flags: int = 0) -> bytes:  # fmt: skip
        info, attrs = await self.ops.create(h.nodeid, name, mode, flags, Ctx(h, umask))
        if self.conn.killpriv and open_flags & wire.OPEN_KILL_SUIDGID:
            attrs = self.ops.kill_suidgid(attrs.st_ino, info.fh, Ctx(h))
        created = flags & (os.O_ACCMODE | os.O_APPEND) == os.O_WRONLY
        return _entry(attrs) + await self._open_out(attrs.st_ino, info, created=created)

    async def tmpfile(self, h: Header, name: bytes, mode: int, flags: int, umask: int,
                      open_flags: int = 0) -> bytes:  # fmt: skip
        """open(2) with O_TMPFILE; answered as CREATE is (`name` is the kernel's "/")."""
        info, attrs = await self.ops.tmpfile(h.nodeid, mode, flags, Ctx(h, umask))
        return _entry(attrs) + await self._open_out(attrs.st_ino, info)

    async def _file(self, h: Header, fh: int) -> int:
        if fh == 0 and self.conn.no_open:
            fh = self._node_fh.get(h.nodeid, 0)
            if fh == 0:
                fh = (await self.ops.open(h.nodeid, os.O_RDONLY, Ctx(h))).fh
                self._node_fh[h.nodeid] = fh
        return fh

    async def read(self, h: Header, fh: int, off: int, size: int) -> bytes:
        return bytes(await self.ops.read(await self._file(h, fh), off, size))

    async def write(self, h: Header, fh: int, off: int, data: bytes | memoryview,
                    wflags: int = 0) -> bytes:  # fmt: skip
        if self.conn.killpriv and wflags & wire.WRITE_KILL_SUIDGID:
            self.ops.kill_suidgid(h.nodeid, fh, Ctx(h))  # before the data, as the VFS does
        return wire.WRITE_OUT.pack(await self.ops.write(fh, off, data), 0)

    async def flush(self, h: Header, fh: int) -> bytes:
        await self.ops.flush(fh)
        return b""

    async def release(self, h: Header, fh: int) -> bytes:
        self.backings.release(fh)
        await self.ops.release(fh)
        return b""

    async def fsync(self, h: Header, fh: int, datasync: bool) -> bytes:
        await self.ops.fsync(await self._file(h, fh), datasync)
        return b""

    async def fallocate(self, h: Header, fh: int, off: int, length: int, mode: int) -> bytes:
        await self.ops.fallocate(await self._file(h, fh), off, length, mode)
        return b""

    async def copy_file_range(self, h: Header, *args: int) -> bytes:
        """copy_file_range(2) between two files of this mount, made by the daemon on the
        real files (a clone where their filesystem shares extents): one request, where the
        kernel's fallback reads and writes every page through the mount."""
        return wire.WRITE_OUT.pack(await self._copy_file_range(h, *args), 0)

    async def copy_file_range_64(self, h: Header, *args: int) -> bytes:
        """COPY_FILE_RANGE_64 (protocol 7.45): the same, the count as a u64."""
        return wire.COPY_FILE_RANGE_64_OUT.pack(await self._copy_file_range(h, *args))

    async def _copy_file_range(self, h: Header, fh_in: int, off_in: int, fh_out: int,
                               off_out: int, length: int, flags: int) -> int:  # fmt: skip
        fh_in = await self._file(h, fh_in)
        return await self.ops.copy_file_range(fh_in, off_in, fh_out, off_out, length, flags)

    async def lseek(self, h: Header, fh: int, off: int, whence: int) -> bytes:
        """SEEK_DATA / SEEK_HOLE.  With the writeback cache the kernel holds written data
        the upper file has not got yet, and asks no flush before an LSEEK (fuse_lseek), so
        the upper's holes could hide it: ENOSYS, once, and the kernel answers every LSEEK
        itself from then on as for a file without holes, as it did before LSEEK existed."""
        if self.conn.flags & wire.WRITEBACK_CACHE:
            raise Errno(errno.ENOSYS)
        fh = await self._file(h, fh)
        exact = self._holes_settled(h.nodeid)
        return wire.LSEEK_OUT.pack(await self.ops.lseek(fh, off, whence, exact))

    def _holes_settled(self, ino: int) -> bool:
        """Is the upper file's map of data and holes what a reader of inode `ino` sees?  Not
        while a file of it is open for writing through the page cache (a shared writable
        mmap dirties pages that reach the upper only at writeback; a close writes them back
        before its RELEASE), nor while its readers pass through to its lower file (their
        fds here follow the upper copy: `UnionOperations._reopen`)."""
        if self.backings.reads_lower(ino):
            return False
        return all(self.backings.passes_through(fh) for fh in self.ops.writable_handles(ino))

    # ----- directories --------------------------------------------------------------------------
    async def opendir(self, h: Header, flags: int) -> bytes:
        if self.conn.no_opendir:
            raise Errno(errno.ENOSYS)  # once: the kernel caches listings itself from now on
        fh = await self.ops.opendir(h.nodeid, Ctx(h))
        oflags = 0
        if self.conn.cache_dir and not self.ops.stack.in_upper(self.ops.stack.node(h.nodeid)):
            oflags = wire.FOPEN_CACHE_DIR | wire.FOPEN_KEEP_CACHE
        return wire.OPEN_OUT.pack(fh, oflags, 0)

    async def _dir(self, h: Header, fh: int) -> int:
        if fh == 0 and self.conn.no_opendir:
            fh = self._node_dh.get(h.nodeid, 0)
            if fh == 0:
                fh = await self.ops.opendir(h.nodeid, Ctx(h))
                self._node_dh[h.nodeid] = fh
        return fh

    async def readdirplus(self, h: Header, fh: int, off: int, size: int) -> bytes:
        token = DirBuffer(size, plus=True)
        await self.ops.readdir(await self._dir(h, fh), off, token)
        return b"".join(token.parts)

    async def readdir(self, h: Header, fh: int, off: int, size: int) -> bytes:
        token = DirBuffer(size, plus=False)
        await self.ops.readdir(await self._dir(h, fh), off, token)
        for ino in token.counted:  # no kernel reference was made: give the counts back
            self.ops.stack.forget(ino, 1)
        return b"".join(token.parts)

    async def releasedir(self, h: Header, fh: int) -> bytes:
        await self.ops.releasedir(fh)
        return b""

    async def fsyncdir(self, h: Header, fh: int, datasync: bool) -> bytes:
        await self.ops.fsyncdir(await self._dir(h, fh), datasync)
        return b""

    async def destroy(self, h: Header) -> bytes:
        await self.close()
        return b""

    async def interrupt(self, h: Header, unique: int) -> None:  # handled by the session
        return None
