"""compression.sniff: the magic bytes every layer reader goes by."""

import gzip
import io

import zstandard

from imagestore import compression


def test_sniff_tells_gzip_zstd_plain_and_empty():
    gz = gzip.compress(b"x" * 100)
    zs = zstandard.ZstdCompressor().compress(b"x" * 100)
    n = compression.SNIFF_BYTES
    assert compression.sniff(gz[:n]) == compression.GZIP
    assert compression.sniff(zs[:n]) == compression.ZSTD
    assert compression.sniff(b"ustar"[:n]) == compression.PLAIN
    assert compression.sniff(b"\x1f") == compression.PLAIN  # one byte of gzip's magic is not gzip
    assert compression.sniff(io.BytesIO().read(n)) is None
