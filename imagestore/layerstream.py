"""layerstream: a commit's uncompressed layer tar → hashed (the DiffID) and compressed into a
blob write, in a thread of its own.

    stream = LayerStream(write, compress, progress)   a write-only file for tarfile
    ...                                               stream.write(data) as the tar is made
    stream.close() -> (DiffID, blob digest)           the rest compressed, the thread joined
    stream.abort()                                    stop without finishing (idempotent)

The tar's bytes are gathered into BATCH-sized pieces and handed to a worker thread that
hashes them (sha256: the DiffID), compresses them (gzip without timestamp or name, in blocks
by several threads: `gzblocks`; zstd; or none) and passes the compressed bytes, hashed
again (the blob digest, known before the ingest commits: was the blob in the store
already?), to `write` (an `Ingest.write`).  zlib,
zstd and sha256 release the GIL on such pieces, so compressing runs beside the Python work of
making the tar and the layer directory instead of after each piece of it.  The output is the
same bytes a synchronous compressor fed the same stream makes (neither deflate's nor
gzblocks' output depends on how its input is cut), so reproducibility holds.
Concurrency: `write`, `close` and `abort` are called from one thread; the worker owns the
compressor and calls `write` (the caller must not use the ingest until `close` or `abort`
returned).  At most QUEUE pieces wait (memory stays bounded); a failure in the worker is
raised by the next `write` or by `close`.
"""

from __future__ import annotations

import hashlib
import queue
import threading
from collections.abc import Callable
from typing import Any

import zstandard

from .digest import Digest
from .gzblocks import BlockGzip

GZIP_LEVEL = 6
ZSTD_LEVEL = 3
BATCH = 1 << 20  # bytes of tar handed to the worker at once
QUEUE = 4  # pieces waiting for the worker


class _Sink:
    """The compressor's output file: hashed (the blob digest) and passed to `write`."""

    def __init__(self, write: Callable[[bytes], Any]) -> None:
        self._write = write
        self.hash = hashlib.sha256()

    def write(self, data: bytes) -> int:
        chunk = bytes(data)
        self.hash.update(chunk)
        self._write(chunk)
        return len(data)

    def flush(self) -> None:
        pass


class LayerStream:
    """See the module docstring."""

    def __init__(
        self,
        write: Callable[[bytes], Any],
        compress: str,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        self._sink = _Sink(write)
        self._comp: Any = None
        if compress == "gzip":
            self._comp = BlockGzip(self._sink, GZIP_LEVEL)
        elif compress == "zstd":
            cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
            self._comp = cctx.stream_writer(self._sink, closefd=False)  # type: ignore[arg-type]
        self._diff = hashlib.sha256()
        self._progress = progress
        self._buf = bytearray()
        self._jobs: queue.Queue[bytes | None] = queue.Queue(QUEUE)
        self._failed: BaseException | None = None
        self._cancelled = False
        self._worker: threading.Thread | None = threading.Thread(
            target=self._work, name="layerstream", daemon=True
        )
        self._worker.start()

    def write(self, data: bytes) -> int:
        self._buf += data
        if len(self._buf) >= BATCH:
            self._send()
        if self._progress is not None:
            self._progress(len(data))
        return len(data)

    def close(self) -> tuple[Digest, Digest]:
        """Compress what is left and end the stream; returns (DiffID, blob digest)."""
        if self._buf:
            self._send()
        self._stop()
        if self._failed is not None:
            raise self._failed
        return Digest.from_hash(self._diff), Digest.from_hash(self._sink.hash)

    def abort(self) -> None:
        """Stop the worker without finishing the stream; nothing more is written."""
        self._cancelled = True
        self._stop()

    def _send(self) -> None:
        if self._failed is not None:
            raise self._failed
        assert self._worker is not None, "closed"
        self._jobs.put(bytes(self._buf))
        self._buf.clear()

    def _stop(self) -> None:
        if self._worker is not None:
            self._jobs.put(None)
            self._worker.join()
            self._worker = None

    def _work(self) -> None:
        while (chunk := self._jobs.get()) is not None:
            if self._failed is not None or self._cancelled:
                continue  # drain: the writer learns of it, or is gone
            try:
                self._diff.update(chunk)
                (self._comp if self._comp is not None else self._sink).write(chunk)
            except BaseException as exc:  # noqa: BLE001 - handed to the writer's thread
                self._failed = exc
        if self._comp is None:
            return
        if self._failed is None and not self._cancelled:
            try:
                self._comp.close()  # the compressed stream's end (gzip trailer, zstd frame)
            except BaseException as exc:  # noqa: BLE001 - as above
                self._failed = exc
        elif isinstance(self._comp, BlockGzip):
            self._comp.abort()  # its threads end; nothing more is written
