"""Applying a layer tar's entries, in order, to a directory: the one tar applier.

Two on-disk formats, as umoci's `OnDiskFormat` switches its one extractor:
  - OVERLAY (unpack: each layer in a directory of its own, in the kernel-overlayfs format,
    whiteouts and opaque directories as markers; the rules below);
  - PLAIN (`commit --verify`, umoci's DirRootfs: layers applied one after the other onto one
    plain directory, so a whiteout removes what lower layers left there and an opaque marker
    removes the directory's content from lower layers; entries of the same layer stay).

Safety: nothing is ever followed.  Each parent component is opened with O_NOFOLLOW|O_DIRECTORY
from the layer root (a symlink or other non-directory as a parent is refused), files are
created with O_EXCL|O_NOFOLLOW, metadata is set through the fd (or *at(AT_SYMLINK_NOFOLLOW)
for symlinks).  Symlink entries may point anywhere: they are never followed here.  A hard link
must name an earlier non-directory entry of this layer.  Names are made safe by `tarsafe`.

OCI apply rules (image-spec layer.md), in the overlay format:
  - A non-directory entry replaces whatever is at its path; a directory entry over a directory
    only updates its metadata; duplicate entries: the later one wins.  A directory that
    replaces a non-directory or a whiteout of this layer is made opaque, since in the OCI
    model the lower content at that path was removed first.
  - `.wh.NAME` hides NAME in *lower* layers only (the spec: files present in the same layer
    stay).  So: NAME absent so far → a whiteout (char device 0/0); NAME a directory of this
    layer → it becomes opaque and keeps its content; NAME a non-directory of this layer → kept
    as is (it already hides everything below).  A later entry at NAME replaces the whiteout.
  - `.wh..wh..opq` marks its directory opaque (`trusted.overlay.opaque=y` as root,
    `user.overlay.opaque=y` otherwise); entries of the same layer stay, in any order.
  - An entry below a whiteout of this layer (`.wh.a`, then `a/b`) turns the whiteout into an
    opaque directory.
  - The quirk: a whiteout below a non-directory of this layer (`a/b` a file, and `a/b/.wh.c`,
    in either order) is ignored: the non-directory already hides everything below it.  A real
    entry below a non-directory (`a/b` a file, then `a/b/c`) is a `CorruptLayer`.
  - AUFS metadata (`.wh..wh.plnk/…` and friends) is skipped, as Docker does; any other `.wh.`
    name used as a directory is a `CorruptLayer`.

Not root: ownership is not changed (files belong to the caller); char/block devices are
skipped with a warning (also as root when mknod is refused); xattrs the kernel refuses
(trusted.*, security.*) are skipped with a warning; whiteouts stay char devices 0/0 (allowed
unprivileged since Linux 5.8) and fall back to an empty `.wh.NAME` file where mknod is refused
(layerfs reads both).  Internal xattrs (`*.overlay.*`, our own) in a layer are dropped.
Regular files are written densely, except GNU sparse members, whose holes are kept.
A member's data comes from the tar being read, or from a `Contents` (commit's one pass, which
applies the members it writes: `layerbuild`).

One LayerWriter per layer; not thread-safe; it owns the fds of its directory cache (`close`);
with `workers`, small regular files are created by a `filepool.FilePool`, drained wherever
order matters (`_apply`).  About 620 lines: the entry kinds, the fd walk and both formats'
whiteout rules belong together, and splitting them would put the one applier back in two
places.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import tarfile
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn, Protocol

import xxhash

from unionfs import markers

from . import fstree, tarsafe
from .errors import CorruptLayer
from .filepool import FilePool
from .tarsafe import pax_xattrs, shown, split_path, times_ns

log = logging.getLogger(__name__)

COPY_CHUNK = 1 << 20
SPARSE_CHUNK = 1 << 16  # the granularity of holes in sparse members
POOL_FILE_BYTES = 1 << 18  # regular files up to this size may be created by filepool workers
DIR_CACHE_SIZE = 64  # open directory fds kept for the walks from the root
MAX_WARNINGS = 20  # kept verbatim; the rest are only counted
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
# Failures of the machine rather than of the layer: they propagate as OSError.
ENVIRONMENT_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.ENOMEM, errno.EMFILE, errno.ENFILE}
)
_REFUSED = (errno.EPERM, errno.EACCES, errno.ENOTSUP)


@dataclass
class _DirMeta:
    mode: int
    atime_ns: int
    mtime_ns: int
    ino: int


OVERLAY, PLAIN = "overlay", "plain"


class MemberSource(Protocol):
    """Where the members come from: a tarfile.TarFile, or a tarstream.TarReader."""

    def extractfile(self, member: tarfile.TarInfo, /) -> Any: ...


class Contents(Protocol):
    """The data of the regular members being applied, when they do not come from a tar."""

    def write_to(self, member: tarfile.TarInfo, fd: int) -> bytes:
        """Write `member`'s content into the new, empty file `fd` (holes where a sparse
        member has them); return its xxh3-128, as `_copy` does."""
        ...


Source = MemberSource | Contents  # where `apply` takes a regular member's data from


class LayerWriter:
    """Applies tar members, in order, to the directory open as `root_fd`, in format `fmt`
    (OVERLAY or PLAIN, see the module docstring)."""

    def __init__(self, root_fd: int, fmt: str = OVERLAY, workers: int = 0) -> None:
        if fmt not in (OVERLAY, PLAIN):
            raise ValueError(f"unknown layer format {fmt!r}")
        # OVERLAY only: small regular files are created by `workers` threads (filepool)
        self._pool = FilePool(workers) if workers and fmt == OVERLAY else None
        self.root_fd = root_fd
        self.fmt = fmt
        self._mine: set[bytes] = set()  # PLAIN: the paths this layer wrote (they stay)
        self.privileged = os.geteuid() == 0
        if fmt == OVERLAY:  # uid 0 of a user namespace: opaque markers in user.overlay.*
            markers.probe_trusted(root_fd)
        self.warnings: list[str] = []  # the first MAX_WARNINGS, for the caller's log
        self.warning_count = 0
        self._dirs: dict[bytes, _DirMeta] = {}
        self._cache: OrderedDict[bytes, int] = OrderedDict()  # path → directory fd, LRU
        self._wh_files = False  # some whiteouts are `.wh.NAME` files (mknod was refused)
        # xxh3-128 of each regular file's content as written, by st_ino (the fingerprints:
        # a later file that reuses a number was written later, and overwrites it)
        self.digests: dict[int, bytes] = {}

    # ----- entry points ------------------------------------------------------------------
    def apply(self, member: tarfile.TarInfo, tar: Source) -> None:
        """Apply one member; a layer-caused failure becomes a CorruptLayer naming it (for a
        file a worker creates, raised by a later call or by `finish`)."""
        try:
            self._apply(member, tar)
        except _MEMBER_ERRORS as exc:
            _raise_for(member, exc)

    def wait(self) -> None:
        """Wait for the files workers are creating; raise the first failure among them."""
        if self._pool is not None:
            self._pool.drain()

    def finish(self) -> None:
        """Directories' modes and times, deepest first, once nothing more is written inside."""
        self.wait()
        # Reverse byte order visits children before parents (a path sorts before its
        # extensions), and keeps each subtree together for the directory cache.
        for key in sorted(self._dirs, reverse=True):
            meta = self._dirs[key]
            fd = self._lookup(key.split(b"/")) if key else self.root_fd
            if fd is not None and os.fstat(fd).st_ino == meta.ino:  # not replaced since
                os.chmod(fd, meta.mode)
                os.utime(fd, ns=(meta.atime_ns, meta.mtime_ns))

    def close(self) -> None:
        if self._pool is not None:  # whatever the workers still do ends first
            self._pool.shutdown()
        while self._cache:
            os.close(self._cache.popitem()[1])

    def log_warnings(self, what: str) -> None:
        """One log line for the warnings of the whole layer (`what`: which layer)."""
        if self.warning_count:
            more = self.warning_count - len(self.warnings)
            tail = f" (and {more} more)" if more else ""
            log.warning("%s: %s%s", what, "; ".join(self.warnings), tail)

    def warn(self, message: str) -> None:
        log.debug("%s", message)
        self.warning_count += 1
        if len(self.warnings) < MAX_WARNINGS:
            self.warnings.append(message)

    # ----- dispatch ----------------------------------------------------------------------
    def _apply(self, member: tarfile.TarInfo, tar: Source) -> None:
        entry = shown(member.name)
        parts = split_path(member.name, entry)
        if self._pool is not None and self._pool.pending:
            # a file still being created must exist before anything looks at its path: a
            # regular file, directory or symlink touches only its own path and its parents;
            # anything else (hard links, whiteouts and opaque markers, which are `.wh.` files
            # that act on another name, devices) may look elsewhere
            plain = member.isreg() or member.isdir() or member.issym()
            if plain and not (parts and parts[-1].startswith(markers.WH_PREFIX)):
                self._pool.drain_under(parts)
            else:
                self._pool.drain()
        for comp in parts[:-1]:
            if comp.startswith(markers.AUFS_META_PREFIX):
                return self._skip(entry, "AUFS metadata")
            if comp.startswith(markers.WH_PREFIX):
                raise CorruptLayer(f"entry {entry}: a whiteout name used as a directory")
        base = parts[-1] if parts else b""
        if base == markers.WH_OPAQUE:
            return self._opaque(parts, entry)
        if base.startswith(markers.AUFS_META_PREFIX):
            return self._skip(entry, "AUFS metadata")
        if base.startswith(markers.WH_PREFIX):
            target = markers.oci_whiteout_target(base)
            if target in (None, b".", b".."):
                raise CorruptLayer(f"entry {entry}: a whiteout without a valid name")
            assert target is not None
            return self._whiteout(parts, target, entry)
        if self.fmt == PLAIN:
            self._mine.add(b"/".join(parts))
        if member.isdir():
            return self._directory(parts, member, entry)
        if not parts:
            raise CorruptLayer(f"entry {entry}: a non-directory as the layer root")
        if member.isreg():
            return self._regular(parts, member, tar, entry)
        if member.issym():
            return self._symlink(parts, member, entry)
        if member.islnk():
            return self._hardlink(parts, member, entry)
        if member.isfifo() or member.ischr() or member.isblk():
            return self._special(parts, member, entry)
        raise CorruptLayer(f"entry {entry}: unsupported tar entry type {member.type!r}")

    def _skip(self, entry: str, why: str) -> None:
        log.debug("skipping tar entry %r: %s", entry, why)

    # ----- entry kinds -------------------------------------------------------------------
    def _directory(self, parts: list[bytes], member: tarfile.TarInfo, entry: str) -> None:
        if parts:
            dfd = self._parent(parts, entry)
            assert dfd is not None
            fd = self._make_dir(dfd, parts[-1], 0o700, entry)
        else:
            fd = os.dup(self.root_fd)
        try:
            self._owner(fd, member, entry)
            self._xattrs(fd, member, entry)
            atime, mtime = times_ns(member)
            meta = _DirMeta(member.mode & 0o7777, atime, mtime, os.fstat(fd).st_ino)
            self._dirs[b"/".join(parts)] = meta
        finally:
            os.close(fd)

    def _regular(
        self, parts: list[bytes], member: tarfile.TarInfo, tar: Source, entry: str
    ) -> None:
        limit = tarsafe.MAX_FILE_SIZE
        if member.size > limit:
            raise CorruptLayer(f"entry {entry}: {member.size} bytes (limit {limit})")
        write_to = getattr(tar, "write_to", None)  # Contents (commit) rather than a tar
        if (
            self._pool is not None
            and member.size <= POOL_FILE_BYTES
            and not member.issparse()
            and write_to is None
        ):
            dfd, name = self._place(parts, entry)
            src = tar.extractfile(member)  # type: ignore[union-attr]
            assert src is not None
            with src:
                data = src.read()
            fd_copy = os.dup(dfd)  # the cache may close dfd before the worker runs
            try:
                self._pool.submit(parts, self._small_file, fd_copy, name, member, data, entry)
            except BaseException:
                os.close(fd_copy)
                raise
            return
        fd = self._new_file(parts, member, entry)
        try:
            if write_to is not None:
                digest = write_to(member, fd)
            else:
                src = tar.extractfile(member)  # type: ignore[union-attr]
                assert src is not None
                with src:
                    digest = _copy(src, fd, member.size, sparse=member.issparse())
            self._file_meta(fd, member, entry, digest)
        finally:
            os.close(fd)

    def _new_file(self, parts: list[bytes], member: tarfile.TarInfo, entry: str) -> int:
        """Create the regular file parts[-1], whatever was there removed, open for writing
        (`_file_meta` finishes it).  Where nothing was — the rule in a layer being built —
        O_EXCL says so and one openat does it; else `_place` clears the name first."""
        mode = member.mode & 0o777  # the special bits only after chown, in `_file_meta`
        if not self._wh_files:  # else a `.wh.NAME` file may have to go too
            dfd = self._parent(parts, entry)
            assert dfd is not None
            try:
                return os.open(parts[-1], _NEW_FILE, mode, dir_fd=dfd)
            except FileExistsError:
                pass
        dfd, name = self._place(parts, entry)
        return os.open(name, _NEW_FILE, mode, dir_fd=dfd)

    def _file_meta(self, fd: int, member: tarfile.TarInfo, entry: str, digest: bytes) -> None:
        """A new regular file's fingerprint, owner, xattrs, mode and times.  The owner and
        the mode are set only where the new file's differ (it has its creator's ids, and
        its creation mode less the umask); xattrs (an ACL's among them) may change the mode,
        so with any PAX record the mode is set anyway."""
        st = os.fstat(fd)
        self.digests[st.st_ino] = digest
        mode = member.mode & 0o7777
        same_mode = stat.S_IMODE(st.st_mode) == mode and not member.pax_headers
        if (st.st_uid, st.st_gid) != (member.uid, member.gid):
            self._owner(fd, member, entry)
            same_mode = False  # chown may have cleared setuid/setgid
        self._xattrs(fd, member, entry)
        if not same_mode:
            os.chmod(fd, mode)
        os.utime(fd, ns=times_ns(member))

    def _small_file(
        self, dfd: int, name: bytes, member: tarfile.TarInfo, data: bytes, entry: str
    ) -> None:
        """A worker's part of `_regular` (owns `dfd`); failures as `apply` raises them."""
        try:
            fd = os.open(name, _NEW_FILE, member.mode & 0o777, dir_fd=dfd)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                self._file_meta(fd, member, entry, xxhash.xxh3_128_digest(data))
            finally:
                os.close(fd)
        except _MEMBER_ERRORS as exc:
            _raise_for(member, exc)
        finally:
            os.close(dfd)

    def _symlink(self, parts: list[bytes], member: tarfile.TarInfo, entry: str) -> None:
        dfd, name = self._place(parts, entry)
        os.symlink(os.fsencode(member.linkname), name, dir_fd=dfd)
        if self.privileged:
            os.chown(name, member.uid, member.gid, dir_fd=dfd, follow_symlinks=False)
        self._xattrs(b"/proc/self/fd/%d/%s" % (dfd, name), member, entry)
        os.utime(name, ns=times_ns(member), dir_fd=dfd, follow_symlinks=False)

    def _hardlink(self, parts: list[bytes], member: tarfile.TarInfo, entry: str) -> None:
        target = split_path(member.linkname, entry)
        tfd = self._open_existing(target[:-1]) if target else None
        try:
            st = _lstat(tfd, target[-1]) if tfd is not None else None
            fake = target and target[-1].startswith(markers.WH_PREFIX)
            if st is None or stat.S_ISDIR(st.st_mode) or markers.is_chardev_whiteout(st) or fake:
                link = shown(member.linkname)
                raise CorruptLayer(
                    f"entry {entry}: hard link to {link}: not an earlier file of this layer"
                )
            if target == parts:
                return
            dfd, name = self._place(parts, entry)
            os.link(target[-1], name, src_dir_fd=tfd, dst_dir_fd=dfd, follow_symlinks=False)
        finally:
            if tfd is not None:
                os.close(tfd)

    def _special(self, parts: list[bytes], member: tarfile.TarInfo, entry: str) -> None:
        if member.isfifo():
            kind, dev = stat.S_IFIFO, 0
        else:
            if not self.privileged:
                return self.warn(f"device {entry} skipped (not root)")
            kind = stat.S_IFCHR if member.ischr() else stat.S_IFBLK
            dev = os.makedev(member.devmajor, member.devminor)
        dfd, name = self._place(parts, entry)
        try:
            os.mknod(name, kind | 0o600, dev, dir_fd=dfd)
        except PermissionError:
            return self.warn(f"device {entry} skipped (mknod refused)")
        self._xattrs(b"/proc/self/fd/%d/%s" % (dfd, name), member, entry)
        fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
        try:
            path = f"/proc/self/fd/{fd}"  # the node itself, which is not a symlink
            if self.privileged:
                os.chown(path, member.uid, member.gid)
            os.chmod(path, member.mode & 0o7777)
            os.utime(path, ns=times_ns(member))
        finally:
            os.close(fd)

    # ----- whiteouts ---------------------------------------------------------------------
    def _whiteout(self, parts: list[bytes], target: bytes, entry: str) -> None:
        if self.fmt == PLAIN:
            return self._remove_lower(parts[:-1], [target])
        dfd = self._parent(parts, entry, for_whiteout=True)
        if dfd is None:
            return self._skip(entry, "a whiteout below a non-directory of this layer")
        st = _lstat(dfd, target)
        if st is None:
            if not (self._wh_files and _lstat(dfd, markers.oci_whiteout_name(target))):
                self._make_whiteout(dfd, target)
        elif stat.S_ISDIR(st.st_mode):  # a directory of this layer: keep it, hide the lower
            fd = os.open(target, _DIR_FLAGS, dir_fd=dfd)
            try:
                self._set_opaque(fd, entry)
            finally:
                os.close(fd)
        # else: a non-directory (or a whiteout) of this layer already hides the lower NAME

    def _make_whiteout(self, dfd: int, name: bytes) -> None:
        try:
            markers.make_whiteout_at(dfd, name)
        except PermissionError:
            os.close(os.open(markers.oci_whiteout_name(name), _NEW_FILE, 0o600, dir_fd=dfd))
            self._wh_files = True

    def _opaque(self, parts: list[bytes], entry: str) -> None:
        if self.fmt == PLAIN:
            dfd = self._lookup(parts[:-1])
            if dfd is not None:
                with os.scandir(dfd) as it:
                    names = [os.fsencode(de.name) for de in it]
                self._remove_lower(parts[:-1], names)
            return
        dfd = self._parent(parts, entry, for_whiteout=True)
        if dfd is None:
            return self._skip(entry, "an opaque marker below a non-directory of this layer")
        self._set_opaque(dfd, entry)

    def _set_opaque(self, fd: int, entry: str) -> None:
        """Mark the directory open as `fd` opaque; where the filesystem refuses the xattr,
        an OCI `.wh..wh..opq` file inside says it instead (layerfs reads both)."""
        try:
            markers.set_opaque_fd(fd)
        except OSError as exc:
            if exc.errno not in _REFUSED:
                raise
            self.warn(f"opaque marker of {entry} kept as a file: {exc.strerror}")
            os.close(os.open(markers.WH_OPAQUE, _NEW_FILE & ~os.O_EXCL, 0o600, dir_fd=fd))

    def _remove_lower(self, dirs: list[bytes], names: list[bytes]) -> None:
        """PLAIN: remove `names` of the directory at `dirs` that lower layers left there
        (this layer's own entries stay, as the OCI rules have it)."""
        dfd = self._lookup(dirs)
        if dfd is None:  # nothing there, or a non-directory: nothing below to hide
            return
        for name in names:
            path = b"/".join([*dirs, name])
            if path in self._mine:
                continue
            st = _lstat(dfd, name)
            if st is None:
                continue
            if stat.S_ISDIR(st.st_mode):
                self._forget(path)
                fstree.remove_at(dfd, name)
            else:
                os.unlink(name, dir_fd=dfd)

    # ----- paths -------------------------------------------------------------------------
    def _place(self, parts: list[bytes], entry: str) -> tuple[int, bytes]:
        """The parent fd and name for a new non-directory, with whatever was there removed."""
        dfd = self._parent(parts, entry)
        assert dfd is not None
        name = parts[-1]
        st = _lstat(dfd, name)
        if st is None:
            self._drop_wh_file(dfd, name)
        elif stat.S_ISDIR(st.st_mode):
            self._forget(b"/".join(parts))
            fstree.remove_at(dfd, name)
        else:
            os.unlink(name, dir_fd=dfd)
        return dfd, name

    def _make_dir(self, dfd: int, name: bytes, mode: int, entry: str) -> int:
        """Open the directory `name`, creating it (opaque when it replaces a non-directory or
        a whiteout of this layer); returns an fd."""
        st = _lstat(dfd, name)
        opaque = st is not None and not stat.S_ISDIR(st.st_mode)
        if st is None:
            opaque = self._drop_wh_file(dfd, name)
        elif opaque:
            os.unlink(name, dir_fd=dfd)
        if st is None or opaque:
            os.mkdir(name, mode, dir_fd=dfd)
        fd = os.open(name, _DIR_FLAGS, dir_fd=dfd)
        try:
            if st is None or opaque:
                os.chmod(fd, mode)  # whatever the umask
            if opaque and self.fmt == OVERLAY:  # PLAIN: what it replaced is simply gone
                self._set_opaque(fd, entry)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _drop_wh_file(self, dfd: int, name: bytes) -> bool:
        """Remove a `.wh.NAME` fallback whiteout, if this layer made one; True if it did."""
        if not self._wh_files:
            return False
        try:
            os.unlink(markers.oci_whiteout_name(name), dir_fd=dfd)
        except FileNotFoundError:
            return False
        return True

    def _parent(self, parts: list[bytes], entry: str, for_whiteout: bool = False) -> int | None:
        """An fd (owned by the cache: use it before the next walk) of the directory holding
        parts[-1], creating missing parents.  None when a whiteout lies below a non-directory
        (see the module doc)."""
        dirs = parts[:-1]
        return self._walk(
            dirs, lambda fd, j: self._step(fd, dirs[j], dirs[: j + 1], entry, for_whiteout)
        )

    def _lookup(self, dirs: list[bytes]) -> int | None:
        """Like `_parent`, for an existing directory: never creates; None if it is not one."""
        return self._walk(dirs, lambda fd, j: _open_dir(fd, dirs[j]))

    def _walk(self, dirs: list[bytes], step: Callable[[int, int], int | None]) -> int | None:
        """Walk from the deepest cached ancestor of `dirs`, caching each directory reached."""
        if not dirs:
            return self.root_fd
        key = b"/".join(dirs)
        fd = self._cache.get(key)
        if fd is not None:  # the usual case: the last member's parent, or a sibling's
            self._cache.move_to_end(key)
            return fd
        i = len(dirs) - 1
        while i and b"/".join(dirs[:i]) not in self._cache:
            i -= 1
        fd = self.root_fd
        if i:
            key = b"/".join(dirs[:i])
            self._cache.move_to_end(key)
            fd = self._cache[key]
        for j in range(i, len(dirs)):
            nfd = step(fd, j)
            if nfd is None:
                return None
            self._cache[b"/".join(dirs[: j + 1])] = fd = nfd
            if len(self._cache) > DIR_CACHE_SIZE:
                os.close(self._cache.popitem(last=False)[1])
        return fd

    def _forget(self, path: bytes) -> None:
        """Drop cached fds of `path` and below (a directory tree being removed)."""
        for key in [k for k in self._cache if k == path or k.startswith(path + b"/")]:
            os.close(self._cache.pop(key))

    def _step(
        self, dfd: int, comp: bytes, path: list[bytes], entry: str, for_whiteout: bool
    ) -> int | None:
        try:
            return os.open(comp, _DIR_FLAGS, dir_fd=dfd)
        except FileNotFoundError:
            if for_whiteout and self._wh_files and _lstat(dfd, markers.oci_whiteout_name(comp)):
                return None
            return self._make_dir(dfd, comp, 0o755, entry)
        except OSError as exc:
            if exc.errno not in (errno.ENOTDIR, errno.ELOOP):
                raise
        st = os.stat(comp, dir_fd=dfd, follow_symlinks=False)
        if for_whiteout:
            return None
        if markers.is_chardev_whiteout(st) and self.fmt == OVERLAY:
            return self._make_dir(dfd, comp, 0o755, entry)
        what = "a symlink" if stat.S_ISLNK(st.st_mode) else "not a directory"
        where = os.fsdecode(b"/".join(path))
        raise CorruptLayer(f"entry {entry}: parent {where!r} is {what}; not writing through it")

    def _open_existing(self, parts: list[bytes]) -> int | None:
        """An fd (the caller's) of the existing directory at `parts`, or None."""
        fd = os.dup(self.root_fd)
        for comp in parts:
            nfd = _open_dir(fd, comp)
            os.close(fd)
            if nfd is None:
                return None
            fd = nfd
        return fd

    # ----- metadata ----------------------------------------------------------------------
    def _owner(self, fd: int, member: tarfile.TarInfo, entry: str) -> None:
        if not self.privileged:
            return
        try:
            os.chown(fd, member.uid, member.gid)
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.EPERM):  # unmapped in a user namespace
                raise
            self.warn(f"owner {member.uid}:{member.gid} of {entry} not set: {exc.strerror}")

    def _xattrs(self, target: int | bytes, member: tarfile.TarInfo, entry: str) -> None:
        """Set the entry's xattrs on an fd, or on a path whose last component is never
        followed."""
        for name, value in pax_xattrs(member):
            if markers.is_internal_xattr(name):
                self.warn(f"internal xattr {name!r} of {entry} dropped")
                continue
            try:
                if isinstance(target, int):
                    os.setxattr(target, name, value)
                else:
                    os.setxattr(target, name, value, follow_symlinks=False)
            except OSError as exc:
                if exc.errno not in _REFUSED:
                    raise
                self.warn(f"xattr {name!r} of {entry} not set: {exc.strerror}")


_MEMBER_ERRORS = (CorruptLayer, OSError, tarfile.TarError, ValueError, OverflowError, EOFError)


def _raise_for(member: tarfile.TarInfo, exc: BaseException) -> NoReturn:
    """A failure applying `member`: a CorruptLayer naming it, unless the machine failed."""
    if isinstance(exc, CorruptLayer):
        raise exc
    if isinstance(exc, OSError):
        if exc.errno in ENVIRONMENT_ERRNOS:
            raise exc
        raise CorruptLayer(f"entry {shown(member.name)}: {exc.strerror or exc}") from exc
    raise CorruptLayer(f"entry {shown(member.name)}: {exc}") from exc


def _open_dir(dfd: int, name: bytes) -> int | None:
    """A real directory `name` in `dfd` (never a symlink to one), or None."""
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=dfd)
    except OSError:
        return None


def _lstat(dfd: int, name: bytes) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dfd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _copy(src: Any, fd: int, size: int, sparse: bool) -> bytes:
    """Copy a member's data; for a sparse member, all-zero pieces become holes.  Returns the
    xxh3-128 of the content (its fingerprint, taken from the stream as it passes)."""
    step = SPARSE_CHUNK if sparse else COPY_CHUNK
    zeros = bytes(step) if sparse else b""
    h = xxhash.xxh3_128()
    while chunk := src.read(step):
        h.update(chunk)
        if sparse and chunk == zeros[: len(chunk)]:
            os.lseek(fd, len(chunk), os.SEEK_CUR)
            continue
        view = memoryview(chunk)
        while view:
            view = view[os.write(fd, view) :]
    if sparse:
        os.ftruncate(fd, size)
        gap = size - os.lseek(fd, 0, os.SEEK_CUR)  # a trailing hole: zeros in the file
        while gap > 0:
            h.update(zeros[: min(gap, step)])
            gap -= step
    return h.digest()
