"""Layer tars for the unpack, tarapply and tarsafe tests: built with Python's tarfile, plus
the store fixture and what the tests look at in an unpacked layer."""

from __future__ import annotations

import io
import os
import stat
import tarfile
from pathlib import Path

import pytest
import zstandard

from imagestore.digest import Digest
from imagestore.store import Store
from imagestore.unpack import unpack_layer

OCI_TAR = "application/vnd.oci.image.layer.v1.tar"
OCI_GZIP = OCI_TAR + "+gzip"
OCI_ZSTD = OCI_TAR + "+zstd"
NONDIST = "application/vnd.oci.image.layer.nondistributable.v1.tar"
DOCKER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_TAR = "application/vnd.docker.image.rootfs.diff.tar"
OPAQUE = "trusted.overlay.opaque" if os.geteuid() == 0 else "user.overlay.opaque"
MTIME = 1_600_000_000

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chown, mknod, trusted.*)")


# ----- building layers -----------------------------------------------------------------------
def entry(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", **attrs) -> tuple:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    info.mode = attrs.pop("mode", 0o755 if kind == tarfile.DIRTYPE else 0o644)
    info.mtime = attrs.pop("mtime", MTIME)
    info.pax_headers = attrs.pop("pax", {})
    for key, value in attrs.pop("xattrs", {}).items():
        info.pax_headers[f"SCHILY.xattr.{key}"] = value
    for key, value in attrs.items():
        setattr(info, key, value)
    return info, data


def F(name: str, data: bytes = b"", **attrs) -> tuple:
    return entry(name, tarfile.REGTYPE, data, **attrs)


def D(name: str, **attrs) -> tuple:
    return entry(name, tarfile.DIRTYPE, **attrs)


def S(name: str, target: str, **attrs) -> tuple:
    return entry(name, tarfile.SYMTYPE, linkname=target, **attrs)


def H(name: str, target: str, **attrs) -> tuple:
    return entry(name, tarfile.LNKTYPE, linkname=target, **attrs)


def make_tar(*entries: tuple, fmt: int = tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for info, data in entries:
            tar.addfile(info, io.BytesIO(data) if data else None)
    return buf.getvalue()


def zstd_frames(data: bytes, frames: int = 1) -> bytes:
    cctx = zstandard.ZstdCompressor(write_checksum=True)
    step = max(1, len(data) // frames)
    return b"".join(cctx.compress(data[i : i + step]) for i in range(0, len(data), step))


def unpacked(store: Store, tar: bytes, media: str = OCI_TAR, blob: bytes | None = None) -> Path:
    digest = store.put_bytes(tar if blob is None else blob)
    diff_id = unpack_layer(store, digest, media)
    assert diff_id == Digest.of(tar)
    assert store.has_layer(diff_id)
    return store.layer_dir(diff_id)


def leftovers(store: Store) -> list[str]:
    """What is in store.layers besides complete layers."""
    return sorted(
        n for n in os.listdir(store.layers) if not (store.layers / n / "complete").exists()
    )


def is_whiteout(path: Path) -> bool:
    st = os.lstat(path)
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def is_opaque(path: Path) -> bool:
    try:
        return os.getxattr(path, OPAQUE, follow_symlinks=False) == b"y"
    except OSError:
        return False


# a few compressible and incompressible files (compression tests, broken compressions)
SAMPLE = make_tar(
    D("etc"), F("etc/os-release", b"ID=test\n" * 5000), F("bin/sh", os.urandom(70000))
)
