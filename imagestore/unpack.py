"""unpack: a layer blob in the store → an unpacked layer directory, in the kernel-overlayfs format.

    unpack_layer(store, blob, media_type, expected_diff_id) -> DiffID

Lifecycle (the store's rules, DESIGN.md):
  - Idempotent: with `expected_diff_id` and that layer already complete, it returns at once.
  - Atomic: the tar is applied under `layers/.tmp-<random>/diff`; the DiffID (sha256 of the
    uncompressed stream, every byte of it, tar padding and end blocks included) is computed
    while reading, and the blob's own digest is re-checked at the end of the stream.  Then
    the tree is synced (syncfs), the temp dir renamed to `layers/<diffid-hex>`, and the
    `complete` marker written last (fsynced, with its directory) — `Store.has_layer` looks
    only at it.  Beside `diff`, the temp dir gets the tree's `fingerprints` (module
    fingerprints; content digests taken from the stream as it is written), so they are
    published with the tree.  On any error nothing of the layer stays: the temp dir is removed.
  - Verifying: a DiffID other than `expected_diff_id` is a DigestMismatch (nothing kept); so is
    a blob whose bytes no longer hash to its digest.  A hostile or broken layer is a
    CorruptLayer naming the entry (`tarsafe`, `tarapply` hold the rules and the limits).
Compression comes from the media type and, when the two disagree, from the magic bytes (gzip
1f8b, zstd 28b52ffd, else a plain tar: `docker save` layers are often announced as gzip).
Everything streams: memory use does not grow with the layer.

`fetch_and_unpack` unpacks a blob while it downloads, in a forked process fed through a pipe
(modules follow and unpacker); `apply_blob` applies a stored blob in another format
(`commit --verify`: PLAIN).  Within one unpack, hashing and decompression run in a thread ahead
of the tar applier (`_Chain`), and small files are created by FILE_WORKERS threads
(`filepool`).

Concurrency: different layers unpack in parallel threads or processes without coordination
(each has its own temp dir).  Two unpacks of the same layer are serialised by a per-DiffID
lock (when the DiffID is known in advance): a thread lock within a process and a flock on
`ingest/layer-<hex>.lock` across processes, so the second finds the layer complete.  Without
a known DiffID the rename decides: the first complete layer wins and the other copy is
deleted.  An incomplete `layers/<hex>` (debris of a crash between rename and marker) is
replaced after a short wait.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import logging
import os
import queue
import tarfile
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import zstandard
from isal import igzip, isal_zlib

from unionfs.syscalls import syncfs

from . import fingerprints as fingerprints_mod
from . import fstree, tarapply, tarsafe, tarstream
from .compression import GZIP, PLAIN, SNIFF_BYTES, ZSTD, sniff
from .digest import Digest
from .durable import fsync_dir, write_atomic
from .errors import CorruptLayer, DigestMismatch
from .store import Store, locked_file
from .tarapply import LayerWriter
from .unpacker import Unpacker

log = logging.getLogger(__name__)

MEDIA_TYPES = {
    "application/vnd.oci.image.layer.v1.tar": PLAIN,
    "application/vnd.oci.image.layer.v1.tar+gzip": GZIP,
    "application/vnd.oci.image.layer.v1.tar+zstd": ZSTD,
    "application/vnd.oci.image.layer.nondistributable.v1.tar": PLAIN,
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip": GZIP,
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd": ZSTD,
    "application/vnd.docker.image.rootfs.diff.tar": PLAIN,
    "application/vnd.docker.image.rootfs.diff.tar.gzip": GZIP,
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip": GZIP,
    "": PLAIN,  # unknown (an archive without a manifest): the magic bytes decide
}
TAR_BUFSIZE = 1 << 14  # the tar reader's reads of the stream (tarstream reads as tarfile does)
ZSTD_INPUT_CHUNK = 2048  # bounds one decompress() call's output (a zstd bomb) to ~64 MiB
CHAIN_CHUNK = 1 << 18  # uncompressed bytes per hand-over between the chain's thread and the applier
READ_AHEAD = 8  # chunks the chain may run ahead of the applier (bounds memory: 2 MiB)
FILE_WORKERS = 4  # threads creating a layer's small files (filepool.FilePool)
PUBLISH_WAIT = 2.0  # seconds to wait for another unpacker's marker before calling it debris
MARKER = "complete"

# isal's stub calls its error class an instance of Exception
_ISAL_ERROR: type[Exception] = isal_zlib.error  # type: ignore[assignment]
_DECOMPRESSION_ERRORS = (
    EOFError,
    zlib.error,
    _ISAL_ERROR,
    gzip.BadGzipFile,
    zstandard.ZstdError,
)
_locks_guard = threading.Lock()
_locks: dict[str, threading.Lock] = {}


class _Reader(Protocol):
    def read(self, n: int = ..., /) -> bytes: ...


def unpack_layer(
    store: Store, blob: Digest, media_type: str, expected_diff_id: Digest | None = None
) -> Digest:
    """Unpack the layer blob `blob` into `store.layer_dir(diff_id)`; returns its DiffID."""
    if expected_diff_id is None:
        return _unpack(store, blob, media_type, None)
    with _layer_lock(store, expected_diff_id):
        if store.has_layer(expected_diff_id):
            return expected_diff_id
        return _unpack(store, blob, media_type, expected_diff_id)


def fetch_and_unpack(
    store: Store, blob: Digest, media_type: str, diff_id: Digest, fetch: Callable[[], object]
) -> None:
    """`fetch()` puts `blob` in the store (any Source's fetch_blob); meanwhile a process of
    its own (module unpacker) unpacks it from the bytes as they are written (module follow),
    so the layer is ready soon after the last byte.  Published only when the fetch succeeded
    and both the blob digest and `diff_id` check out.  When following breaks (a restarted
    download, the blob already there), the committed blob is unpacked the ordinary way; a
    failed fetch raises its own error, and nothing of the layer stays."""
    with _layer_lock(store, diff_id):
        if store.has_layer(diff_id):  # another process unpacked it meanwhile
            fetch()
            return
        with store.follow(blob) as follower:
            try:
                job = Unpacker.start(store, follower, blob, media_type, diff_id)
            except OSError as exc:  # no process or pipe to be had (EAGAIN, EMFILE): in turn
                log.debug("layer %s: unpacking after the download (%s)", blob.short, exc)
                follower.cancel()
                fetch()
                _unpack(store, blob, media_type, diff_id)
                return
            fetched = False
            failed: BaseException | None = None
            try:
                fetch()
                fetched = True
            finally:
                follower.writer_done()
                try:
                    tmp: Path | None = job.result()[0]
                except BaseException as exc:  # noqa: BLE001 - decided below
                    tmp, failed = None, exc
                if tmp is not None and not fetched:  # right bytes, but the blob did not land
                    remove_tree(tmp)
        if tmp is not None:
            publish_fresh(store, tmp, diff_id)
        elif job.broken is not None:
            log.debug("layer %s: unpacking the stored blob (%s)", blob.short, job.broken)
            _unpack(store, blob, media_type, diff_id)
        else:
            assert failed is not None
            raise failed


def verify_diff_id(store: Store, blob: Digest, media_type: str, diff_id: Digest) -> None:
    """Check that `blob` decompresses to `diff_id` (DigestMismatch if not), decompressing and
    hashing it only when no earlier check was recorded; records the result.  Pull and commit
    call it for every layer before they tag: a layer already in the store under that DiffID is
    no proof that this blob holds it."""
    got = store.verified_diff_id(blob)
    if got is None:
        got = _diff_id_of(store, blob, media_type)
        store.record_diff_id(blob, got)
    if got != diff_id:
        raise DigestMismatch(
            f"layer blob {blob} decompresses to DiffID {got}, but the image config says {diff_id}"
        )


def _diff_id_of(store: Store, blob: Digest, media_type: str) -> Digest:
    """sha256 of the blob's uncompressed stream (every byte), the blob's digest re-checked."""
    if media_type not in MEDIA_TYPES:
        raise CorruptLayer(f"layer {blob}: unsupported layer media type {media_type!r}")
    with store.open_blob(blob) as raw:
        chain = _Chain(raw, blob, MEDIA_TYPES[media_type], Digest.hasher_for())
        try:
            chain.drain()
        except _DECOMPRESSION_ERRORS as exc:
            raise CorruptLayer(f"layer {blob.short}: bad compression: {exc}") from None
        finally:
            chain.close()
    if Digest.from_hash(chain.blob_hash) != blob:
        raise DigestMismatch(f"blob {blob} in the store is corrupt (it hashes differently)")
    return Digest.from_hash(chain.hash)


def layer_lock(store: Store, diff_id: Digest) -> contextlib.AbstractContextManager[None]:
    """The per-DiffID lock an unpack of that layer holds (see the module docstring)."""
    return _layer_lock(store, diff_id)


@contextlib.contextmanager
def _layer_lock(store: Store, diff_id: Digest) -> Iterator[None]:
    key = f"{store.layers}/{diff_id.hex}"
    with _locks_guard:
        lock = _locks.setdefault(key, threading.Lock())
    with lock:
        fd = locked_file(store.ingest_dir / f"layer-{diff_id.hex}.lock")
        try:
            yield
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(store.ingest_dir / f"layer-{diff_id.hex}.lock")  # waiters start over
            os.close(fd)


def _unpack(store: Store, blob: Digest, media_type: str, expected: Digest | None) -> Digest:
    tmp, diff_id = unpack_fresh(store, blob, media_type, expected)
    publish_fresh(store, tmp, diff_id)
    return diff_id


def unpack_fresh(
    store: Store,
    blob: Digest,
    media_type: str,
    expected: Digest | None,
    fingerprints: bool = True,
) -> tuple[Path, Digest]:
    """Unpack `blob` into a new `layers/.tmp-<random>/diff` with its fingerprints beside it,
    synced but not published: the caller renames it into place or removes it (`fsck
    --repair` swaps it in).  Returns (the temp dir, the DiffID).  `fingerprints=False` is
    for measuring what they cost (benchmark S6)."""
    with store.open_blob(blob) as raw:
        return unpack_stream(store, raw, blob, media_type, expected, fingerprints)


def unpack_stream(
    store: Store,
    raw: _Reader,
    blob: Digest,
    media_type: str,
    expected: Digest | None,
    fingerprints: bool = True,
) -> tuple[Path, Digest]:
    """`unpack_fresh` of the blob whose bytes `raw` yields from the first (the blob file, or
    the pipe `unpacker` feeds from its download), to their end: hashed on the way and checked
    against `blob` at the end, as the DiffID is against `expected`."""
    if media_type not in MEDIA_TYPES:
        raise CorruptLayer(f"layer {blob}: unsupported layer media type {media_type!r}")
    tmp = store.layers / f".tmp-{os.urandom(8).hex()}"
    try:
        os.mkdir(tmp, 0o755)
        os.chmod(tmp, 0o755)
        os.mkdir(tmp / "diff", 0o755)
        os.chmod(tmp / "diff", 0o755)
        fp = tmp / fingerprints_mod.FILE_NAME if fingerprints else None
        diff_id = _extract(raw, blob, MEDIA_TYPES[media_type], tmp / "diff", expected, fp)
        store.record_diff_id(blob, diff_id)  # hashed from the blob just now
        syncfs(os.fsencode(tmp))  # the tree is on disk before it is published
    except BaseException:
        remove_tree(tmp)
        raise
    return tmp, diff_id


def publish_fresh(store: Store, tmp: Path, diff_id: Digest) -> None:
    """Publish what `unpack_stream` made (another complete copy already there wins); on
    failure nothing of it stays."""
    try:
        publish(store, tmp, diff_id)
    except BaseException:
        remove_tree(tmp)
        raise


def apply_blob(store: Store, blob: Digest, root: Path, fmt: str) -> None:
    """Apply the stored layer `blob` onto the directory `root` in tarapply's format `fmt`
    (`commit --verify`: PLAIN, layer after layer), with the checks of an unpack."""
    with store.open_blob(blob) as raw:
        _extract(raw, blob, PLAIN, root, None, None, fmt)


def _extract(
    raw: _Reader,
    blob: Digest,
    declared: str,
    diff: Path,
    expected: Digest | None,
    fingerprints: Path | None,
    fmt: str = tarapply.OVERLAY,
) -> Digest:
    chain = _Chain(raw, blob, declared, expected.hasher() if expected else Digest.hasher_for())
    try:
        return _apply_chain(chain, blob, diff, expected, fingerprints, fmt)
    finally:
        chain.close()


def _apply_chain(
    chain: _Chain,
    blob: Digest,
    diff: Path,
    expected: Digest | None,
    fingerprints: Path | None,
    fmt: str,
) -> Digest:
    stream = _TarStream(chain, chain.kind)
    root_fd = os.open(diff, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    writer = LayerWriter(root_fd, fmt, workers=FILE_WORKERS)
    try:
        end = _apply_all(stream, writer)
        writer.wait()  # an entry's failure first, as when every file was made in order
        stream.check_end(end)
        chain.drain()
        if Digest.from_hash(chain.blob_hash) != blob:
            raise DigestMismatch(f"blob {blob} in the store is corrupt (it hashes differently)")
        diff_id = Digest.from_hash(chain.hash)
        if expected is not None and diff_id != expected:
            raise DigestMismatch(f"layer {blob}: DiffID is {diff_id}, expected {expected}")
        writer.finish()
        if fingerprints is not None:
            write_fingerprints(fingerprints, root_fd, writer.digests)
    except CorruptLayer as exc:
        raise CorruptLayer(f"layer {blob.short}: {exc}") from exc
    finally:
        writer.close()
        os.close(root_fd)
    writer.log_warnings(f"layer {blob.short}")
    return diff_id


def write_fingerprints(
    path: Path, root_fd: int, digests: dict[int, bytes], sync: bool = False
) -> None:
    """The finished tree's fingerprints: metadata from a walk of the tree just written (still
    in the page cache), content digests from the stream as it was written, by inode; only a
    file the writer made without data (a `.wh.` fallback marker) is hashed here.  Not synced
    unless `sync`: the caller syncs the whole temp dir (syncfs) after it, before publishing."""

    def digest_of(dir_fd: int, name: bytes, st: os.stat_result) -> bytes:
        got = digests.get(st.st_ino)
        return got if got is not None else fingerprints_mod.hash_file(dir_fd, name)

    fingerprints_mod.write(path, fingerprints_mod.walk(root_fd, digest_of), sync=sync)


def _apply_all(stream: _TarStream, writer: LayerWriter) -> int:
    """Apply every member; returns the stream offset where the archive's entries end."""
    reader = tarstream.TarReader(stream, TAR_BUFSIZE)
    count = 0
    while (member := reader.next()) is not None:
        count += 1
        if count > tarsafe.MAX_ENTRIES:
            raise CorruptLayer(f"more than {tarsafe.MAX_ENTRIES} entries")
        writer.apply(member, reader)
    assert reader.end is not None
    return reader.end


class _HashingReader:
    """The blob's bytes as read, hashed on the way (the blob digest, re-checked); the first
    bytes, read to sniff the compression, are given back first."""

    def __init__(self, raw: _Reader, hasher: Any) -> None:
        self._raw = raw
        self.hash = hasher
        self.head = b""
        while len(self.head) < SNIFF_BYTES and (more := raw.read(SNIFF_BYTES - len(self.head))):
            self.head += more
        self._pending = self.head

    def read(self, n: int = -1, /) -> bytes:
        if self._pending:
            data = self._pending if n < 0 else self._pending[:n]
            self._pending = self._pending[len(data) :]
        else:
            data = self._raw.read(n)
        self.hash.update(data)
        return data

    def readinto(self, buf: Any) -> int:  # isal's gzip reader asks for this
        data = self.read(len(buf))
        buf[: len(data)] = data
        return len(data)

    def drain(self) -> None:
        while self.read(TAR_BUFSIZE):
            pass


class _Chain:
    """A layer blob's uncompressed stream: the blob's bytes hashed (its digest), the
    compression told by its magic bytes (or the media type), the output hashed (the DiffID).
    All of it runs ahead in a thread of its own (hashing and decompressing release the GIL,
    so it overlaps the tar applier on another CPU), at most READ_AHEAD chunks ahead.  Errors
    of that thread are raised by `read`; `close` stops it."""

    def __init__(self, raw: _Reader, blob: Digest, declared: str, hasher: Any) -> None:
        self._compressed = _HashingReader(raw, blob.hasher())
        self.kind = sniff(self._compressed.head) or declared
        if self.kind != declared:
            log.debug(
                "layer %s: announced as %s, but its bytes are %s", blob.short, declared, self.kind
            )
        source: _Reader = self._compressed
        if self.kind == GZIP:
            source = igzip.GzipFile(fileobj=self._compressed, mode="rb")
        elif self.kind == ZSTD:
            source = _ZstdReader(self._compressed)
        self._source = source
        self.hash = hasher
        self._queue: queue.Queue[bytes | BaseException | None] = queue.Queue(READ_AHEAD)
        self._stop = threading.Event()
        self._buf = memoryview(b"")
        self._eof = False
        self._thread = threading.Thread(target=self._run, name=f"unpack-{blob.short}", daemon=True)
        self._thread.start()

    @property
    def blob_hash(self) -> Any:
        return self._compressed.hash

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                data = self._source.read(CHAIN_CHUNK)
                if not data:
                    break
                self.hash.update(data)
                self._put(data)
            self._put(None)
        except BaseException as exc:  # handed to the reader, which raises it
            self._put(exc)

    def _put(self, item: bytes | BaseException | None) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def read(self, n: int = -1, /) -> bytes:
        while not self._buf and not self._eof:
            item = self._queue.get()
            if item is None:
                self._eof = True
            elif isinstance(item, BaseException):
                self._eof = True
                raise item
            else:
                self._buf = memoryview(item)
        if n < 0 or n >= len(self._buf):
            data, self._buf = bytes(self._buf), memoryview(b"")
        else:
            data, self._buf = bytes(self._buf[:n]), self._buf[n:]
        return data

    def drain(self) -> None:
        """Read the uncompressed stream to its end, then the blob (bytes after the last
        compressed frame count in the blob's digest)."""
        while self.read(CHAIN_CHUNK):
            pass
        self._compressed.drain()

    def close(self) -> None:
        """Stop the thread (its reads of `raw` end: a file, or a pipe that ends)."""
        self._stop.set()
        self._thread.join()


class _ZstdReader:
    """A zstd stream of any number of frames, decompressed in bounded pieces; unlike
    zstandard's stream_reader it refuses a stream that ends inside a frame."""

    def __init__(self, src: _HashingReader) -> None:
        self._src = src
        self._dctx = zstandard.ZstdDecompressor()
        self._obj: Any = None  # the frame being decompressed
        self._pending = b""  # input after the end of the last frame
        self._buf = b""
        self._pos = 0
        self._eof = False

    def read(self, n: int = -1, /) -> bytes:
        while self._pos >= len(self._buf) and not self._eof:
            self._fill()
        if n < 0:
            n = len(self._buf) - self._pos
        chunk = self._buf[self._pos : self._pos + n]
        self._pos += len(chunk)
        return chunk

    def _fill(self) -> None:
        data, self._pending = self._pending or self._src.read(ZSTD_INPUT_CHUNK), b""
        self._buf, self._pos = b"", 0
        if not data:
            if self._obj is not None:
                raise CorruptLayer("truncated zstd stream")
            self._eof = True
            return
        if self._obj is None:
            self._obj = self._dctx.decompressobj()
        self._buf = self._obj.decompress(data)
        if self._obj.eof:
            self._pending = self._obj.unused_data
            self._obj = None


class _TarStream:
    """The uncompressed tar stream, counted as tarfile reads it (the chain below hashes it);
    keeps the last bytes read so that what follows the last entry can be checked."""

    def __init__(self, src: _Reader, kind: str) -> None:
        self._src = src
        self.kind = kind
        self.size = 0
        self._tail: deque[tuple[int, bytes]] = deque()
        self._tail_bytes = 0

    def read(self, n: int = -1, /) -> bytes:
        try:
            data = self._src.read(n if n >= 0 else TAR_BUFSIZE)
        except _DECOMPRESSION_ERRORS as exc:
            raise CorruptLayer(f"corrupt or truncated {self.kind} stream: {exc}") from exc
        if data:
            self._tail.append((self.size, data))
            self._tail_bytes += len(data)
            while self._tail_bytes - len(self._tail[0][1]) >= TAR_BUFSIZE + 2 * tarfile.BLOCKSIZE:
                self._tail_bytes -= len(self._tail.popleft()[1])
            self.size += len(data)
        return data

    def check_end(self, end: int) -> None:
        """After the last entry: up to two blocks of zeros (a non-zero block there means a
        header tarfile gave up on); then anything, read to the end so that the DiffID covers
        the whole stream, as other tools compute it."""
        limit = end + 2 * tarfile.BLOCKSIZE
        while self.size < limit and self.read(limit - self.size):
            pass
        if self._tail and self._tail[0][0] > end:
            raise AssertionError("tar stream tail lost")  # cannot happen: see read()
        for start, chunk in self._tail:
            piece = chunk[max(end - start, 0) : max(limit - start, 0)]
            if piece.count(0) != len(piece):
                raise CorruptLayer(f"invalid tar header at offset {end}")
        while self.read(TAR_BUFSIZE):
            pass


# ----- publishing and cleaning up ----------------------------------------------------------
def publish(store: Store, tmp: Path, diff_id: Digest) -> None:
    """Rename the finished temp dir to layers/<hex>, then write the marker; another complete
    copy already there wins and ours is discarded."""
    final = store.layers / diff_id.hex
    for _ in range(3):
        try:
            os.rename(tmp, final)
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            if _wait_complete(store, diff_id):
                remove_tree(tmp)
                return
            stale = store.layers / f".tmp-stale-{os.urandom(8).hex()}"
            with contextlib.suppress(FileNotFoundError):
                os.rename(final, stale)  # debris of a crashed unpack
            remove_tree(stale)
            continue
        try:
            fsync_dir(store.layers)
            write_atomic(final / MARKER, f"{diff_id}\n".encode())
        except BaseException:
            remove_tree(final)
            raise
        return
    raise CorruptLayer(f"layer {diff_id}: could not publish {final} (keeps reappearing)")


def _wait_complete(store: Store, diff_id: Digest) -> bool:
    deadline = time.monotonic() + PUBLISH_WAIT
    while not store.has_layer(diff_id):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def remove_tree(path: Path) -> None:
    """Remove a tree of ours, of any depth, even one whose directories a non-root layer made
    read-only (unpack debris, a `commit --verify` scratch dir); logs what it cannot remove."""
    fstree.remove_tree(path, quietly=True)
