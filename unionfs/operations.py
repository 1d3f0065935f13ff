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
    entry, priming the dentry cache so `ls -l` and `find` do not look each name up again.
Concurrency: trio, one thread; handlers that do not await are atomic with respect to the
model.  Reads of data use pread on the trio thread (page-cache hits are cheaper than a
thread hop); bulk copies of the write side go to worker threads.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import pyfuse3

from .errors import UnionError
from .stack import Child, LayerStack, Node

log = logging.getLogger("layerfs")

CACHE_TIMEOUT = 86400.0  # seconds; see the module docstring for why this is safe
_O_NOATIME = getattr(os, "O_NOATIME", 0)

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


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


def _short(args: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(a for a in args if not isinstance(a, (pyfuse3.RequestContext,)))


class DirHandle:
    """An open directory: a snapshot of its merged entries, so offsets stay stable."""

    __slots__ = ("node", "entries")

    def __init__(self, node: Node) -> None:
        self.node = node
        self.entries: list[tuple[bytes, Child]] = []


class UnionOperations(pyfuse3.Operations):
    supports_dot_lookup = True
    enable_writeback_cache = False

    def __init__(
        self, stack: LayerStack, debug: bool = False, on_init: Callable[[], None] | None = None
    ) -> None:
        super().__init__()
        self.stack = stack
        self.debug = debug
        self._on_init = on_init
        self._files: dict[int, int] = {}  # fh -> real fd
        self._dirs: dict[int, DirHandle] = {}
        self._next_fh = 1

    # ----- lifecycle -----------------------------------------------------------------
    def init(self) -> None:
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
    def _entry(self, node: Node) -> pyfuse3.EntryAttributes:
        if node.attrs is not None:
            return node.attrs  # type: ignore[return-value]
        st = self.stack.stat(node)
        a = pyfuse3.EntryAttributes()
        a.st_ino = node.ino
        a.generation = 0
        a.entry_timeout = CACHE_TIMEOUT
        a.attr_timeout = CACHE_TIMEOUT
        a.st_mode = st.st_mode
        a.st_nlink = self.stack.nlink(node, st)
        a.st_uid = st.st_uid
        a.st_gid = st.st_gid
        a.st_rdev = st.st_rdev
        a.st_size = st.st_size
        a.st_blksize = st.st_blksize
        a.st_blocks = st.st_blocks
        a.st_atime_ns = st.st_atime_ns
        a.st_mtime_ns = st.st_mtime_ns
        a.st_ctime_ns = st.st_ctime_ns
        if self.stack.immutable(node):
            node.attrs = a  # lower objects never change: build the reply once
        return a

    @_handler
    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> Any:
        parent = self.stack.node(parent_inode)
        try:
            node = self.stack.lookup(parent, name)
        except UnionError as exc:
            if exc.errno != errno.ENOENT:
                raise
            neg = pyfuse3.EntryAttributes()  # st_ino 0: a negative entry the kernel may cache
            neg.st_ino = 0
            neg.entry_timeout = CACHE_TIMEOUT
            return neg
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
    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        return self._entry(self.stack.node(inode))

    @_handler
    async def readlink(self, inode: int, ctx: Any) -> bytes:
        return self.stack.readlink(self.stack.node(inode))

    @_handler
    async def access(self, inode: int, mode: int, ctx: Any) -> bool:
        node = self.stack.node(inode)
        if mode & os.W_OK and not self.stack.has_upper:
            raise pyfuse3.FUSEError(errno.EROFS)
        return _may_access(self.stack.stat(node), mode, ctx)

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
    @_handler
    async def getxattr(self, inode: int, name: bytes, ctx: Any) -> bytes:
        try:
            return self.stack.getxattr(self.stack.node(inode), name)
        except OSError as exc:
            if exc.errno == errno.ENODATA:
                raise pyfuse3.FUSEError(pyfuse3.ENOATTR) from None
            raise

    @_handler
    async def listxattr(self, inode: int, ctx: Any) -> list[bytes]:
        return self.stack.listxattr(self.stack.node(inode))

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
        if start_id == 0:  # (re)start: take a fresh snapshot, as overlayfs does on rewind
            handle.entries = list(self.stack.listing(node).items())
        specials = [(b".", node), (b"..", node.parent or self.stack.root)]
        for pos in range(start_id, len(handle.entries) + 2):
            if pos < 2:
                name, target = specials[pos]
                if not pyfuse3.readdir_reply(token, name, self._entry(target), pos + 1):
                    return
                continue
            name, child = handle.entries[pos - 2]
            try:
                entry_node = self.stack.node_for(node, name, child)
                attrs = self._entry(entry_node)
            except OSError as exc:  # vanished from a layer: skip rather than fail the listing
                log.warning("readdir: skipping %r: %s", name, exc)
                continue
            if not pyfuse3.readdir_reply(token, name, attrs, pos + 1):
                return
            self.stack.remember(entry_node)

    async def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)

    @_handler
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        return None

    # ----- files -----------------------------------------------------------------------
    @_handler
    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        node = self.stack.node(inode)
        if (flags & os.O_ACCMODE) != os.O_RDONLY or flags & os.O_TRUNC:
            raise pyfuse3.FUSEError(errno.EROFS)
        fd = _open_noatime(self.stack.real_path(node), os.O_RDONLY)
        fh = self._new_fh()
        self._files[fh] = fd
        return pyfuse3.FileInfo(fh=fh, keep_cache=True)

    @_handler
    async def read(self, fh: int, off: int, size: int) -> bytes:
        return os.pread(self._files[fh], size, off)

    @_handler
    async def flush(self, fh: int) -> None:
        return None

    async def release(self, fh: int) -> None:
        fd = self._files.pop(fh, None)
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                log.exception("release: close failed")

    @_handler
    async def fsync(self, fh: int, datasync: bool) -> None:
        return None

    # ----- the write side: read-only until it is built ----------------------------------
    async def _erofs(self, *args: Any) -> Any:
        raise pyfuse3.FUSEError(errno.EROFS)

    setattr = _erofs  # type: ignore[assignment]
    mknod = _erofs  # type: ignore[assignment]
    mkdir = _erofs  # type: ignore[assignment]
    unlink = _erofs  # type: ignore[assignment]
    rmdir = _erofs  # type: ignore[assignment]
    symlink = _erofs  # type: ignore[assignment]
    rename = _erofs  # type: ignore[assignment]
    link = _erofs  # type: ignore[assignment]
    create = _erofs  # type: ignore[assignment]
    write = _erofs  # type: ignore[assignment]
    setxattr = _erofs  # type: ignore[assignment]
    removexattr = _erofs  # type: ignore[assignment]


def _open_noatime(path: bytes, flags: int) -> int:
    """Open a real file without touching its atime where we may (reading must not write)."""
    if _O_NOATIME:
        try:
            return os.open(path, flags | _O_NOATIME | os.O_CLOEXEC)
        except PermissionError:
            pass
    return os.open(path, flags | os.O_CLOEXEC)


def _may_access(st: os.stat_result, mode: int, ctx: Any) -> bool:
    """access(2)'s check against the caller's credentials (the kernel's, with
    default_permissions, normally answers before this is asked)."""
    if mode == os.F_OK or ctx is None or ctx.uid == 0:
        if ctx is not None and ctx.uid == 0 and mode & os.X_OK:
            return bool(st.st_mode & 0o111) or stat.S_ISDIR(st.st_mode)
        return True
    if ctx.uid == st.st_uid:
        bits = (st.st_mode >> 6) & 7
    elif ctx.gid == st.st_gid or st.st_gid in pyfuse3.get_sup_groups(ctx.pid):
        bits = (st.st_mode >> 3) & 7
    else:
        bits = st.st_mode & 7
    return (bits & mode) == mode
