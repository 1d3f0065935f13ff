"""layerbuild: commit's one pass — the new layer's unpacked directory, built from the members
of its tar while `changeset.write_changeset` writes them.

    build = LayerBuild(store)                  layers/.tmp-<random>/diff, empty; a child forked
    write_changeset(..., mirror=build.add)     each member sent to it as soon as it is written
    build.end()                                no more: it finishes while the caller ends the blob
    build.finish()                             waits: fingerprints beside diff; all synced
    build.publish(diff_id) -> bool             renamed to layers/<hex>, `complete` last
    build.discard()                            nothing of it stays (idempotent)

The tree is what `unpack` makes of the blob: every member goes through the one applier
(`tarapply.LayerWriter`, overlay format), in the tar's order, as a reader of the tar sees it.
Only a file's data comes another way: copied from the upper's file (`os.copy_file_range`, a
reflink where the filesystem does it and an in-kernel copy elsewhere; read/write where it is
refused, across filesystems), the holes of a sparse member kept; and its fingerprint
(xxh3-128) is the one taken from the bytes that went into the tar (`changeset.FileData`).
So the blob is never read back, and no file is read twice for hashing.

Why a child process (`forked`): walking the upper and writing the tar is about half of a
commit's Python work, applying the members (creates, copies, owners, modes, times) the other
half, and both hold the GIL.  A worker thread in the same process lost once creates were fast
(the store's layers/ is FS_TOPDIR_FL): the two threads took turns on the GIL thousands of
times a commit (`strace -c`: 17,762 futex calls for 1,000 files), 386/398 ms against 326/338
ms without it (S2 by hand).  The child gets the members in batches through a pipe (`marshal`:
each member's header fields, and for a regular file its path, size, data regions and digest),
opens each file by its path and applies them on the other CPU, so the two halves overlap.
Where fork is refused, the members are applied in the caller's process, in `add`.  Commit
makes its LayerBuild before the tar's threads (`layerstream`, `gzblocks`) start, so the fork
copies a process of one thread: no lock is held by a thread the child does not have.

Lifecycle (the store's rules, as `unpack` keeps them): the temp dir is published only once it
is complete and synced, and `complete` is written last (`unpack.publish`); when the store has
the layer already (the same DiffID), this copy is dropped.  On any failure the caller calls
`discard`, which kills the child first.  A child whose parent is gone sees its pipe end without
the end mark and removes the temp dir itself; a `.tmp-*` dir a crash leaves otherwise is
debris, as an interrupted unpack's is.  A failure in the child (a member it cannot apply, a
full disk) is raised in the caller by the next `add` that finds the pipe closed, or by
`finish`.
Concurrency: `add`, `end`, `finish`, `publish` and `discard` are called by one thread.  The
caller keeps the upper still until `finish` returns (the child reads its files until then).
`publish` takes the per-DiffID lock an unpack takes, so a pull unpacking the same layer
meanwhile and this commit serialise.
"""

from __future__ import annotations

import contextlib
import errno
import marshal
import operator
import os
import signal
import struct
import tarfile
import threading
from pathlib import Path
from typing import Any

from unionfs.fsat import PLAIN
from unionfs.syscalls import syncfs

from . import fingerprints, forked, unpack
from .changeset import FileData
from .digest import Digest
from .errors import StoreError
from .store import Store
from .tarapply import LayerWriter

COPY_CHUNK = 1 << 20  # read/write fallback
BATCH = 64  # members a message to the child carries
PIPE_SIZE = 1 << 20  # the pipe's buffer: the caller seldom waits for the child
# copy_file_range refused: across filesystems (EXDEV), not offered by this one (the rest)
_NO_COPY_RANGE = frozenset({errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL})
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_LENGTH = struct.Struct("<I")  # a message's length; 0 is the end mark
# what the applier reads of a member (a reader of the tar sees these)
_FIELDS = ("name", "mode", "uid", "gid", "size", "mtime", "type", "linkname", "uname",
           "gname", "devmajor", "devminor", "pax_headers", "sparse")  # fmt: skip
_fields = operator.attrgetter(*_FIELDS)


class LayerBuild:
    """One new layer directory being built (see the module docstring)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.tmp = store.layers / f".tmp-{os.urandom(8).hex()}"
        self._published = False
        self._pid = 0  # the child, until it is waited for
        self._feed = -1  # the pipe to it, until the end mark
        self._results = -1
        self._batch: list[tuple[Any, ...]] = []
        self._local: _Applier | None = None  # where fork was refused
        try:
            for d in (self.tmp, self.tmp / "diff"):
                os.mkdir(d, 0o755)
                os.chmod(d, 0o755)  # whatever the umask, as unpack makes it
            self._start()
        except BaseException:
            self.discard()
            raise

    def _start(self) -> None:
        try:
            self._pid, self._feed, self._results = forked.spawn(
                lambda fd: _serve(self.tmp, fd), PIPE_SIZE
            )
        except OSError:  # no pipe or no fork: the members are applied here
            self._local = _Applier(self.tmp)

    def add(self, member: tarfile.TarInfo, data: FileData | None) -> None:
        """Take one member as the changeset writes it (a `changeset.Mirror`)."""
        if self._local is not None:
            return self._local.add(member, data)
        assert self._feed >= 0, "ended, finished or discarded"
        got = None if data is None else (data.path, data.size, data.regions, data.digest)
        self._batch.append((_fields(member), got))
        if len(self._batch) >= BATCH:
            self._send(self._take_batch())

    def end(self) -> None:
        """No more members: the child finishes the directory while the caller goes on."""
        if self._feed < 0:
            return
        self._send((self._take_batch() if self._batch else b"") + _LENGTH.pack(0))
        os.close(self._feed)
        self._feed = -1

    def _take_batch(self) -> bytes:
        """The members gathered so far, as one message (length first)."""
        message = marshal.dumps(self._batch)
        self._batch = []
        return _LENGTH.pack(len(message)) + message

    def _send(self, data: bytes) -> None:
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self._feed, view) :]
            return
        except BrokenPipeError:  # the child stopped reading: it failed, and says why
            os.close(self._feed)
            self._feed = -1
        self._wait()
        raise StoreError("the layer's builder stopped early")

    def finish(self) -> None:
        """Wait until the directory is complete: directory metadata, fingerprints, the whole
        dir synced (syncfs).  Raises what the child raised."""
        if self._local is not None:
            local, self._local = self._local, None
            return local.finish()
        self.end()
        self._wait()

    def _wait(self) -> None:
        pid, results = self._pid, self._results
        assert pid, "finished or discarded"
        self._pid, self._results = 0, -1
        forked.collect(results, pid, _lost)

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
        """Stop the child, remove the temp dir (unless it was published); safe to call at any
        point."""
        if self._pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._pid, signal.SIGKILL)
            forked.reap(self._pid)
            self._pid = 0
        for fd in (self._feed, self._results):
            if fd >= 0:
                os.close(fd)
        self._feed = self._results = -1
        if self._local is not None:
            self._local.close()
            self._local = None
        if not self._published:
            unpack.remove_tree(self.tmp)


def _lost(status: int) -> Exception:
    return StoreError(f"the layer's builder ended without a result (wait status {status:#x})")


def _serve(tmp: Path, feed: int) -> tuple[()]:
    """The child's work: apply the members the pipe brings, finish at the end mark.  A pipe
    that ends without it means the committing process is gone: the temp dir goes too."""
    applier = _Applier(tmp)
    try:
        while batch := _message(feed):
            for fields, data in batch:
                member = tarfile.TarInfo()
                for name, value in zip(_FIELDS, fields, strict=True):
                    setattr(member, name, value)
                applier.add_opened(member, data)
        if batch is None:
            applier.close()
            unpack.remove_tree(tmp)
            raise StoreError("the committing process stopped before the layer's last member")
        applier.finish()
    finally:
        applier.close()
    return ()


def _message(fd: int) -> list[Any] | None:
    """The next batch; [] at the end mark, None where the pipe ends without one."""
    head = _read_exactly(fd, _LENGTH.size)
    if head is None:
        return None
    (length,) = _LENGTH.unpack(head)
    if length == 0:
        return []
    body = _read_exactly(fd, length)
    if body is None:
        return None
    batch: list[Any] = marshal.loads(body)
    return batch


def _read_exactly(fd: int, n: int) -> bytes | None:
    data = b""
    while len(data) < n:
        chunk = os.read(fd, n - len(data))
        if not chunk:
            return None
        data += chunk
    return data


class _Applier:
    """The members into a LayerWriter over `tmp/diff`, in whichever process runs it.
    Implements `tarapply.Contents`: a regular member's data is the file `add` got."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self._data: FileData | None = None  # the file of the member being applied
        self._root_fd = os.open(tmp / "diff", _DIR)
        try:
            self._writer: LayerWriter | None = LayerWriter(self._root_fd)
        except BaseException:
            os.close(self._root_fd)
            raise

    def add(self, member: tarfile.TarInfo, data: FileData | None) -> None:
        writer = self._writer
        assert writer is not None, "finished or closed"
        self._data = data
        try:
            writer.apply(member, self)
        finally:
            self._data = None

    def add_opened(self, member: tarfile.TarInfo, data: tuple[Any, ...] | None) -> None:
        """`add` in the child, which opens a regular member's file by the path it was sent."""
        if data is None:
            return self.add(member, None)
        path, size, regions, digest = data
        fd = PLAIN.open(path, os.O_RDONLY)
        try:
            self.add(member, FileData(fd, size, regions, digest, path))
        finally:
            os.close(fd)

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
        """Directory metadata (once every member is in), then the whole dir synced (syncfs)
        while the fingerprints are taken: the walk reads what is in memory, and syncfs waits
        for the disk without the GIL.  The fingerprints file, written meanwhile, is synced by
        itself (syncfs may be past it).  In the S2 workload the two took 13-15 and 16-22 ms
        one after the other."""
        writer = self._writer
        assert writer is not None, "finished or closed"
        writer.finish()
        synced = _Syncing(self.tmp)
        try:
            path = self.tmp / fingerprints.FILE_NAME
            unpack.write_fingerprints(path, self._root_fd, writer.digests, sync=True)
        finally:
            synced.wait()  # the tree is on disk before it is published
        self.close()
        writer.log_warnings("new layer")

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._root_fd >= 0:
            os.close(self._root_fd)
            self._root_fd = -1


class _Syncing:
    """syncfs of the filesystem holding `path`, in a thread of its own; `wait` joins it and
    raises what it raised."""

    def __init__(self, path: Path) -> None:
        self._failed: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(os.fsencode(path),))
        self._thread.start()

    def _run(self, path: bytes) -> None:
        try:
            syncfs(path)
        except BaseException as exc:  # noqa: BLE001 - handed to `wait`
            self._failed = exc

    def wait(self) -> None:
        self._thread.join()
        if self._failed is not None:
            raise self._failed


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
