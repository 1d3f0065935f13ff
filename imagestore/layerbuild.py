"""layerbuild: commit's one pass — the new layer's unpacked directory, built from the members
of its tar while `changeset.write_changeset` writes them.

    build = LayerBuild(store)                  layers/.tmp-<random>/diff, empty
    write_changeset(..., mirror=build.add)     each member applied as soon as it is written
    build.finish()                             its fingerprints beside diff; all synced
    build.publish(diff_id) -> bool             renamed to layers/<hex>, `complete` last
    build.discard()                            nothing of it stays (idempotent)

The tree is what `unpack` makes of the blob: every member goes through the one applier
(`tarapply.LayerWriter`, overlay format), in the tar's order, as a reader of the tar sees it.
Only a file's data comes another way: copied from the upper's file (`os.copy_file_range`, a
reflink where the filesystem does it and an in-kernel copy elsewhere; read/write where it is
refused, across filesystems), the holes of a sparse member kept; and its fingerprint
(xxh3-128) is the one taken from the bytes that went into the tar (`changeset.FileData`).
So the blob is never read back, and no file is read twice for hashing.

Lifecycle (the store's rules, as `unpack` keeps them): the temp dir is published only once it
is complete and synced, and `complete` is written last (`unpack.publish`); when the store has
the layer already (the same DiffID), this copy is dropped.  On any failure the caller calls
`discard` (a `.tmp-*` dir a crash leaves is debris, as an interrupted unpack's is).
Concurrency: none of its own; each member is applied in the caller's thread, inside `add`,
while the caller still has the upper's file open.  A worker thread that applied them while
the tar was written (so that the store's file creations overlapped the tar) lost once files
were created fast (the store's layers/ is FS_TOPDIR_FL): the two threads took turns on the
GIL thousands of times a commit (`strace -c`: 17,762 futex calls for 1,000 files).  S2 by
hand, 2 × 7 alternating rounds: 386 and 398 ms with the thread, 326 and 338 ms without.  The
caller keeps the upper still until `finish` returns.  `publish` takes the per-DiffID lock an
unpack takes, so a pull unpacking the same layer meanwhile and this commit serialise.
"""

from __future__ import annotations

import errno
import os
import tarfile

from unionfs.syscalls import syncfs

from . import fingerprints, unpack
from .changeset import FileData
from .digest import Digest
from .store import Store
from .tarapply import LayerWriter

COPY_CHUNK = 1 << 20  # read/write fallback
# copy_file_range refused: across filesystems (EXDEV), not offered by this one (the rest)
_NO_COPY_RANGE = frozenset({errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL})
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class LayerBuild:
    """One new layer directory being built (see the module docstring).  Implements
    `tarapply.Contents` for its LayerWriter: a regular member's data is the file `add` got."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.tmp = store.layers / f".tmp-{os.urandom(8).hex()}"
        self._data: FileData | None = None  # the file of the member being applied
        self._published = False
        self._root_fd = -1
        self._writer: LayerWriter | None = None
        try:
            for d in (self.tmp, self.tmp / "diff"):
                os.mkdir(d, 0o755)
                os.chmod(d, 0o755)  # whatever the umask, as unpack makes it
            self._root_fd = os.open(self.tmp / "diff", _DIR)
            self._writer = LayerWriter(self._root_fd)
        except BaseException:
            self.discard()
            raise

    def add(self, member: tarfile.TarInfo, data: FileData | None) -> None:
        """Apply one member as the changeset writes it (a `changeset.Mirror`)."""
        writer = self._writer
        assert writer is not None, "finished or discarded"
        self._data = data
        try:
            writer.apply(member, self)
        finally:
            self._data = None

    def write_to(self, member: tarfile.TarInfo, fd: int) -> bytes:
        """`tarapply.Contents`: the data of the file being applied, and its digest."""
        data = self._data
        assert data is not None and data.size == member.size, member.name
        if data.regions is None:
            _copy_range(data.fd, fd, 0, data.size)
        else:
            for offset, length in data.regions:
                _copy_range(data.fd, fd, offset, length)
            os.ftruncate(fd, data.size)  # a trailing hole
        return data.digest

    def finish(self) -> None:
        """Directory metadata (once every member is in), then the fingerprints; the whole
        dir synced (syncfs)."""
        writer = self._writer
        assert writer is not None, "finished or discarded"
        writer.finish()
        unpack.write_fingerprints(self.tmp / fingerprints.FILE_NAME, self._root_fd, writer.digests)
        self._close()
        writer.log_warnings("new layer")
        syncfs(os.fsencode(self.tmp))  # the tree is on disk before it is published

    def publish(self, diff_id: Digest) -> bool:
        """Publish the finished dir as layer `diff_id`; False (and this copy dropped) when
        the store has that layer already."""
        with unpack.layer_lock(self.store, diff_id):
            if self.store.has_layer(diff_id):
                self.discard()
                return False
            unpack.publish(self.store, self.tmp, diff_id)  # removes it if that fails late
            self._published = True
        return True

    def discard(self) -> None:
        """Remove the temp dir (unless it was published); safe to call at any point."""
        self._close()
        if not self._published:
            unpack.remove_tree(self.tmp)

    def _close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._root_fd >= 0:
            os.close(self._root_fd)
            self._root_fd = -1


def _copy_range(src: int, dst: int, offset: int, length: int) -> None:
    """Copy bytes [offset, offset+length) of `src` to the same place in `dst`."""
    pos, end = offset, offset + length
    while pos < end:
        try:
            n = os.copy_file_range(src, dst, end - pos, pos, pos)
        except OSError as exc:
            if exc.errno not in _NO_COPY_RANGE:
                raise
            return _copy_rw(src, dst, pos, end)
        if n == 0:
            raise OSError(errno.EIO, "the file shrank while it was committed")
        pos += n


def _copy_rw(src: int, dst: int, pos: int, end: int) -> None:
    while pos < end:
        data = os.pread(src, min(COPY_CHUNK, end - pos), pos)
        if not data:
            raise OSError(errno.EIO, "the file shrank while it was committed")
        view = memoryview(data)
        while view:
            written = os.pwrite(dst, view, pos)
            view, pos = view[written:], pos + written
