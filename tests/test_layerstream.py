"""layerstream: the commit's tar compressed in a thread of its own must give the very bytes
a synchronous compressor gives, hash both digests right, and hand failures back."""

from __future__ import annotations

import errno
import gzip
import hashlib
import io
import os
import random
import threading

import pytest
import zstandard

from imagestore.digest import Digest
from imagestore.gzblocks import BlockGzip
from imagestore.layerstream import BATCH, GZIP_LEVEL, ZSTD_LEVEL, LayerStream


def _synchronous(data: bytes, compress: str) -> bytes:
    out = io.BytesIO()
    if compress == "gzip":
        gz = BlockGzip(out, GZIP_LEVEL, threads=1)
        gz.write(data)
        gz.close()
    elif compress == "zstd":
        with zstandard.ZstdCompressor(level=ZSTD_LEVEL).stream_writer(out, closefd=False) as f:
            f.write(data)
    else:
        out.write(data)
    return out.getvalue()


@pytest.mark.parametrize("compress", ["gzip", "zstd", "none"])
def test_same_bytes_as_a_synchronous_compressor(compress):
    rnd = random.Random(7)
    # compressible and incompressible parts, over several batches
    data = b"".join(
        os.urandom(rnd.randrange(1, 9000)) if i % 3 else b"tar header " * rnd.randrange(1, 500)
        for i in range(900)
    )
    assert len(data) > 3 * BATCH
    out = bytearray()
    seen = []
    stream = LayerStream(out.extend, compress, progress=seen.append)
    pos = 0
    while pos < len(data):  # pieces of every size, as tarfile writes them
        n = rnd.choice([512, 1024, 16384, rnd.randrange(1, 70000)])
        stream.write(data[pos : pos + n])
        pos += n
    diff_id, blob = stream.close()
    assert bytes(out) == _synchronous(data, compress)
    if compress == "gzip":
        assert gzip.decompress(out) == data
    assert diff_id == Digest("sha256", hashlib.sha256(data).hexdigest())
    assert blob == Digest("sha256", hashlib.sha256(out).hexdigest())
    assert sum(seen) == len(data)
    assert not [t for t in threading.enumerate() if t.name == "layerstream"]


def test_a_failing_write_is_raised_and_the_thread_ends():
    def full(chunk: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    stream = LayerStream(full, "none")
    with pytest.raises(OSError) as exc:
        for _ in range(20):
            stream.write(os.urandom(BATCH))
        stream.close()
    assert exc.value.errno == errno.ENOSPC
    stream.abort()
    assert not [t for t in threading.enumerate() if t.name == "layerstream"]


def test_abort_stops_writing():
    out = bytearray()
    stream = LayerStream(out.extend, "gzip")
    stream.write(os.urandom(3 * BATCH))
    stream.abort()
    size = len(out)
    stream.abort()  # idempotent
    assert len(out) == size
    assert not [t for t in threading.enumerate() if t.name == "layerstream"]
