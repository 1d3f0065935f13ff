"""gzblocks: gzip in blocks compressed by several threads must read back as the input with
every gzip reader, and be the same bytes whatever the number of threads and the cuts of the
writes (a commit's reproducibility)."""

from __future__ import annotations

import gzip
import io
import os
import random
import shutil
import subprocess
import threading
import zlib

import pytest
from isal import igzip

from imagestore.gzblocks import BLOCK, BlockGzip

SIZES = [0, 1, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK + 12_345]


def _data(size: int, seed: int = 1) -> bytes:
    """Half text that compresses (with repeats across block boundaries), half random."""
    rnd = random.Random(seed)
    parts, n = [], 0
    while n < size:
        part = os.urandom(rnd.randrange(1, 5000)) if rnd.random() < 0.5 else b"usr/lib/x " * 300
        parts.append(part)
        n += len(part)
    return b"".join(parts)[:size]


def _gz(data: bytes, threads: int, seed: int = 0, level: int = 6) -> bytes:
    out = io.BytesIO()
    gz = BlockGzip(out, level, threads)
    rnd, pos = random.Random(seed), 0
    while pos < len(data):
        n = rnd.choice([1, 512, 70_000, BLOCK + 3])
        gz.write(data[pos : pos + n])
        pos += n
    gz.close()
    return out.getvalue()


@pytest.mark.parametrize("size", SIZES)
def test_every_reader_reads_the_input(size, tmp_path):
    data = _data(size)
    out = _gz(data, threads=3)
    assert gzip.decompress(out) == data
    assert zlib.decompress(out, wbits=31) == data
    assert igzip.decompress(out) == data
    if shutil.which("gzip"):
        (tmp_path / "x.gz").write_bytes(out)
        r = subprocess.run(["gzip", "-dc", str(tmp_path / "x.gz")], capture_output=True)
        assert r.returncode == 0 and r.stdout == data


@pytest.mark.parametrize("size", SIZES)
def test_same_bytes_whatever_the_threads_and_cuts(size):
    data = _data(size)
    want = _gz(data, threads=1, seed=0)
    for threads, seed in ((2, 1), (5, 2), (8, 3)):
        assert _gz(data, threads, seed) == want


def test_header_and_size_as_one_stream_gives():
    data = _data(4 * BLOCK, seed=9)
    out = _gz(data, threads=2)
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", compresslevel=6, fileobj=buf, mtime=0) as f:
        f.write(data)
    one = buf.getvalue()  # the one stream commit wrote before
    assert out[:10] == one[:10]  # magic, deflate, no flags, mtime 0, XFL, OS: as GzipFile's
    assert out[-8:] == one[-8:]  # CRC-32 and size
    assert len(out) <= len(one) * 1.001 + 64  # the flush points cost next to nothing
    assert _gz(b"x", 1, level=1)[8:10] == b"\x04\xff" and _gz(b"x", 1, level=9)[8] == 2


def test_abort_ends_the_threads_and_writes_nothing_more():
    out = io.BytesIO()
    gz = BlockGzip(out, 6, 2)
    gz.write(_data(5 * BLOCK))
    gz.abort()
    size = len(out.getvalue())
    assert not [t for t in threading.enumerate() if t.name.startswith("gzblocks")]
    assert size < 5 * BLOCK // 2  # not the whole stream
