"""UnionOperations: the thin pyfuse3 adapter over `LayerStack`.

It only translates: inode numbers and `bytes` names in, `EntryAttributes` out, and every
failure into a `FUSEError` in one place (`_handler`): OSError → its errno, UnionError → its
errno, anything else → logged with its traceback and EIO, so bad input never takes the
daemon down.  `forget`, `init` and `release*` never raise (pyfuse3's contract).

Kernel caching, and why each cache is safe:
  - entry/attr timeouts (and negative entries) are long: lower layers are read-only by
    contract, and every change to the upper goes through this daemon, whose replies update
    the kernel's dentries and attributes as the requests pass;
  - `keep_cache` on open: a file's data changes only through this mount, and the kernel
    drops cached pages itself on writes that pass through it;
  - readdirplus (pyfuse3 always uses it) hands the kernel the attributes of every listed
    entry, priming the dentry cache so `ls -l` and `find` do not look each name up again;
  - the writeback cache (mount option writeback=1): write(2) only dirties the kernel's page
    cache, which is written back later in large WRITE requests.  What it asks of us
    (Documentation/filesystems/fuse-io.rst, libfuse's passthrough_ll.c), and how it is met:
      * the kernel may READ through any handle opened for writing (to fill a partly written
        page): the real file is opened O_RDWR even for O_WRONLY (`_open_flags`);
      * the kernel does O_APPEND itself, from its own i_size: O_APPEND is never passed to the
        real file (a pwrite on an O_APPEND fd would ignore its offset);
      * the kernel owns i_size, mtime and ctime of regular files: it sends SETATTR for the
        times (with or without a handle, also after the name is gone: `_setattr_target`,
        `_gone_entry`), and our attributes of upper files are never cached, so what it reads
        back is the real file;
      * copy-up still happens at open for writing, before the kernel can cache a write;
      * dirty pages are not in the upper until written back: a freeze (control.py) first
        syncs the mount itself, and never syncs other filesystems while frozen, since the
        kernel's WRITE requests are mutating requests the frozen gate holds.
    It is safe because this daemon is the only writer of the upper while mounted (the same
    assumption as the long attribute timeouts above).
Every call on a real object goes through `stack.fs` (relative to the layer roots' fds, no
path-length limit).
Size: over 500 lines because it holds one short handler per FUSE operation (~60 of them) and
the one errno point; the rules live in stack/writer.  GAP(issue-14): split it by operation
family (attributes, files, directories, xattrs) once the transports' branches have landed.
Concurrency: trio, one thread; handlers that do not await are atomic with respect to the
model.  Reads of data use pread on the trio thread (page-cache hits are cheaper than a
thread hop); bulk copies of the write side go to worker threads.  trio is imported where it
is used, not at the top: the native transport answers every request that needs no task
before trio is loaded (fuse/run.py), and only the paths that wait need it.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import logging
import os
import stat
import weakref
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from . import acl, fileattr, fsutil, markers, syscalls
from . import fuseapi as pyfuse3  # pyfuse3 itself, or stand-ins for the native transport
from .atime import AtimePolicy
from .errors import NotEmpty, UnionError
from .fdlimit import FdBudget
from .fsat import PLAIN, Roots
from .gate import Gate
from .idmap import Owners
from .prefetch import Prefetcher
from .stack import Entry, LayerStack, Node
from .writer import Writer

if TYPE_CHECKING:
    import trio

log = logging.getLogger("layerfs")

CACHE_TIMEOUT = 86400.0  # seconds; see the module docstring for why this is safe
_O_DIRECT = getattr(os, "O_DIRECT", 0)  # the daemon's buffers are not aligned for it
SELINUX_XATTR = b"security.selinux"
_HOST_SELINUX = os.path.exists("/sys/fs/selinux")  # a host without SELinux labels nothing

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])
# An attribute reply: pyfuse3's EntryAttributes, or `Attrs` on the native transport
# (`attrs_type`); both have EntryAttributes' names, and pyfuse3 ships no types to tell them by.
# A lower object's reply kept on its node may be what the transport's `keep` made of it.
AttrsReply = Any


def _handler(fn: F) -> F:
    """Log (at debug) and translate every failure of one FUSE handler into an errno."""
    name = fn.__name__

    @functools.wraps(fn)
    async def wrapper(self: UnionOperations, *args: Any) -> Any:
        if self.debug:
            log.debug("%s%r", name, _short(args))
        try:
            return await fn(self, *args)
        except pyfuse3.FUSEError:
            raise
        except UnionError as exc:
            raise pyfuse3.FUSEError(exc.errno) from None
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        except Exception:
            log.exception("%s%r failed", name, _short(args))
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper  # type: ignore[return-value]


def _mutating(fn: F) -> F:
    """Held while the mount is frozen (`control.Gate`), counted while in flight."""

    @functools.wraps(fn)
    async def wrapper(self: UnionOperations, *args: Any) -> Any:
        await self.gate.enter()
        try:
            return await fn(self, *args)
        finally:
            self.gate.leave()

    return wrapper  # type: ignore[return-value]


def _short(args: tuple[Any, ...]) -> tuple[Any, ...]:
    """Arguments as logged with -d: no request context, and data longer than any name (a
    1 MiB write would otherwise log 4 MB)."""
    return tuple(
        f"<{len(a)} bytes>" if isinstance(a, (bytes, memoryview)) and len(a) > 256 else a
        for a in args
        if not isinstance(a, pyfuse3.RequestContext)
    )


class FileHandle:
    """An open file: the real fd (lower until the first write, then upper).

    A read-only open of a lower file opens nothing yet (`fd` -1, `lazy` the lower path and
    flags): the kernel serves most such opens from its page cache (FOPEN_KEEP_CACHE, or the
    data stored at open), so the fd is opened only when something needs it
    (`UnionOperations._fd`: a READ, passthrough, fstat).  The lower path stays valid
    whatever happens to the name in the merged view: lower layers never change, and a
    copy-up moves the handle to the upper at once (`_reopen`)."""

    __slots__ = ("node", "fd", "writable", "uid", "lazy")

    def __init__(
        self, node: Node, fd: int, writable: bool, uid: int,
        lazy: tuple[bytes, int] | None = None,
    ) -> None:  # fmt: skip
        self.node = node
        self.fd = fd
        self.writable = writable
        self.uid = uid  # whose descriptor budget it counts against
        self.lazy = lazy  # (lower path, open flags) while fd is -1


class DirHandle:
    """An open directory: snapshots of its merged entries, so offsets stay stable.

    A read from offset 0 takes a new snapshot; each entry's offset carries the snapshot's
    generation in its high 32 bits, so a reader goes on in the listing it started even
    when another reader of the same handle has started a newer one meanwhile.  A new
    snapshot of the same names in the same order keeps the newest generation: offsets stay
    what they were as long as the directory does not change, as a disk filesystem's do
    (a telldir kept across a reopen; every number up to the last is an offset).  One
    handle per open directory (OPENDIR), or, with no-opendir (the native transport), one
    per directory node shared by every reader: then the kernel keeps the listing and asks
    again only after the directory changed.  A snapshot read to its end is dropped, and
    at most SNAPSHOTS are kept (an older offset, from a seekdir, goes on in the newest).
    """

    __slots__ = ("node", "gen", "names", "snapshots")
    SNAPSHOTS = 4

    def __init__(self, node: Node) -> None:
        self.node = node
        self.gen = -1  # the first snapshot is generation 0: offsets 1, 2, ... as ever
        self.names = 0  # a hash of the newest snapshot's names, in their order
        self.snapshots: dict[int, list[tuple[bytes, Entry]]] = {}

    def snapshot(self, entries: list[tuple[bytes, Entry]]) -> int:
        names = hash(tuple([name for name, _ in entries]))
        if names != self.names or self.gen < 0:
            # 31 bits: offsets stay positive as the kernel's (signed) loff_t and pyfuse3's
            self.gen = (self.gen + 1) & 0x7FFFFFFF
            self.names = names
        self.snapshots.pop(self.gen, None)  # (re)inserted last: the newest is dropped last
        self.snapshots[self.gen] = entries
        while len(self.snapshots) > self.SNAPSHOTS:
            del self.snapshots[next(iter(self.snapshots))]
        return self.gen


class UnionOperations(pyfuse3.Operations):
    supports_dot_lookup = True
    enable_writeback_cache = False  # per mount: see __init__
    # FUSE_POSIX_ACL (pyfuse3 asks for it when the kernel offers it; the native transport's
    # init.Wanted.posix_acl): the kernel checks and caches ACLs, as for kernel overlayfs
    enable_acl = True

    def __init__(
        self,
        stack: LayerStack,
        writer: Writer | None = None,
        debug: bool = False,
        on_init: Callable[[], None] | None = None,
        writeback: bool = False,
        readdir_reply: Callable[[Any, bytes, Any, int], bool] | None = None,
        owners: Owners | None = None,
        volatile: bool = False,
        attrs_type: Callable[[], Any] | None = None,
        prefetch: bool = False,
        atime: AtimePolicy | None = None,
        keep: Callable[[Any], Any] | None = None,
    ) -> None:
        super().__init__()
        # How readdir hands each entry to the transport: pyfuse3's, or the native bridge's.
        self._readdir_reply = readdir_reply or pyfuse3.readdir_reply
        # What attribute replies are made of: pyfuse3's EntryAttributes, which pyfuse3 needs,
        # or `Attrs`, for a transport that packs replies itself (a third of the cost)
        self._attrs = attrs_type or (pyfuse3.EntryAttributes if pyfuse3.PYFUSE3 else Attrs)
        # What a lower object's reply is kept as on its node (`_entry`), for as long as the
        # kernel knows the object: the native transport keeps its wire bytes alone
        # (bridge.Kept: ~220 bytes, against ~540 for the `Attrs` with its numbers and the
        # same bytes); None keeps the reply itself (pyfuse3 needs its EntryAttributes)
        self._keep = keep
        # LOOKUP's answer for a name that is not there: st_ino 0, a negative entry the kernel
        # may cache; one for all (a reply is never changed once handed out, and the native
        # transport packs it once: 6.4 → 4.6 µs a miss in process)
        self._negative = self._attrs()
        self._negative.st_ino = 0
        self._negative.entry_timeout = CACHE_TIMEOUT
        self.stack = stack
        self.writer = writer
        self.debug = debug
        # uidmapping/gidmapping (idmap.py): ids shown are shifted from the ids stored
        self.owners = owners or Owners()
        # volatile (options.py): fsync and fsyncdir skip syncing the upper, as the kernel's
        self.volatile = volatile
        # may reads mark upper atimes: the mount's ro/noatime/nodiratime (atime.py); none
        # given (tests in process), the upper filesystem's own rule
        self.atime = atime or AtimePolicy(None, set())
        # pyfuse3's fuse_init reads this attribute; a read-only mount has nothing to write back
        self.enable_writeback_cache = writeback and writer is not None
        self._on_init = on_init
        self.gate = Gate()
        # a helper lists the subdirectories of what the kernel lists, ahead (prefetch.py)
        self.prefetch = Prefetcher(stack, prefetch)
        # per-node adapter state, kept here rather than in the model; it goes with the node
        # (but for the cached reply of an immutable object: Node.reply, for speed)
        self._locks: weakref.WeakKeyDictionary[Node, trio.Lock] = weakref.WeakKeyDictionary()
        self.copying = 0  # copy-ups holding or awaiting a node's lock (an UNLINK may wait)
        self._files: dict[int, FileHandle] = {}
        self.budget = FdBudget()  # after fdlimit.raise_nofile(): the limit now in force
        self._by_node: dict[int, set[int]] = {}  # inode -> open file handles
        self._dirs: dict[int, DirHandle] = {}
        self._next_fh = 1
        if (self._attrs is not Attrs and _SHOWN_INO_OFFSET is None and writer is not None
                and not stack.index):  # fmt: skip
            log.warning(
                "pyfuse3's reply layout is unknown: hard links broken by copy-up "
                "show one st_ino until remount"
            )

    # ----- lifecycle -----------------------------------------------------------------
    def init(self) -> None:
        # the mount is made: read its flags now, while it is the newest on its mountpoint
        # (atime.py knows it by its device from then on, whatever is mounted over it later)
        self.atime.current()
        try:
            if self._on_init is not None:
                self._on_init()
        except Exception:  # init must never raise
            log.exception("init hook failed")

    def _new_fh(self) -> int:
        fh = self._next_fh
        self._next_fh += 1
        return fh

    # ----- attributes ----------------------------------------------------------------
    def _entry(self, node: Node) -> AttrsReply:
        if node.reply is not None:
            return node.reply
        st = self._stat_for(node)
        a = self._attrs()
        a.st_ino = node.ino
        _set_shown_ino(a, self.stack.st_ino(node))
        a.generation = 0
        a.entry_timeout = CACHE_TIMEOUT
        a.attr_timeout = CACHE_TIMEOUT
        a.st_mode = st.st_mode
        a.st_nlink = st.st_nlink if node.unlinked else self.stack.nlink(node, st)
        a.st_uid, a.st_gid = self.owners.shown(st.st_uid, st.st_gid)
        a.st_rdev = st.st_rdev
        a.st_size = st.st_size
        a.st_blksize = st.st_blksize
        a.st_blocks = st.st_blocks
        if node.data is not None and self.stack.data_unopened(node):
            # data in a data-only layer, not looked up before its first open: the kernel's
            # stat guesses from the size (and says the data's own blocks after the open)
            a.st_blocks = -(-st.st_size // st.st_blksize) * st.st_blksize >> 9
        elif node.data is not None:  # metacopy: the blocks of the data, as the kernel says
            a.st_blocks = self.stack.fs.lstat(node.data).st_blocks
        a.st_atime_ns = st.st_atime_ns
        a.st_mtime_ns = st.st_mtime_ns
        a.st_ctime_ns = st.st_ctime_ns
        if self.stack.immutable(node):
            # lower objects never change: build it once
            kept = a if self._keep is None else self._keep(a)
            node.reply = kept
            # The reply shows all of the stat it came from: let that go (600 bytes a node,
            # a third of what a listed lower entry kept; `lower_size` reads the reply).
            # A request that needs the whole stat again (a copy-up) makes one lstat.
            node.st = None
            return kept
        return a

    def lower_size(self, node: Node) -> int:
        """st_size of an object in a lower layer: its kept reply's, or one lstat."""
        reply: AttrsReply = node.reply
        if reply is not None:
            return int(reply.st_size)
        return self.stack.stat(node).st_size

    @_handler
    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> Any:
        node = self.stack.find(self.stack.node(parent_inode), name)
        if node is None:
            return self._negative
        attrs = self._entry(node)
        self.stack.remember(node)  # every successful lookup reply counts, "." and ".." too
        return attrs

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for ino, count in inode_list:
            try:
                self.stack.forget(ino, count)
            except Exception:
                log.exception("forget(%d, %d) failed", ino, count)

    @_handler
    async def getattr(self, inode: int, ctx: Any = None) -> AttrsReply:
        return self._entry(self.stack.node(inode))

    @_handler
    async def btime(self, inode: int) -> tuple[int, int] | None:
        """The birth time of the node's topmost real object, as kernel overlayfs reports it
        (statx of the real file: a copied-up file's is its copy-up's); None where its
        filesystem keeps none."""
        node = self.stack.node(inode)
        fd = self._gone_fd(node)
        if fd is not None:
            return syscalls.btime(b"", fd)
        return self.stack.fs.btime(self.stack.real_path(node))

    @_handler
    async def readlink(self, inode: int, ctx: Any) -> bytes:
        node = self.stack.node(inode)
        self._gone_fd(node)  # a symlink has no fd: once its last name is gone, ENOENT
        return self.stack.readlink(node)

    @_handler
    async def access(self, inode: int, mode: int, ctx: Any) -> bool:
        node = self.stack.node(inode)
        if mode & os.W_OK and self.writer is None:
            raise pyfuse3.FUSEError(errno.EROFS)
        st = self._stat_for(node)
        return _may_access(st.st_mode, *self.owners.shown(st.st_uid, st.st_gid), mode, ctx)

    @_handler
    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        sv = self.stack.statvfs()
        out = pyfuse3.StatvfsData()
        for attr in (
            "f_bsize",
            "f_frsize",
            "f_blocks",
            "f_bfree",
            "f_bavail",
            "f_files",
            "f_ffree",
            "f_favail",
            "f_namemax",
        ):
            setattr(out, attr, getattr(sv, attr))
        return out

    # ----- xattrs ---------------------------------------------------------------------
    def xattr_value(self, inode: int, name: bytes) -> bytes | int:
        """getxattr's answer: the value, or the errno to answer when there is none (no
        exception: "none" is the common answer, and the kernel asks for
        `security.capability` at every file's first write and for the ACLs of every entry
        `ls -l` lists).  Other failures raise."""
        node = self.stack.node(inode)
        value = self.stack.xattr_answer(node, name, self._gone_fd(node))
        if isinstance(value, int):
            if value == errno.ENODATA and name == SELINUX_XATTR and not _HOST_SELINUX:
                # `ls -l` asks for every entry and stops at the first EOPNOTSUPP; a label
                # that is there is still answered (as kernel overlayfs would)
                return errno.EOPNOTSUPP
            return value
        return self.owners.xattr_shown(name, value) if self.owners else value

    @_handler
    async def getxattr(self, inode: int, name: bytes, ctx: Any) -> bytes:
        value = self.xattr_value(inode, name)
        if isinstance(value, int):
            raise pyfuse3.FUSEError(value)  # ENODATA is pyfuse3.ENOATTR
        return value

    @_handler
    async def listxattr(self, inode: int, ctx: Any) -> list[bytes]:
        node = self.stack.node(inode)
        return self.stack.listxattr(node, self._gone_fd(node))

    # ----- directories -----------------------------------------------------------------
    @_handler
    async def opendir(self, inode: int, ctx: Any) -> int:
        node = self.stack.node(inode)
        self.stack.listing(node)  # ENOTDIR early, and warm the listing
        fh = self._new_fh()
        self._dirs[fh] = DirHandle(node)
        return fh

    @_handler
    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        handle = self._dirs[fh]
        node = handle.node
        gen, start = start_id >> 32, start_id & 0xFFFFFFFF
        if start_id == 0:  # (re)start: take a fresh snapshot, as overlayfs does on rewind
            listing = self.stack.listing(node)
            gen = handle.snapshot(list(listing.items()))
            self.prefetch.listed(listing)
            if self.writer is not None and self.stack.in_upper(node) and self.atime.current().dirs:
                self._dir_accessed(node)
        entries = handle.snapshots.get(gen)
        if entries is None:  # dropped: go on in the newest, or in a new listing when the
            # newest was read to its end and dropped too (it raised KeyError: EIO to a
            # reader going on with an old offset after a change; xfstests generic/637)
            gen = handle.gen
            entries = handle.snapshots.get(gen)
            if entries is None:
                gen = handle.snapshot(list(self.stack.listing(node).items()))
                entries = handle.snapshots[gen]
        high = gen << 32
        specials = [(b".", node), (b"..", node.parent or self.stack.root)]
        now = self.stack.listing(node)
        for pos in range(start, len(entries) + 2):
            if pos < 2:
                name, target = specials[pos]
                if not self._readdir_reply(token, name, self._entry(target), high | pos + 1):
                    return
                continue
            name, child = entries[pos - 2]
            current = now.get(name)
            if current is not child:
                # changed since this snapshot was taken (a reader going on with an older
                # listing): the name as it is now, or skipped if it is gone.  Its old entry
                # may name an object whose last name went, which the kernel has not forgotten
                # yet: answering for it failed the whole request (ENOENT)
                if current is None:
                    continue
                child = current
            try:
                entry_node = self.stack.node_for(node, name, child)
                attrs = self._entry(entry_node)
            except OSError as exc:
                bare = getattr(token, "add_bare", None)  # the native transport's
                if (
                    exc.errno not in (errno.ENOENT, errno.ENOTDIR)
                    and bare is not None
                    and self.stack.listed_unlooked(child)
                ):
                    # an object its lookup refuses (a metacopy file without metacopy=on, or
                    # with a bad redirect, or no data), where the kernel lists it: a stat of
                    # it says why
                    if not bare(name, self.stack.ino_for(child.layer, child.ino), child.kind,
                                high | pos + 1):  # fmt: skip
                        return
                    continue
                # vanished from a layer: skip rather than fail the listing
                log.warning("readdir: skipping %r: %s", name, exc)
                continue
            if not self._readdir_reply(token, name, attrs, high | pos + 1):
                return
            self.stack.remember(entry_node)
        if start >= len(entries) + 2:  # the reader asked past the end: it is done with it
            handle.snapshots.pop(gen, None)

    def _dir_accessed(self, node: Node) -> None:
        """A listing marks an upper directory's atime, as kernel overlayfs's touch_atime
        does: one getdents of the real directory, so that the upper filesystem applies its
        own rule (relatime) and leaves the ctime alone.  Lower directories never change."""
        try:
            fd = self.stack.fs.open(self.stack.upper_path(node), os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            return
        try:
            with os.scandir(fd) as it:
                next(it, None)
        finally:
            os.close(fd)

    async def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)

    # ----- files -----------------------------------------------------------------------
    def _handle_fds(self, node: Node) -> list[FileHandle]:
        return [self._files[fh] for fh in self._by_node.get(node.ino, ())]

    def _add_handle(
        self, node: Node, fd: int, writable: bool, uid: int,
        lazy: tuple[bytes, int] | None = None,
    ) -> int:  # fmt: skip
        """Register an open fd (or a lazy one, FileHandle) whose budget `uid` has taken."""
        fh = self._new_fh()
        self._files[fh] = FileHandle(node, fd, writable, uid, lazy)
        self._by_node.setdefault(node.ino, set()).add(fh)
        return fh

    def _fd(self, handle: FileHandle) -> int:
        """The handle's real fd, opened now if it was lazy (FileHandle)."""
        if handle.fd < 0 and handle.lazy is not None:
            path, flags = handle.lazy
            handle.fd = self.stack.fs.open_noatime(path, flags)
            handle.lazy = None
        return handle.fd

    @_handler
    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        node = self.stack.node(inode)
        writable = (flags & os.O_ACCMODE) != os.O_RDONLY or bool(flags & os.O_TRUNC)
        if writable:
            self._need_upper()
            # an upper object's flags are known now (a metacopy file's data is then never
            # copied up for nothing); a lower one's come with its copy-up
            known = self.stack.in_upper(node)
            if known:
                self._refuse(fileattr.refuses_open(self._prot(node), flags))
            await self.gate.enter()  # a copy-up changes the upper: held while frozen
            try:
                await self._copy_up(node, with_data=not flags & os.O_TRUNC)
            finally:
                self.gate.leave()
            if not known:
                self._refuse(fileattr.refuses_open(self._prot(node), flags))
        oflags = flags & ~(os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_NOCTTY | _O_DIRECT)
        fs, path = self._open_path(node)
        self.budget.take(ctx.uid)
        if node.data is not None and self.stack.open_data(node):
            if self.stack.attrs_changed is not None:  # its st_blocks: the data's own now
                self.stack.attrs_changed(node)
        if not writable and node.data is not None:
            # metacopy: read the file below that holds the data (until a change fills it)
            fh = self._add_handle(node, -1, False, ctx.uid, (node.data, oflags))
            return pyfuse3.FileInfo(fh=fh, keep_cache=True)
        if not writable and node.kind == stat.S_IFREG and not self.stack.in_upper(node):
            # a lower file to read: opened at first need (FileHandle)
            fh = self._add_handle(node, -1, False, ctx.uid, (path, oflags))
            return pyfuse3.FileInfo(fh=fh, keep_cache=True)
        try:
            if writable:
                keep = 0 if self.atime.current().files else os.O_NOATIME
                fd = _open_rw(fs, path, self._open_flags(oflags) | keep, oflags,
                              bool(flags & os.O_APPEND))  # fmt: skip
            elif self.stack.in_upper(node) and self.atime.current().files:
                # reads mark an upper file's atime (the upper filesystem's relatime), as
                # kernel overlayfs's touch_atime does, unless the mount says not to (ro,
                # noatime: atime.py); lower files never change
                fd = fs.open(path, oflags)
            else:
                fd = fs.open_noatime(path, oflags)
        except BaseException:
            self.budget.give(ctx.uid)
            raise
        if flags & os.O_TRUNC:
            node.invalidate()
        fh = self._add_handle(node, fd, writable, ctx.uid)
        return pyfuse3.FileInfo(fh=fh, keep_cache=True)

    def _open_path(self, node: Node) -> tuple[Roots, bytes]:
        """What OPEN opens: the node's real object.  An upper file whose last name went
        away (an unlink or a rename over it, racing this open: the kernel had looked the
        name up before) is reached through an fd still open on it, never by its old name,
        which may now hold a whiteout or another file; with none open it is gone (ENOENT).
        A lower file's path stays valid: lower layers never change."""
        fd = self._gone_fd(node)
        if fd is None:
            return self.stack.fs, self.stack.real_path(node)
        return PLAIN, b"/proc/self/fd/%d" % fd  # reopened through procfs: the file itself

    def _gone_fd(self, node: Node) -> int | None:
        """None while `node` can be reached by its name (or lives in a lower layer, whose
        paths stay valid).  For an upper file whose last name is gone (unlinked, or renamed
        over), an fd still open on it: its old name may hold a whiteout or another file by
        now, so nothing may act on that name.  ENOENT when no fd is left."""
        if not (node.unlinked and self.stack.in_upper(node)):
            return None
        return self._fd_of_gone(node)

    def _fd_of_gone(self, node: Node) -> int:
        """An fd open on `node`, whose last name is gone (a writable one first); ENOENT when
        none is left: nothing else reaches the file."""
        handles = sorted(self._handle_fds(node), key=lambda h: not h.writable)
        if node.data is not None:  # a metacopy file's readers hold its lower data file
            handles = [h for h in handles if h.writable]
        if not handles:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._fd(handles[0])

    def _open_flags(self, flags: int) -> int:
        """Flags for the real file of a handle opened for writing.  O_APPEND is never passed
        on: the kernel sends the offset to write at (with the writeback cache it does O_APPEND
        itself), and pwrite on an O_APPEND fd would append anyway.  With the writeback cache
        the kernel may READ through a write-only handle, so the real file is opened O_RDWR."""
        flags &= ~os.O_APPEND
        if self.enable_writeback_cache and flags & os.O_ACCMODE == os.O_WRONLY:
            flags = (flags & ~os.O_ACCMODE) | os.O_RDWR
        return flags

    def kill_suidgid(self, inode: int, fh: int | None, ctx: Any) -> AttrsReply:
        """Clear setuid, and setgid, of a regular upper file as the kernel's VFS does when a
        caller without CAP_FSETID writes or truncates (the daemon holds CAP_FSETID, so its
        own write leaves the bits): setgid goes when group-executable, or when the caller is
        not in the file's group (setattr_should_drop_sgid).  The native transport calls it
        where FUSE_HANDLE_KILLPRIV_V2 says to; returns the new attributes."""
        node = self.stack.node(inode)
        target: int | bytes = self._setattr_target(node, fh)
        st = os.fstat(target) if isinstance(target, int) else self.stack.fs.lstat(target)
        mode = stat.S_IMODE(st.st_mode)
        kill = stat.S_ISUID
        if mode & stat.S_IXGRP or not _in_group(ctx, st.st_gid):
            kill |= stat.S_ISGID
        if stat.S_ISREG(st.st_mode) and mode & kill:
            self.stack.fs.chmod(target, mode & ~kill)
            node.invalidate()
            if self.stack.attrs_changed is not None:
                # a WRITE's reply carries no attributes, and the kernel keeps the mode it had
                self.stack.attrs_changed(node)
        return self._entry(node)

    def handle_writable(self, fh: int) -> bool:
        return self._files[fh].writable

    def open_handles(self, ino: int) -> int:
        """How many files of node `ino` are open."""
        return len(self._by_node.get(ino, ()))

    def writable_handles(self, ino: int) -> list[int]:
        """The open files of node `ino` that are open for writing."""
        return [fh for fh in self._by_node.get(ino, ()) if self._files[fh].writable]

    def handle_fd(self, fh: int) -> int:
        """The real fd of an open file, opened now if it was lazy (the native transport's
        passthrough hands it to the kernel, its page-cache store reads it)."""
        return self._fd(self._files[fh])

    @_handler
    async def read(self, fh: int, off: int, size: int) -> bytes:
        return os.pread(self._fd(self._files[fh]), size, off)

    @_handler
    @_mutating
    async def write(self, fh: int, off: int, buf: bytes | memoryview) -> int:
        handle = self._files[fh]
        return os.pwrite(handle.fd, buf, off)

    @_handler
    @_mutating
    async def fallocate(self, fh: int, off: int, length: int, mode: int) -> None:
        """fallocate(2) on the upper file, with the caller's mode, as kernel overlayfs passes
        it to the real file (ovl_fallocate).  The handle is writable, so the file is in the
        upper already (the VFS refuses fallocate on a file not open for writing: EBADF)."""
        handle = self._files[fh]
        if not handle.writable:
            raise pyfuse3.FUSEError(errno.EBADF)
        self._refuse(fileattr.refuses_fallocate(self._prot(handle.node), mode))
        syscalls.fallocate(handle.fd, mode, off, length)

    @_handler
    @_mutating
    async def copy_file_range(
        self, fh_in: int, off_in: int, fh_out: int, off_out: int, length: int, flags: int
    ) -> int:
        """copy_file_range(2) into a file open for writing, on the real files (a clone where
        their filesystem can).  An immutable or append-only target refuses it (EPERM), as
        the VFS refuses it on kernel overlayfs's inode, which carries those flags (a FUSE
        inode never does: the copy was made through a handle opened before chattr +i;
        xfstests generic/553)."""
        if flags:
            raise pyfuse3.FUSEError(errno.EINVAL)
        out = self._files[fh_out]
        if not out.writable:
            raise pyfuse3.FUSEError(errno.EBADF)
        self._refuse(self._prot(out.node) & (fileattr.FS_IMMUTABLE_FL | fileattr.FS_APPEND_FL))
        fd_in = self._fd(self._files[fh_in])
        from . import workers  # not at the top: see the module docstring

        n = await workers.run(fsutil.copy_between, fd_in, off_in, out.fd, off_out, length)
        out.node.invalidate()
        return n

    @_handler
    async def lseek(self, fh: int, off: int, whence: int, exact: bool = True) -> int:
        """SEEK_DATA / SEEK_HOLE (the kernel answers the other whences itself), from the real
        file, as kernel overlayfs does (ovl_llseek): a sparse file keeps its holes through
        the mount (`cp --sparse`, `tar -S`).  Not `exact`: the caller knows the kernel may
        hold data of this file the upper has not got yet (bridge.Bridge.lseek); then the
        answer is the one of a file without holes, which never hides data."""
        if whence not in (os.SEEK_DATA, os.SEEK_HOLE):
            raise pyfuse3.FUSEError(errno.EINVAL)
        handle = self._files[fh]
        fd = self._fd(handle)
        if exact or not self.stack.in_upper(handle.node):  # lower files never change
            return os.lseek(fd, off, whence)
        size = os.fstat(fd).st_size
        if not 0 <= off < size:
            raise pyfuse3.FUSEError(errno.ENXIO)
        return off if whence == os.SEEK_DATA else size

    async def flush(self, fh: int) -> None:
        """ENOSYS, on purpose: the kernel then stops sending FLUSH for the life of the mount
        (fc->no_flush), which saves a synchronous round trip on every close(2) — a third of
        the requests of `cat` over small files.  Nothing is lost: the daemon buffers nothing
        (writes reach the upper file as they come), and the kernel still writes back its dirty
        pages on close before it would have sent FLUSH."""
        raise pyfuse3.FUSEError(errno.ENOSYS)

    async def release(self, fh: int) -> None:
        handle = self._files.pop(fh, None)
        if handle is None:
            return
        fhs = self._by_node.get(handle.node.ino)
        if fhs is not None:
            fhs.discard(fh)
            if not fhs:
                del self._by_node[handle.node.ino]
        self.budget.give(handle.uid)
        if handle.fd < 0:
            return  # never opened (FileHandle)
        if handle.node.unlinked and not fhs:
            self._last_close_of_gone(handle.node, handle.fd)
        try:
            os.close(handle.fd)
        except OSError:
            log.exception("release: close failed")

    def _last_close_of_gone(self, node: Node, fd: int) -> None:
        """The last fd of a node with no name left is closing: with no link left either (an
        O_TMPFILE file never linked, an unlinked file held open) the real file goes with it,
        and the filesystem may give its inode number to a new file, which must not find this
        node (`LayerStack._upper_ino`)."""
        try:
            if os.fstat(fd).st_nlink == 0:
                node.deleted = True
        except OSError:
            node.deleted = True

    @_handler
    async def fsync(self, fh: int, datasync: bool) -> None:
        fd = self._files[fh].fd
        if self.volatile or fd < 0:
            # volatile: no syncs of the upper (the writes themselves have reached it); a
            # lower file never opened has nothing to sync (FileHandle)
            return
        from . import workers  # not at the top: see the module docstring

        await workers.run(os.fdatasync if datasync else os.fsync, fd)

    @_handler
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        node = self._dirs[fh].node
        if self.stack.in_upper(node) and not self.volatile:
            fd = self.stack.fs.open(self.stack.real_path(node), os.O_RDONLY | os.O_DIRECTORY)
            try:
                from . import workers

                await workers.run(os.fsync, fd)
            finally:
                os.close(fd)

    # ----- the write side --------------------------------------------------------------
    def _need_upper(self) -> Writer:
        if self.writer is None:
            raise pyfuse3.FUSEError(errno.EROFS)
        return self.writer

    def _lock(self, node: Node) -> trio.Lock:
        lock = self._locks.get(node)
        if lock is None:
            import trio

            lock = self._locks[node] = trio.Lock()
        return lock

    async def _quiesce(self, node: Node | None) -> None:
        """Wait for a copy-up of `node` in progress; the caller then acts without awaiting."""
        lock = self._locks.get(node) if node is not None else None
        if lock is not None:
            async with lock:
                pass

    async def _copy_up(self, node: Node, with_data: bool = True, meta: bool = False) -> None:
        """Copy `node` up before its first change.  Data of big files is copied in a worker
        thread under the node's lock, so other requests go on being served.  `meta`: the
        change needs only the metadata in the upper (with metacopy=on a regular file's data
        then stays below: `Writer.plan_copy_up`)."""
        writer = self._need_upper()
        if self.stack.in_upper(node):
            if node.data is not None and not meta:  # metacopy=on: its data is still below
                await self._fill_metacopy(writer, node)
            return
        if node.is_dir:
            writer.copy_up_dir(node)
            return
        self.copying += 1
        try:
            async with self._lock(node):
                plan = writer.plan_copy_up(node, with_data, meta)
                if plan is not None:
                    try:
                        if plan.blocks:  # a big copy or an fsync: not on the loop's thread
                            from . import workers

                            await workers.run(Writer.copy_data, plan)
                        else:
                            Writer.copy_data(plan)
                    except BaseException:
                        writer.abort_copy_up(plan)
                        raise
                    writer.finish_copy_up(plan)
                if node.data is None:  # a metacopy file's readers stay on its data
                    self._reopen(node)
        finally:
            self.copying -= 1

    async def _fill_metacopy(self, writer: Writer, node: Node) -> None:
        """Writer.fill_metacopy under the node's lock, in a worker thread (it reads a lower
        file and fsyncs); open readers then follow the filled upper file (`_reopen`)."""
        self.copying += 1
        try:
            async with self._lock(node):
                if node.data is None:  # filled while this one waited
                    return
                self.stack.open_data(node)  # in a data-only layer: is it there (ENOENT)?
                from . import workers

                await workers.run(writer.fill_metacopy, node)
                self._reopen(node)
                if self.stack.attrs_changed is not None:
                    # its mtime moved (the copy), which an OPEN's reply does not carry
                    self.stack.attrs_changed(node)
        finally:
            self.copying -= 1

    async def _copy_up_linked(self, node: Node) -> None:
        """index=on: before a name of a hard-linked lower file goes away, copy the file up
        (which links its other names in the upper), so the names left show the kernel's count."""
        if not self.stack.index or node.is_dir or self.stack.in_upper(node):
            return  # with index=off the other names simply keep the lower file
        if self.stack.stat(node).st_nlink > 1:
            await self._copy_up(node)

    def _reopen(self, node: Node) -> None:
        """Read-only fds opened on the lower file now see the upper copy (overlayfs does not
        do this; it is why an fd opened before another fd's write sees the new data)."""
        path = self.stack.real_path(node)
        for handle in self._handle_fds(node):
            if handle.writable:
                continue
            new = self.stack.fs.open(path, os.O_RDONLY)
            if handle.fd < 0:  # lazy: it must follow the upper copy from now on
                handle.fd, handle.lazy = new, None
            else:
                os.dup2(new, handle.fd)
                os.close(new)

    # ----- inode flags (lsattr/chattr: fileattr.py) ----------------------------------------
    def _prot(self, node: Node) -> int:
        """The node's immutable/append-only flags (fileattr.PROT bits): its upper object's
        overlay.protattr, read once (then kept on the node, which every change of them goes
        through).  A lower object's own flags count from its copy-up on (Writer carries them
        into the copy): image layers never carry them, and reading them before every
        removal from a lower directory would cost each one an ioctl."""
        prot = node.prot
        if prot is None:
            if not self.stack.in_upper(node) or node.unlinked:
                return 0
            prot = node.prot = markers.protattr(self.stack.upper_path(node), self.stack.fs)
        return prot

    @staticmethod
    def _refuse(refused: bool | int) -> None:
        if refused:
            raise pyfuse3.FUSEError(errno.EPERM)

    def _may_create(self, parent: Node) -> None:
        """No new entry in an immutable directory (the VFS's may_create for such an inode)."""
        self._refuse(self._prot(parent) & fileattr.FS_IMMUTABLE_FL)

    @_handler
    async def fileattr_get(self, inode: int, xattr_form: bool) -> bytes:
        """FS_IOC_GETFLAGS (`xattr_form` False: 4 bytes) or FS_IOC_FSGETXATTR (struct
        fsxattr): the topmost real object's flags, and the overlay's immutable/append-only."""
        node = self.stack.node(inode)
        if node.kind not in (stat.S_IFREG, stat.S_IFDIR):
            raise pyfuse3.FUSEError(errno.ENOTTY)
        target = self._setattr_target(node, None)
        return fileattr.get(self.stack.fs, target, node.kind, self._prot(node), xattr_form)

    @_handler
    @_mutating
    async def fileattr_set(self, inode: int, value: bytes, xattr_form: bool) -> None:
        """FS_IOC_SETFLAGS / FS_IOC_FSSETXATTR, as ovl_fileattr_set: copy up, the flags onto
        the real upper object but immutable and append-only, which go into its
        overlay.protattr.  (The kernel has checked the caller may: owner or CAP_FOWNER, and
        CAP_LINUX_IMMUTABLE to change those two.)"""
        self._need_upper()
        node = self.stack.node(inode)
        if node.kind not in (stat.S_IFREG, stat.S_IFDIR):
            raise pyfuse3.FUSEError(errno.ENOTTY)
        await self._copy_up(node, meta=True)
        target = self._setattr_target(node, None)
        fs = self.stack.fs
        prot = fileattr.set_real(fs, target, node.kind, value, xattr_form)
        if prot or self._prot(node):
            markers.set_protattr(target, prot, fs)
        node.prot = prot
        node.invalidate()

    def _stat_for(self, node: Node) -> os.stat_result:
        if node.unlinked:
            if node.is_dir:
                # removed, and still open (or the cwd) somewhere: a lower one is still
                # there; an upper one answers with what it was, no link left, as the
                # kernel's fstat of its dead upper directory (Writer.rmdir / rename)
                if self.stack.in_upper(node) and node.st is None:
                    raise pyfuse3.FUSEError(errno.ENOENT)
                return self.stack.stat(node)
            return os.fstat(self._fd_of_gone(node))
        return self.stack.stat(node)

    @_handler
    @_mutating
    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: Any,
    ) -> Any:
        node = self.stack.node(inode)
        self._need_upper()
        if node.unlinked and _times_only(fields) and not self._upper_handles(node):
            return self._gone_entry(node)
        truncate_all = fields.update_size and attr.st_size == 0
        known = self.stack.in_upper(node)  # its flags (else they come with its copy-up)
        if known:
            self._refuse_setattr(node, fields)
        await self._copy_up(node, with_data=not truncate_all, meta=not fields.update_size)
        if not known:
            self._refuse_setattr(node, fields)
        target = self._setattr_target(node, fh)
        is_link = node.kind == stat.S_IFLNK
        if fields.update_uid or fields.update_gid:
            uid, gid = self.owners.stored(
                attr.st_uid if fields.update_uid else -1, attr.st_gid if fields.update_gid else -1
            )
            self.stack.fs.chown(target, uid, gid)  # or fchown of the handle's fd
        if fields.update_mode and not is_link:
            self.stack.fs.chmod(target, stat.S_IMODE(attr.st_mode))
        if fields.update_size and not self._keeps_times(node, target, attr.st_size):
            self.stack.fs.truncate(target, attr.st_size)
        if not _changes_ctime(fields):
            # chown(path, -1, -1) changes nothing but the ctime, of every file type, as on
            # the kernel.  FUSE sends it as a SETATTR with no field (FATTR_CTIME only for
            # regular files under the writeback cache); a no-op chown of the real object
            # marks exactly the ctime.  The same request is the kernel's removal of
            # privileges before a write or fallocate (its ATTR_KILL_* bits are not sent).
            self.stack.fs.chown(target, -1, -1)
            self._drop_sgid(node, target, ctx)
        if fields.update_atime or fields.update_mtime:
            cur = self._stat_for(node)
            times = (
                attr.st_atime_ns if fields.update_atime else cur.st_atime_ns,
                attr.st_mtime_ns if fields.update_mtime else cur.st_mtime_ns,
            )
            try:
                self.stack.fs.utime(target, ns=times)
            except PermissionError:
                # an append-only real object (chattr +a in the upper itself, which the
                # mount's own flags do not know of) takes "now" but no time given; the
                # kernel's "now" comes here as a time (xfstests overlay/030)
                now = fields.update_atime and fields.update_mtime
                if not now or getattr(fields, "sets_times", True):
                    raise
                self.stack.fs.utime_now(target)
        node.invalidate()
        return self._entry(node)

    def _drop_sgid(self, node: Node, target: int | bytes, ctx: Any) -> None:
        """After a SETATTR with no field (chown(-1, -1), or the kernel removing privileges
        before a write or fallocate: notify_change with ATTR_KILL_SUID|ATTR_KILL_SGID, which
        FUSE strips): the real chown, made as root, has cleared setuid, and setgid of a
        group-executable file; setgid also goes when the caller is outside the file's
        group and is not root, as the kernel's setattr_should_drop_sgid decides for the
        caller.  (Without this, fallocate(2) by such a caller kept setgid: xfstests
        generic/683-685.)"""
        if ctx is None or ctx.uid == 0 or node.kind != stat.S_IFREG:
            return
        st = os.fstat(target) if isinstance(target, int) else self.stack.fs.lstat(target)
        if st.st_mode & stat.S_ISGID and not _keeps_sgid(ctx, st.st_gid):
            self.stack.fs.chmod(target, stat.S_IMODE(st.st_mode) & ~stat.S_ISGID)

    def _refuse_setattr(self, node: Node, fields: pyfuse3.SetattrFields) -> None:
        """EPERM for a change an immutable or append-only object does not allow."""
        prot = self._prot(node)
        if prot and not getattr(fields, "flushes_times", False):
            touches = fields.update_atime or fields.update_mtime
            self._refuse(fileattr.refuses_setattr(
                prot,
                fields.update_mode or fields.update_uid or fields.update_gid or fields.update_size,
                getattr(fields, "sets_times", touches),  # pyfuse3's fields cannot tell "now"
                touches,
            ))  # fmt: skip

    def _keeps_times(self, node: Node, target: int | bytes, size: int) -> bool:
        """A truncate to the size a regular file already has, under the writeback cache: the
        kernel then keeps the file's times (POSIX: only a changed size marks them) and never
        takes ours, so the upper is left alone too, or a remount would show other times."""
        if not self.enable_writeback_cache or node.kind != stat.S_IFREG:
            return False
        st = os.fstat(target) if isinstance(target, int) else self.stack.fs.lstat(target)
        return st.st_size == size

    def _upper_handles(self, node: Node) -> list[FileHandle]:
        return self._handle_fds(node) if self.stack.in_upper(node) else []

    def _gone_entry(self, node: Node) -> AttrsReply:
        """The reply to a SETATTR of times for a file that has no name left and no upper
        copy open: with the writeback cache the kernel owns the times of regular files and
        sends them itself (unlink and rename update the ctime), also for a lower file just
        whited out.  Nobody can see them any more; failing would make the next syncfs or
        fsync on the mount report the error.  (The kernel ignores this reply.)"""
        if self._handle_fds(node):
            return self._entry(node)
        a = self._attrs()
        a.st_ino = node.ino
        a.st_mode = node.kind
        a.attr_timeout = 0
        return a

    def _setattr_target(self, node: Node, fh: int | None) -> int | bytes:
        """Where SETATTR and the xattr changes act: the handle's fd when the kernel names
        one; else the path, or — once the node's last name is gone (the kernel may still
        send the mtime of an unlinked file it wrote back; fsetxattr on a renamed-over file)
        — an fd still open on it, never whatever now has the old name."""
        handle = self._files.get(fh) if fh is not None else None
        if handle is not None and (handle.writable or node.data is None):
            return self._fd(handle)  # (a metacopy file's readers hold its lower data file)
        if not node.unlinked:
            return self.stack.real_path(node)
        return self._fd_of_gone(node)

    def _new_entry(self, node: Node) -> AttrsReply:
        attrs = self._entry(node)
        self.stack.remember(node)
        return attrs

    @_handler
    @_mutating
    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: Any
    ) -> tuple[pyfuse3.FileInfo, AttrsReply]:
        writer = self._need_upper()
        return self._new_file(parent_inode, mode, flags, ctx,
                              lambda parent, *args: writer.create(parent, name, *args))  # fmt: skip

    @_handler
    @_mutating
    async def tmpfile(
        self, parent_inode: int, mode: int, flags: int, ctx: Any
    ) -> tuple[pyfuse3.FileInfo, AttrsReply]:
        """open(2) with O_TMPFILE (the native transport's FUSE_TMPFILE): Writer.tmpfile."""
        return self._new_file(parent_inode, mode, flags, ctx, self._need_upper().tmpfile)

    def _new_file(
        self, parent_inode: int, mode: int, flags: int, ctx: Any,
        make: Callable[..., tuple[Node, int]],
    ) -> tuple[pyfuse3.FileInfo, AttrsReply]:  # fmt: skip
        """A new regular file, open for writing, by `make(parent, mode, flags, uid, gid,
        acls)` (Writer.create or Writer.tmpfile): its mode and ACLs from the parent's default
        ACL, its owner the caller's, its handle counted against the caller's budget."""
        parent = self.stack.node(parent_inode)
        self._may_create(parent)
        flags = self._open_flags(flags)
        self.budget.take(ctx.uid)  # before the file exists: a refused create leaves nothing
        uid, gid = self.owners.stored(ctx.uid, ctx.gid)
        try:
            made = self._inherit(parent, mode, ctx.umask, stat.S_IFREG)
            node, fd = make(parent, made.mode, flags, uid, gid, made)
        except BaseException:
            self.budget.give(ctx.uid)
            raise
        fh = self._add_handle(node, fd, True, ctx.uid)
        return pyfuse3.FileInfo(fh=fh, keep_cache=True), self._new_entry(node)

    @_handler
    @_mutating
    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: Any
    ) -> AttrsReply:
        writer = self._need_upper()
        if stat.S_ISCHR(mode) and rdev == 0:
            # a 0/0 device is a whiteout on disk: it would vanish at the next mount, so the
            # kernel refuses to create one through an overlay (ovl_mknod), and so do we
            raise pyfuse3.FUSEError(errno.EPERM)
        parent = self.stack.node(parent_inode)
        self._may_create(parent)
        uid, gid = self.owners.stored(ctx.uid, ctx.gid)
        made = self._inherit(parent, mode, ctx.umask, stat.S_IFMT(mode))
        node = writer.make(parent, name, stat.S_IFMT(mode), made.mode, uid, gid, rdev=rdev,
                           acls=made)  # fmt: skip
        return self._new_entry(node)

    @_handler
    @_mutating
    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: Any) -> AttrsReply:
        writer = self._need_upper()
        parent = self.stack.node(parent_inode)
        self._may_create(parent)
        uid, gid = self.owners.stored(ctx.uid, ctx.gid)
        made = self._inherit(parent, mode, ctx.umask, stat.S_IFDIR)
        node = writer.make(parent, name, stat.S_IFDIR, made.mode, uid, gid, acls=made)
        return self._new_entry(node)

    def _inherit(self, parent: Node, mode: int, umask: int, kind: int) -> acl.Inherited:
        """The new object's mode and ACLs from the parent's default ACL (acl.py); the umask
        applies only without one."""
        try:
            default = self.stack.getxattr(parent, acl.DEFAULT)
        except OSError:  # ENODATA, or a file system without ACLs
            default = None
        return acl.inherit(default, mode, umask, kind)

    @_handler
    @_mutating
    async def symlink(self, parent_inode: int, name: bytes, target: bytes, ctx: Any) -> AttrsReply:
        writer = self._need_upper()
        parent = self.stack.node(parent_inode)
        self._may_create(parent)
        uid, gid = self.owners.stored(ctx.uid, ctx.gid)
        node = writer.make(parent, name, stat.S_IFLNK, 0o777, uid, gid, target=target)
        return self._new_entry(node)

    @_handler
    @_mutating
    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: Any
    ) -> AttrsReply:
        writer = self._need_upper()
        node = self.stack.node(inode)
        parent = self.stack.node(new_parent_inode)
        await self._copy_up(node, meta=True)
        self._may_create(parent)
        self._refuse(bool(self._prot(node)))
        # a node with no name left (an O_TMPFILE file) is linked from an fd open on it
        writer.link(node, parent, new_name, self._gone_fd(node))
        return self._new_entry(node)

    def _child_node(self, parent: Node, name: bytes) -> Node:
        return self.stack.lookup(parent, name)

    @_handler
    @_mutating
    async def unlink(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        writer = self._need_upper()
        parent = self.stack.node(parent_inode)
        node = self._child_node(parent, name)
        self._refuse(bool(self._prot(parent) or self._prot(node)))  # may_delete
        await self._copy_up_linked(node)
        await self._quiesce(node)
        writer.unlink(parent, name)

    @_handler
    @_mutating
    async def rmdir(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        writer = self._need_upper()
        parent = self.stack.node(parent_inode)
        if self.stack.in_upper(parent):  # may_delete (a lower parent's children are lower)
            child = self._child_node(parent, name)
            self._refuse(bool(self._prot(parent) or self._prot(child)))
        try:
            writer.rmdir(parent, name)
        except NotEmpty:
            # the VFS refuses the removal (may_delete) before the filesystem finds the
            # directory not empty: EPERM where the real parent or the directory itself is
            # immutable or append-only (chattr in the upper itself, which the mount's own
            # flags do not know of; xfstests overlay/030).  Read only on this failure.
            for node in (parent, self._child_node(parent, name)):
                flags = fileattr.lower_flags(self.stack.fs, self.stack.real_path(node), node.kind)
                self._refuse(flags & fileattr.PROT)
            raise

    @_handler
    @_mutating
    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: Any,
    ) -> None:
        writer = self._need_upper()
        if flags & ~(syscalls.RENAME_NOREPLACE | syscalls.RENAME_EXCHANGE):
            # RENAME_WHITEOUT: refused, as kernel overlayfs refuses it (ovl_rename); it was
            # taken as a plain rename, with no whiteout left (xfstests generic/078)
            raise pyfuse3.FUSEError(errno.EINVAL)
        old_parent = self.stack.node(parent_inode_old)
        new_parent = self.stack.node(parent_inode_new)
        src = self._child_node(old_parent, name_old)
        try:
            dst: Node | None = self._child_node(new_parent, name_new)
        except UnionError:
            dst = None
        # may_delete of what leaves each directory, may_create of what enters one
        self._refuse(bool(
            self._prot(old_parent) or self._prot(src)
            or self._prot(new_parent) & fileattr.FS_IMMUTABLE_FL
            or dst is not None and (self._prot(new_parent) or self._prot(dst))
        ))  # fmt: skip
        if not src.is_dir:
            await self._copy_up(src, meta=True)
        if dst is not None and flags & pyfuse3.RENAME_EXCHANGE and not dst.is_dir:
            await self._copy_up(dst, meta=True)
        if dst is not None:
            await self._copy_up_linked(dst)
        await self._quiesce(dst)
        writer.rename(old_parent, name_old, new_parent, name_new, flags)

    @_handler
    @_mutating
    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: Any, flags: int = 0,
                       kill_sgid: bool | None = None) -> None:  # fmt: skip
        """`flags`: XATTR_CREATE/XATTR_REPLACE, applied to the upper after the copy-up (as
        kernel overlayfs: the copy carries the lower's attributes, so CREATE of one the
        lower has is EEXIST).  `kill_sgid` (FUSE_SETXATTR_ACL_KILL_SGID, native transport):
        the caller is outside the file's group and lacks CAP_FSETID, so setting an access
        ACL clears setgid; the real set, made as root, would keep it (ovl_set_or_remove_acl
        clears it the same way).  None (pyfuse3, which does not negotiate SETXATTR_EXT, so
        the kernel drops the flag): decided here as the kernel would, from the caller's
        groups, root standing for CAP_FSETID (xfstests generic/375 on the fallback)."""
        self._need_upper()
        real_name = markers.real_xattr(name)  # overlay names escaped, as the kernel's
        if real_name is None:
            raise pyfuse3.FUSEError(errno.EPERM)
        node = self.stack.node(inode)
        await self._copy_up(node, meta=True)
        self._refuse(bool(self._prot(node)))  # xattr_permission
        if self.owners:
            value = self.owners.xattr_stored(name, value)
        fs = self.stack.fs
        real = self._setattr_target(node, None)  # after the copy-up: the path, or an fd
        fs.setxattr(real, real_name, value, flags)
        if kill_sgid is not False and name == acl.ACCESS:
            st = os.fstat(real) if isinstance(real, int) else fs.lstat(real)
            if kill_sgid is None:
                kill_sgid = not _keeps_sgid(ctx, st.st_gid)
            if kill_sgid and st.st_mode & stat.S_ISGID:
                fs.chmod(real, stat.S_IMODE(st.st_mode) & ~stat.S_ISGID)
        node.invalidate()

    @_handler
    @_mutating
    async def removexattr(self, inode: int, name: bytes, ctx: Any) -> None:
        self._need_upper()
        real_name = markers.real_xattr(name)
        if real_name is None:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        node = self.stack.node(inode)
        if not self.stack.in_upper(node):
            # as the kernel (ovl_xattr_set): removing an attribute the lower object does not
            # have fails before any copy-up, so it neither copies nor breaks a hard link
            self.stack.getxattr(node, name)
        await self._copy_up(node, meta=True)
        self._refuse(bool(self._prot(node)))  # xattr_permission
        try:
            self.stack.fs.removexattr(self._setattr_target(node, None), real_name)
        except OSError as exc:
            if exc.errno == errno.ENODATA:
                raise pyfuse3.FUSEError(pyfuse3.ENOATTR) from None
            raise
        node.invalidate()


def _shown_ino_offset(entry_type: Any = None) -> int | None:
    """Where pyfuse3's EntryAttributes keeps the reply's attr.st_ino.  pyfuse3 sets the node id
    and attr.st_ino to one value; FUSE keeps them apart (the node id names the kernel's inode,
    attr.ino is what stat and readdir show), and index=off needs them apart (stack.py).  Found
    by probing a fuse_entry_param {ino, generation, struct stat attr} with marker values; None
    when the layout is not that one (then stat shows node numbers), or without pyfuse3 (the
    native transport's `Attrs` keep the two apart themselves)."""
    entry_type = entry_type or pyfuse3.EntryAttributes
    if entry_type is None:
        return None
    probe = entry_type()
    ino, gen = 0x5A171E550B5E55ED, 0x1234567887654321
    probe.st_ino, probe.generation = ino, gen
    raw = ctypes.string_at(id(probe), type(probe).__basicsize__)
    marks = [i for i in range(len(raw) - 7) if raw[i : i + 8] == ino.to_bytes(8, "little")]
    if len(marks) != 2 or raw[marks[0] + 8 : marks[0] + 16] != gen.to_bytes(8, "little"):
        return None
    if marks[1] != marks[0] + 24:  # ino, generation, attr.st_dev, attr.st_ino
        return None
    return marks[1]


_SHOWN_INO_OFFSET = _shown_ino_offset()


class Attrs:
    """An attribute reply with pyfuse3 EntryAttributes' names and defaults, in plain Python,
    for a transport that packs replies itself (the native one): building and reading one
    costs a third of an EntryAttributes (its Cython setters, and `shown_ino` through ctypes),
    measured 2.8 against 6.2 µs per entry built and packed.  `shown_ino` is the st_ino the
    reply shows (None: the node id, `st_ino`).  `packed_entry` and `packed_attr` are for the
    transport: the reply's wire bytes, packed at its first use.  A reply is never changed once
    it is handed out (`_entry` builds a new one for anything that changes), and the one of a
    lower object is handed out again and again: GETATTR, LOOKUP and every READDIRPLUS entry."""

    __slots__ = (
        "st_ino", "shown_ino", "generation", "entry_timeout", "attr_timeout", "st_mode",
        "st_nlink", "st_uid", "st_gid", "st_rdev", "st_size", "st_blksize", "st_blocks",
        "st_atime_ns", "st_mtime_ns", "st_ctime_ns", "packed_entry", "packed_attr",
    )  # fmt: skip

    def __init__(self) -> None:
        self.st_ino = self.generation = 0
        self.shown_ino: int | None = None
        self.entry_timeout = self.attr_timeout = 300.0
        self.st_mode, self.st_nlink = stat.S_IFREG, 1
        self.st_uid = self.st_gid = self.st_rdev = self.st_size = self.st_blocks = 0
        self.st_blksize = 4096
        self.st_atime_ns = self.st_mtime_ns = self.st_ctime_ns = 0
        self.packed_entry: bytes | None = None
        self.packed_attr: bytes | None = None


def _set_shown_ino(attrs: AttrsReply, ino: int) -> None:
    """Make the reply show `ino` as st_ino while it keeps its node id (set st_ino first)."""
    if type(attrs) is Attrs:
        attrs.shown_ino = ino
    elif ino != attrs.st_ino and _SHOWN_INO_OFFSET is not None:
        ctypes.c_uint64.from_address(id(attrs) + _SHOWN_INO_OFFSET).value = ino


def shown_ino(attrs: AttrsReply) -> int:
    """The st_ino a reply shows (`_set_shown_ino`), for a transport that packs replies itself;
    `attrs.st_ino` is the node id."""
    if type(attrs) is Attrs:
        return attrs.st_ino if attrs.shown_ino is None else attrs.shown_ino
    if getattr(attrs, "kept", False):  # a transport's kept reply (bridge.Kept) says it
        return int(attrs.shown_ino)
    if _SHOWN_INO_OFFSET is None:
        return int(attrs.st_ino)
    return int(ctypes.c_uint64.from_address(id(attrs) + _SHOWN_INO_OFFSET).value)


def _keeps_sgid(ctx: Any, gid: int) -> bool:
    """May the caller's change leave setgid on a file of group `gid`: the kernel's
    in_group_or_capable, root standing for CAP_FSETID."""
    return ctx.uid == 0 or _in_group(ctx, gid)


def _in_group(ctx: Any, gid: int) -> bool:
    """Whether the caller is in group `gid`: its fsgid, or one of its supplementary groups
    (read from /proc; unknown counts as not, which clears the bit: the safe side)."""
    if ctx.gid == gid:
        return True
    try:
        with open(f"/proc/{ctx.pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"Groups:"):
                    return str(gid).encode() in line.split()[1:]
    except OSError:
        pass
    return False


def _changes_ctime(fields: pyfuse3.SetattrFields) -> bool:
    """Does another field of this SETATTR already change the ctime of the real object?"""
    return bool(
        fields.update_uid
        or fields.update_gid
        or fields.update_mode
        or fields.update_size
        or fields.update_atime
        or fields.update_mtime
    )


def _times_only(fields: pyfuse3.SetattrFields) -> bool:
    return not (fields.update_mode or fields.update_uid or fields.update_gid or fields.update_size)


def _open_rw(fs: Roots, path: bytes, flags: int, asked: int, append: bool = False) -> int:
    """Open the real file with `flags` (O_RDWR for the writeback cache); when only the access
    the caller asked for is permitted (a daemon that is not root, a file it may not read),
    fall back to that: the kernel then cannot fill partly written pages, as in libfuse's
    passthrough_ll with writeback.  `append`: the caller opens with O_APPEND, which an
    append-only real file needs (chattr +a in the upper itself, which the mount's own flags
    do not know of: EPERM without it); every write to such a file appends anyway, which is
    all the kernel's offsets could ask of it (xfstests overlay/030)."""
    try:
        return fs.open(path, flags)
    except PermissionError as exc:
        if append and exc.errno == errno.EPERM:
            return fs.open(path, flags | os.O_APPEND)
        if flags == asked & ~os.O_APPEND:
            raise
        return fs.open(path, asked & ~os.O_APPEND)


def _may_access(st_mode: int, uid: int, gid: int, mode: int, ctx: Any) -> bool:
    """access(2)'s check against the caller's credentials, with the owner the mount shows
    (the kernel's, with default_permissions, normally answers before this is asked)."""
    if mode == os.F_OK or ctx is None or ctx.uid == 0:
        if ctx is not None and ctx.uid == 0 and mode & os.X_OK:
            return bool(st_mode & 0o111) or stat.S_ISDIR(st_mode)
        return True
    if ctx.uid == uid:
        bits = (st_mode >> 6) & 7
    elif ctx.gid == gid or gid in pyfuse3.get_sup_groups(ctx.pid):
        bits = (st_mode >> 3) & 7
    else:
        bits = st_mode & 7
    return (bits & mode) == mode
