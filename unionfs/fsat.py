"""Every filesystem call on layers and the work dir, made relative to directory fds.

Role: the model (`stack`, `writer`, `fsutil`, `markers`) names real objects by byte paths
under a layer root (`/srv/upper/a/b`), as before.  A `Roots` maps such a path to (the fd of
its root, the path relative to it) and makes the call with the *at family (fstatat, openat,
mkdirat, renameat2, …).  Two things follow, both kernel-overlayfs behaviour:
  - no path-length limit: a relative path longer than `SHORT` is walked in chunks with
    openat(O_PATH | O_DIRECTORY) and the call is made relative to the last directory fd, so
    objects deeper than PATH_MAX (4,096 bytes) are reachable;
  - a mount over one of its own layers works: a root that the mountpoint shadows (the
    mountpoint itself, or a directory below it: `shadow`) is opened before mounting and kept
    as an fd, so nothing resolves a path through the mountpoint again.
Other roots are *not* held open: they are reached by their absolute path (AT_FDCWD), as the
kernel reaches them through its dcache.  An fd held on a layer would keep its filesystem busy
until the daemon has exited, and FUSE's unmount does not wait for that: `umount MNT; umount
LOWERFS`, which works at once with kernel overlayfs, would fail with EBUSY.
xattrs have no *at call, and f*xattr refuses O_PATH fds (EBADF on this kernel): they go
through `/proc/self/fd/<dirfd>/<relative path>` with the l*xattr calls, which resolve the
magic link to the directory and do not follow a final symlink.

`Roots(strict=True)` (the daemon's) refuses a path under no registered root rather than
resolve it from `/`; `PLAIN` (strict=False) makes such paths relative to the cwd — the
long-path walk without the fds, for callers outside the daemon (imagestore's changeset and
commit self-check).

Concurrency: roots are added before the mount, then only read; every call opens and closes
its own temporary fds, so worker threads (copy-up data) may call in concurrently.
"""

from __future__ import annotations

import errno
import os
import weakref

from . import syscalls

TYPE_CHECKING = False  # typing's own constant, without importing typing before INIT (logs.py)
if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from typing import TypeVar

    T = TypeVar("T")


SHORT = 3800  # relative paths up to this many bytes go to the kernel in one call
_DIR_PATH = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC
_ROOT_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC


class Roots:
    """Directory fds of layer roots (and the work dir), and the *at calls under them."""

    def __init__(self, strict: bool = True, shadow: bytes | None = None) -> None:
        self.strict = strict
        # the mountpoint (a real path): roots at or below it are held as fds
        self.shadow = os.path.realpath(shadow) if shadow is not None else None
        self._fds: dict[bytes, int] = {}  # root -> its fd, or AT_FDCWD when reached by path
        self._lengths: list[int] = []  # distinct root-path lengths, longest first
        self._finalizer = weakref.finalize(self, _close_all, self._fds)

    # ----- roots --------------------------------------------------------------------
    def add(self, path: bytes) -> os.stat_result:
        """Register `path` (absolute, symlinks followed as the kernel follows layer options)
        as a root; idempotent.  Returns its fstat."""
        fd = os.open(path, _ROOT_FLAGS)
        try:
            st = os.fstat(fd)
            if path not in self._fds:
                shadowed = self.shadow is not None and inside(os.path.realpath(path), self.shadow)
                self._fds[path] = fd if shadowed else syscalls.AT_FDCWD
                self._lengths = sorted({len(p) for p in self._fds}, reverse=True)
                if shadowed:
                    fd = -1  # kept
        finally:
            if fd >= 0:
                os.close(fd)
        return st

    def handle(self, path: bytes) -> bytes | int:
        """How to name the registered root `path` outside this module: its fd when the
        mount shadows it, else the path itself."""
        fd = self._fds[path]
        return path if fd == syscalls.AT_FDCWD else fd

    def close(self) -> None:
        self._finalizer()

    def split(self, path: bytes) -> tuple[int, bytes]:
        """(root fd, relative path, "." for the root itself) of `path`."""
        size = len(path)
        for n in self._lengths:
            if n > size:
                continue
            fd = self._fds.get(path[:n])
            if fd is not None and (size == n or path[n] == 0x2F):
                if fd == syscalls.AT_FDCWD:
                    return fd, path
                return fd, path[n + 1 :] or b"."
        if self.strict:
            raise OSError(errno.EXDEV, "path under no layer root", path)
        return syscalls.AT_FDCWD, path

    def _do(self, path: bytes, fn: Callable[[int, bytes], T]) -> T:
        fd, rel = self.split(path)
        if len(rel) <= SHORT:
            return fn(fd, rel)
        return _deep(fd, rel, fn)

    def _do2(self, src: bytes, dst: bytes, fn: Callable[[int, bytes, int, bytes], T]) -> T:
        sfd, srel = self.split(src)
        dfd, drel = self.split(dst)
        owned: list[int] = []
        try:
            if len(srel) > SHORT:
                sfd, srel = _walk(sfd, srel)
                owned.append(sfd)
            if len(drel) > SHORT:
                dfd, drel = _walk(dfd, drel)
                owned.append(dfd)
            return fn(sfd, srel, dfd, drel)
        finally:
            for fd in owned:
                os.close(fd)

    # ----- the calls -------------------------------------------------------------------
    # (the read side's hot calls spell out the short-path case: no closure per call)
    def lstat(self, path: bytes) -> os.stat_result:
        fd, rel = self.split(path)
        if len(rel) <= SHORT:
            return os.stat(rel, dir_fd=fd, follow_symlinks=False)
        return _deep(fd, rel, lambda d, n: os.stat(n, dir_fd=d, follow_symlinks=False))

    def exists(self, path: bytes) -> bool:
        """lexists: False only for ENOENT (other errors are raised)."""
        try:
            self.lstat(path)
        except FileNotFoundError:
            return False
        return True

    def open(self, path: bytes, flags: int, mode: int = 0o777) -> int:
        fd, rel = self.split(path)
        if len(rel) <= SHORT:
            return os.open(rel, flags | os.O_CLOEXEC, mode, dir_fd=fd)
        return _deep(fd, rel, lambda d, n: os.open(n, flags | os.O_CLOEXEC, mode, dir_fd=d))

    def open_noatime(self, path: bytes, flags: int) -> int:
        """`open` without touching the object's atime where we may (reading must not
        write): O_NOATIME needs the owner or CAP_FOWNER, else a plain open, as the kernel's
        ovl_path_open falls back."""
        try:
            return self.open(path, flags | os.O_NOATIME)
        except PermissionError:
            return self.open(path, flags)

    def scandir(self, path: bytes) -> _Listing:
        """os.scandir of a directory, as a context manager: names are bytes, and each
        entry's stat() is valid only inside the `with`.  The directory is read with
        O_NOATIME, as kernel overlayfs reads real directories: the daemon's own reads mark
        no atime in any layer (a listing through the mount marks an upper directory's
        itself: UnionOperations._dir_accessed).  os.scandir of the fd gives str names,
        turned back into bytes (3 µs a directory more than scandir of a bytes path, which
        cannot take the flag)."""
        it, fd = self._scan(path)
        # entries quack as DirEntry[bytes]: name, inode, is_*, stat
        return _Listing(_BytesNames(it), fd)  # type: ignore[arg-type]

    def scandir_str(self, path: bytes) -> _StrListing:
        """`scandir` with the entries as os.scandir of an fd gives them (str names, to be
        os.fsencode'd): for the hottest reader, the merge of listings, which the bytes
        wrapper's extra object and forwarded calls cost ~1 µs an entry."""
        it, fd = self._scan(path)
        return _StrListing(it, fd)  # type: ignore[arg-type]

    def _scan(self, path: bytes) -> tuple[Iterator[os.DirEntry[str]], int]:
        """os.scandir of the directory opened O_NOATIME, and its fd (the caller's to close)."""
        fd = self.open_noatime(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            return os.scandir(fd), fd
        except BaseException:
            os.close(fd)
            raise

    def readlink(self, path: bytes) -> bytes:
        return self._do(path, lambda d, n: os.readlink(n, dir_fd=d))

    def mkdir(self, path: bytes, mode: int = 0o777) -> None:
        self._do(path, lambda d, n: os.mkdir(n, mode, dir_fd=d))

    def mknod(self, path: bytes, mode: int, device: int = 0) -> None:
        self._do(path, lambda d, n: os.mknod(n, mode, device, dir_fd=d))

    def symlink(self, target: bytes, path: bytes) -> None:
        self._do(path, lambda d, n: os.symlink(target, n, dir_fd=d))

    def unlink(self, path: bytes) -> None:
        self._do(path, lambda d, n: os.unlink(n, dir_fd=d))

    def rmdir(self, path: bytes) -> None:
        self._do(path, lambda d, n: os.rmdir(n, dir_fd=d))

    def rmtree(self, path: bytes) -> None:
        import shutil  # here: ~2.5 ms of start-up, and a mount rarely removes a tree

        self._do(path, lambda d, n: shutil.rmtree(n, dir_fd=d))

    def chown(self, path: bytes | int, uid: int, gid: int) -> None:
        """lchown, or fchown of an fd."""
        if isinstance(path, int):
            os.chown(path, uid, gid)
            return
        self._do(path, lambda d, n: os.chown(n, uid, gid, dir_fd=d, follow_symlinks=False))

    def chmod(self, path: bytes | int, mode: int) -> None:
        """chmod of a non-symlink (fchmodat has no working AT_SYMLINK_NOFOLLOW), or of an fd."""
        if isinstance(path, int):
            os.chmod(path, mode)
            return
        self._do(path, lambda d, n: os.chmod(n, mode, dir_fd=d))

    def truncate(self, path: bytes | int, length: int) -> None:
        if isinstance(path, int):
            os.truncate(path, length)
            return
        # O_NONBLOCK: were it ever asked of a FIFO, open must not wait for a reader
        fd = self.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        try:
            os.ftruncate(fd, length)
        finally:
            os.close(fd)

    def utime(self, path: bytes | int, ns: tuple[int, int]) -> None:
        """lutimes, in nanoseconds, or futimens of an fd."""
        if isinstance(path, int):
            os.utime(path, ns=ns)
            return
        self._do(path, lambda d, n: os.utime(n, ns=ns, dir_fd=d, follow_symlinks=False))

    def utime_now(self, path: bytes | int) -> None:
        """Both times to now (utimensat with no times), not following links."""
        if isinstance(path, int):
            os.utime(path)
            return
        self._do(path, lambda d, n: os.utime(n, dir_fd=d, follow_symlinks=False))

    def rename(self, src: bytes, dst: bytes) -> None:
        self._do2(src, dst, lambda sd, s, dd, d: os.rename(s, d, src_dir_fd=sd, dst_dir_fd=dd))

    def renameat2(self, src: bytes, dst: bytes, flags: int) -> None:
        self._do2(src, dst, lambda sd, s, dd, d: syscalls.renameat2(s, d, flags, sd, dd))

    def link(self, src: bytes, dst: bytes) -> None:
        self._do2(
            src,
            dst,
            lambda sd, s, dd, d: os.link(s, d, src_dir_fd=sd, dst_dir_fd=dd, follow_symlinks=False),
        )

    def link_fd(self, fd: int, dst: bytes) -> None:
        """A new name `dst` for the file open as `fd`, which may have no name left (an
        O_TMPFILE file opened without O_EXCL): linkat with AT_EMPTY_PATH.  Where that is
        refused (ENOENT or EPERM: a daemon without CAP_DAC_READ_SEARCH on a kernel before
        6.10), linkat of the fd's /proc/self/fd link, followed, as open(2) documents for
        O_TMPFILE; if that fails too, the first error stands."""
        try:
            self._do(dst, lambda d, n: syscalls.link_fd(fd, n, d))
        except (FileNotFoundError, PermissionError) as exc:
            src = b"/proc/self/fd/%d" % fd
            try:
                self._do(dst, lambda d, n: os.link(src, n, dst_dir_fd=d, follow_symlinks=True))
            except OSError:
                raise exc from None

    def btime(self, path: bytes) -> tuple[int, int] | None:
        """The birth time of `path` (a final symlink not followed): syscalls.btime."""
        return self._do(path, lambda d, n: syscalls.btime(n, d))

    def file_handle(self, path: bytes) -> tuple[int, bytes]:
        """name_to_handle_at (a final symlink not followed): (handle type, handle bytes)."""
        return self._do(path, lambda d, n: syscalls.name_to_handle_at(n, d))

    def statvfs(self, path: bytes) -> os.statvfs_result:
        fd = self.open(path, os.O_PATH)
        try:
            return os.fstatvfs(fd)
        finally:
            os.close(fd)

    # ----- xattrs (l*xattr through /proc/self/fd: no *at call exists) -------------------
    def listxattr(self, path: bytes | int) -> list[str]:
        """llistxattr, or flistxattr of an fd."""
        if isinstance(path, int):
            return os.listxattr(path)
        fd, rel = self.split(path)
        if len(rel) <= SHORT:
            return os.listxattr(_proc(fd, rel), follow_symlinks=False)
        return _deep(fd, rel, lambda d, n: os.listxattr(_proc(d, n), follow_symlinks=False))

    def getxattr(self, path: bytes | int, name: bytes) -> bytes:
        """lgetxattr, or fgetxattr of an fd."""
        if isinstance(path, int):
            return os.getxattr(path, name)
        fd, rel = self.split(path)
        if len(rel) <= SHORT:
            return os.getxattr(_proc(fd, rel), name, follow_symlinks=False)
        return _deep(fd, rel, lambda d, n: os.getxattr(_proc(d, n), name, follow_symlinks=False))

    def setxattr(self, path: bytes | int, name: bytes, value: bytes, flags: int = 0) -> None:
        """lsetxattr, or fsetxattr of an fd."""
        if isinstance(path, int):
            os.setxattr(path, name, value, flags)
            return
        self._do(
            path, lambda d, n: os.setxattr(_proc(d, n), name, value, flags, follow_symlinks=False)
        )

    def removexattr(self, path: bytes | int, name: bytes) -> None:
        """lremovexattr, or fremovexattr of an fd."""
        if isinstance(path, int):
            os.removexattr(path, name)
            return
        self._do(path, lambda d, n: os.removexattr(_proc(d, n), name, follow_symlinks=False))

    # ----- trees -------------------------------------------------------------------------
    def walk_stat(self, path: bytes) -> Iterator[tuple[bytes, os.stat_result]]:
        """(path, lstat) of every non-directory below the directory `path`, at any depth
        (os.fwalk: each directory is opened relative to its parent's fd)."""
        fd = self.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for dirpath, _dirs, files, dfd in os.fwalk(b".", dir_fd=fd):
                base = path + dirpath[1:] + b"/"
                for f in files:
                    yield base + f, os.stat(f, dir_fd=dfd, follow_symlinks=False)
        finally:
            os.close(fd)

    def walk_dirs(self, path: bytes) -> Iterator[bytes]:
        """Path of every directory below the directory `path`, at any depth (os.fwalk)."""
        fd = self.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for dirpath, dirs, _files, _dfd in os.fwalk(b".", dir_fd=fd):
                base = path + dirpath[1:] + b"/"
                for d in dirs:
                    yield base + d
        finally:
            os.close(fd)


def _proc(dirfd: int, name: bytes) -> bytes:
    if dirfd == syscalls.AT_FDCWD:
        return name
    return b"/proc/self/fd/%d/%s" % (dirfd, name)


class _Listing:
    """A scandir iterator and the directory fd its entries' paths go through (a plain class:
    a generator-based context manager costs more than the listing of a small directory)."""

    __slots__ = ("it", "owned")

    def __init__(self, it: Iterator[os.DirEntry[bytes]], owned: int) -> None:
        self.it = it
        self.owned = owned

    def __enter__(self) -> Iterator[os.DirEntry[bytes]]:
        return self.it

    def __exit__(self, *exc: object) -> None:
        self.it.close()  # type: ignore[attr-defined]
        if self.owned >= 0:
            os.close(self.owned)
            self.owned = -1


class _StrListing(_Listing):
    """A _Listing whose entries have str names (`Roots.scandir_str`)."""

    __slots__ = ()

    def __enter__(self) -> Iterator[os.DirEntry[str]]:  # type: ignore[override]
        return self.it  # type: ignore[return-value]


class _BytesNames:
    """os.scandir of an fd (str names) seen as os.scandir of a bytes path: `name` is bytes;
    the rest of an entry is os.DirEntry's (its stat() goes through the listed directory)."""

    __slots__ = ("it",)

    def __init__(self, it: Iterator[os.DirEntry[str]]) -> None:
        self.it = it

    def __iter__(self) -> _BytesNames:
        return self

    def __next__(self) -> _BytesEntry:
        return _BytesEntry(next(self.it))

    def close(self) -> None:
        self.it.close()  # type: ignore[attr-defined]


class _BytesEntry:
    __slots__ = ("de", "name")

    def __init__(self, de: os.DirEntry[str]) -> None:
        self.de = de
        self.name = os.fsencode(de.name)

    def inode(self) -> int:
        return self.de.inode()

    def is_dir(self, *, follow_symlinks: bool = True) -> bool:
        return self.de.is_dir(follow_symlinks=follow_symlinks)

    def is_file(self, *, follow_symlinks: bool = True) -> bool:
        return self.de.is_file(follow_symlinks=follow_symlinks)

    def is_symlink(self) -> bool:
        return self.de.is_symlink()

    def stat(self, *, follow_symlinks: bool = True) -> os.stat_result:
        return self.de.stat(follow_symlinks=follow_symlinks)


def _deep(fd: int, rel: bytes, fn: Callable[[int, bytes], T]) -> T:
    """fn(dirfd, name) for a relative path longer than SHORT."""
    dfd, name = _walk(fd, rel)
    try:
        return fn(dfd, name)
    finally:
        os.close(dfd)


def _walk(fd: int, rel: bytes) -> tuple[int, bytes]:
    """Open the directory holding `rel` (relative to `fd`, longer than SHORT) by chunks of at
    most SHORT bytes; returns (that directory's fd, owned by the caller; the last name)."""
    parent, _, name = rel.rpartition(b"/")
    dfd = fd
    owned = -1
    try:
        while parent:
            if len(parent) <= SHORT:
                chunk, parent = parent, b""
            else:
                cut = parent.rfind(b"/", 0, SHORT + 1)
                if cut <= 0:
                    raise OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG), rel)
                chunk, parent = parent[:cut], parent[cut + 1 :]
            new = os.open(chunk, _DIR_PATH, dir_fd=dfd)
            if owned >= 0:
                os.close(owned)
            dfd = owned = new
    except BaseException:
        if owned >= 0:
            os.close(owned)
        raise
    if owned < 0:  # `rel` was one long name: the kernel's own answer
        raise OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG), rel)
    return owned, name


def inside(path: bytes, root: bytes) -> bool:
    """Is `path` `root` or below it, by spelling (both spelled alike: absolute, no `..`)?"""
    return path == root or path.startswith(root.rstrip(b"/") + b"/")


def _close_all(fds: dict[bytes, int]) -> None:
    for fd in fds.values():
        if fd == syscalls.AT_FDCWD:
            continue
        try:
            os.close(fd)
        except OSError:
            pass
    fds.clear()


PLAIN = Roots(strict=False)
