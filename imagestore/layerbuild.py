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
Concurrency: the members are applied by a worker thread of this object, so that the file
creation in the store (syscalls, which release the GIL, and often wait on the journal)
overlaps the writing and compressing of the tar; `add` queues a member with a duplicate of
its file's fd, handed to the worker BATCH at a time (at most QUEUE batches waiting: bounded
fds and memory), `finish` waits for the worker
and re-raises what failed there (so does the next `add`, to stop early); the LayerWriter is
touched by the worker only until then.  The caller keeps the upper still until `finish`
returns.  `publish` takes the per-DiffID lock an unpack takes, so a pull unpacking the same
layer meanwhile and this commit serialise.
"""

from __future__ import annotations

import errno
import os
import queue
import tarfile
import threading

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
BATCH = 16  # members handed to the worker at once (a queue hand-off costs ~5 µs)
QUEUE = 4  # batches waiting for the worker: at most (QUEUE + 2) × BATCH open fds
_Member = tuple[tarfile.TarInfo, FileData | None]
_Job = list[_Member] | None  # None: no more members


class LayerBuild:
    """One new layer directory being built (see the module docstring).  Implements
    `tarapply.Contents` for its LayerWriter: a regular member's data is the file `add` got."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.tmp = store.layers / f".tmp-{os.urandom(8).hex()}"
        self._data: FileData | None = None  # the worker's current file
        self._published = False
        self._root_fd = -1
        self._writer: LayerWriter | None = None
        self._jobs: queue.Queue[_Job] = queue.Queue(QUEUE)
        self._batch: list[_Member] = []  # added, not yet handed to the worker
        self._failed: BaseException | None = None  # what stopped the worker
        self._cancelled = False
        self._worker: threading.Thread | None = None
        try:
            for d in (self.tmp, self.tmp / "diff"):
                os.mkdir(d, 0o755)
                os.chmod(d, 0o755)  # whatever the umask, as unpack makes it
            self._root_fd = os.open(self.tmp / "diff", _DIR)
            self._writer = LayerWriter(self._root_fd)
            self._worker = threading.Thread(target=self._work, name="layerbuild", daemon=True)
            self._worker.start()
        except BaseException:
            self.discard()
            raise

    def add(self, member: tarfile.TarInfo, data: FileData | None) -> None:
        """Queue one member as the changeset writes it (a `changeset.Mirror`)."""
        assert self._worker is not None, "finished or discarded"
        if self._failed is not None:
            raise self._failed
        if data is not None:
            data = FileData(os.dup(data.fd), data.size, data.regions, data.digest)  # ours to close
        self._batch.append((member, data))
        if len(self._batch) >= BATCH:
            self._hand_over()

    def _hand_over(self) -> None:
        batch, self._batch = self._batch, []
        try:
            self._jobs.put(batch)
        except BaseException:  # interrupted: the fds are not the worker's to close
            _close_fds(batch)
            raise

    def _work(self) -> None:
        writer = self._writer
        assert writer is not None
        while (batch := self._jobs.get()) is not None:
            for member, data in batch:
                try:
                    if self._failed is None and not self._cancelled:
                        self._data = data
                        writer.apply(member, self)
                except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
                    self._failed = exc
                finally:
                    self._data = None
                    if data is not None:
                        os.close(data.fd)

    def _stop(self) -> None:
        """Let the worker finish what is queued (skipping it when cancelled) and end."""
        if self._worker is not None:
            if self._batch:
                if self._cancelled:
                    _close_fds(self._batch)
                    self._batch = []
                else:
                    self._hand_over()
            self._jobs.put(None)
            self._worker.join()
            self._worker = None

    def write_to(self, member: tarfile.TarInfo, fd: int) -> bytes:
        """`tarapply.Contents`: the data of the file the worker is applying, and its digest."""
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
        """Every member applied, directory metadata, then the fingerprints; the whole dir
        synced (syncfs)."""
        self._stop()
        if self._failed is not None:
            raise self._failed
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
        self._cancelled = True
        self._stop()
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


def _close_fds(batch: list[_Member]) -> None:
    for _, data in batch:
        if data is not None:
            os.close(data.fd)


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
