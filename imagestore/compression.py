"""Layer compression, told by magic bytes: the one place that knows them.

Media types can lie (a Docker `tar.gzip` that is plain, an OCI `tar` that is zstd), so every
reader of a layer blob (unpack, commit's self-check, push's DiffID check) sniffs the first
bytes instead.  Pure functions; thread-safe.
"""

from __future__ import annotations

GZIP, ZSTD, PLAIN = "gzip", "zstd", "tar"

GZIP_MAGIC = b"\x1f\x8b"  # RFC 1952 ID1 ID2
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"  # RFC 8878 frame magic, little-endian 0xFD2FB528
SNIFF_BYTES = 4  # enough for every magic above


def sniff(head: bytes) -> str | None:
    """GZIP, ZSTD or PLAIN for a blob starting with `head` (at least SNIFF_BYTES of it when
    the blob is that long); None for an empty blob."""
    if head.startswith(GZIP_MAGIC):
        return GZIP
    if head.startswith(ZSTD_MAGIC):
        return ZSTD
    return PLAIN if head else None
