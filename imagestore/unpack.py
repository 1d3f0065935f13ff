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
import hashlib
import logging
import os
import secrets
import tarfile
import threading
import time
import zlib
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import zstandard

from unionfs.syscalls import syncfs

from . import fingerprints as fingerprints_mod
from . import fstree, tarsafe, tarstream
from .compression import GZIP, PLAIN, SNIFF_BYTES, ZSTD, sniff
from .digest import Digest
from .durable import fsync_dir, write_atomic
from .errors import CorruptLayer, DigestMismatch
from .store import Store, locked_file
from .tarapply import LayerWriter

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
PUBLISH_WAIT = 2.0  # seconds to wait for another unpacker's marker before calling it debris
MARKER = "complete"

_DECOMPRESSION_ERRORS = (EOFError, zlib.error, gzip.BadGzipFile, zstandard.ZstdError)
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
        compressed = _HashingReader(raw, blob.hasher())
        kind = _sniff(raw) or MEDIA_TYPES[media_type]
        source: _Reader = compressed
        if kind == GZIP:
            source = gzip.GzipFile(fileobj=compressed, mode="rb")  # type: ignore[call-overload]
        elif kind == ZSTD:
            source = _ZstdReader(compressed)
        h = hashlib.sha256()
        try:
            while chunk := source.read(1 << 20):
                h.update(chunk)
            compressed.drain()
        except _DECOMPRESSION_ERRORS as exc:
            raise CorruptLayer(f"layer {blob.short}: bad compression: {exc}") from None
    if Digest.from_hash(compressed.hash) != blob:
        raise DigestMismatch(f"blob {blob} in the store is corrupt (it hashes differently)")
    return Digest.from_hash(h)


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
    try:
        _publish(store, tmp, diff_id)
    except BaseException:
        remove_tree(tmp)
        raise
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
    if media_type not in MEDIA_TYPES:
        raise CorruptLayer(f"layer {blob}: unsupported layer media type {media_type!r}")
    with store.open_blob(blob) as raw:
        tmp = store.layers / f".tmp-{secrets.token_hex(8)}"
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


def _extract(
    raw: BinaryIO,
    blob: Digest,
    declared: str,
    diff: Path,
    expected: Digest | None,
    fingerprints: Path | None,
) -> Digest:
    compressed = _HashingReader(raw, blob.hasher())
    kind = _sniff(raw) or declared
    if kind != declared:
        log.debug("layer %s: announced as %s, but its bytes are %s", blob.short, declared, kind)
    source: _Reader = compressed
    if kind == GZIP:
        source = gzip.GzipFile(fileobj=compressed, mode="rb")  # type: ignore[call-overload]
    elif kind == ZSTD:
        source = _ZstdReader(compressed)
    stream = _TarStream(source, (expected.hasher() if expected else Digest.hasher_for()), kind)
    root_fd = os.open(diff, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    writer = LayerWriter(root_fd)
    try:
        end = _apply_all(stream, writer)
        stream.check_end(end)
        compressed.drain()
        if Digest.from_hash(compressed.hash) != blob:
            raise DigestMismatch(f"blob {blob} in the store is corrupt (it hashes differently)")
        diff_id = Digest.from_hash(stream.hash)
        if expected is not None and diff_id != expected:
            raise DigestMismatch(f"layer {blob}: DiffID is {diff_id}, expected {expected}")
        writer.finish()
        if fingerprints is not None:
            _write_fingerprints(fingerprints, root_fd, writer.digests)
    except CorruptLayer as exc:
        raise CorruptLayer(f"layer {blob.short}: {exc}") from exc
    finally:
        writer.close()
        os.close(root_fd)
    if writer.warning_count:
        more = writer.warning_count - len(writer.warnings)
        tail = f" (and {more} more)" if more else ""
        log.warning("layer %s: %s%s", blob.short, "; ".join(writer.warnings), tail)
    return diff_id


def _write_fingerprints(path: Path, root_fd: int, digests: dict[int, bytes]) -> None:
    """The finished tree's fingerprints: metadata from a walk of the tree just written (still
    in the page cache), content digests from the stream as it was written, by inode; only a
    file the writer made without data (a `.wh.` fallback marker) is hashed here."""

    def digest_of(dir_fd: int, name: bytes, st: os.stat_result) -> bytes:
        got = digests.get(st.st_ino)
        return got if got is not None else fingerprints_mod.hash_file(dir_fd, name)

    # not fsynced here: the whole temp dir is synced (syncfs) before it is published
    fingerprints_mod.write(path, fingerprints_mod.walk(root_fd, digest_of), sync=False)


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


def _sniff(raw: BinaryIO) -> str | None:
    head = raw.read(SNIFF_BYTES)
    raw.seek(0)
    return sniff(head)


class _HashingReader:
    """The blob's bytes as read, hashed on the way (the blob digest, re-checked)."""

    def __init__(self, raw: BinaryIO, hasher: Any) -> None:
        self._raw = raw
        self.hash = hasher

    def read(self, n: int = -1, /) -> bytes:
        data = self._raw.read(n)
        self.hash.update(data)
        return data

    def drain(self) -> None:
        while self.read(TAR_BUFSIZE):
            pass


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
    """The uncompressed tar stream: hashed (the DiffID) and counted as tarfile reads it; keeps
    the last bytes read so that what follows the last entry can be checked."""

    def __init__(self, src: _Reader, hasher: Any, kind: str) -> None:
        self._src = src
        self.hash = hasher
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
            self.hash.update(data)
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
def _publish(store: Store, tmp: Path, diff_id: Digest) -> None:
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
            stale = store.layers / f".tmp-stale-{secrets.token_hex(8)}"
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
