"""unpack_layer: layer blobs → overlay-format layer directories.

Compression and media types; DiffID and verification; lifecycle (idempotence, races,
debris); non-root behaviour (a forked child as nobody); and a kernel overlayfs mount of a
small unpacked image.  Entry kinds and the apply rules are in test_tarapply.py, hostile
layers in test_tarsafe.py; the layer builders in tests/layertar.py.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import json
import os
import shutil
import stat
import tarfile
import tempfile
import threading
from pathlib import Path

import pytest

from imagestore import unpack
from imagestore.digest import Digest
from imagestore.errors import BlobNotFound, CorruptLayer, DigestMismatch
from imagestore.store import Store
from imagestore.unpack import unpack_layer
from tests.layertar import (
    DOCKER_GZIP,
    DOCKER_TAR,
    NONDIST,
    OCI_GZIP,
    OCI_TAR,
    OCI_ZSTD,
    SAMPLE,
    D,
    F,
    entry,
    leftovers,
    make_tar,
    needs_root,
    unpacked,
    zstd_frames,
)
from tests.mounts import KernelOverlay, require_root

# ----- compression and media types -----------------------------------------------------------


@pytest.mark.parametrize(
    ("media", "encode"),
    [
        (OCI_TAR, lambda d: d),
        (OCI_GZIP, gzip.compress),
        (OCI_ZSTD, zstd_frames),
        (OCI_ZSTD, lambda d: zstd_frames(d, frames=3)),
        (OCI_GZIP, lambda d: gzip.compress(d[:5000]) + gzip.compress(d[5000:])),
        (DOCKER_GZIP, gzip.compress),
        (DOCKER_TAR, lambda d: d),
        (NONDIST, lambda d: d),
        (NONDIST + "+gzip", gzip.compress),
        (NONDIST + "+zstd", zstd_frames),
        (OCI_TAR, gzip.compress),  # announced plain, bytes are gzip: the magic decides
        (DOCKER_GZIP, lambda d: d),  # `docker save` style: announced gzip, bytes are a tar
        ("", zstd_frames),
    ],
    ids=[
        "tar",
        "gzip",
        "zstd",
        "zstd-frames",
        "gzip-members",
        "docker-gzip",
        "docker-tar",
        "nondist-tar",
        "nondist-gzip",
        "nondist-zstd",
        "sniff-gzip",
        "sniff-tar",
        "sniff-zstd",
    ],
)
def test_compressions(store: Store, media: str, encode) -> None:
    root = unpacked(store, SAMPLE, media, blob=encode(SAMPLE))
    assert (root / "etc/os-release").read_bytes() == b"ID=test\n" * 5000


def test_unknown_media_type_is_refused(store: Store) -> None:
    digest = store.put_bytes(SAMPLE)
    with pytest.raises(CorruptLayer, match="media type"):
        unpack_layer(store, digest, "application/vnd.oci.image.config.v1+json")
    assert leftovers(store) == []


def test_missing_blob(store: Store) -> None:
    with pytest.raises(BlobNotFound):
        unpack_layer(store, Digest.of(b"nothing"), OCI_TAR)
    assert leftovers(store) == []


# ----- DiffID and verification ---------------------------------------------------------------
def test_diff_id_covers_the_whole_stream(store: Store) -> None:
    tar = make_tar(F("a", b"1")) + bytes(10240) + b"trailing bytes after the end blocks"
    root = unpacked(store, tar, OCI_GZIP, blob=gzip.compress(tar))
    assert (root / "a").read_bytes() == b"1"


@pytest.mark.parametrize("last", [0, 511, 513, 16385, 70001])
@pytest.mark.parametrize("pad", [0, 512, 1024, 50000])
def test_end_of_archive_at_any_offset(store: Store, last: int, pad: int) -> None:
    body = make_tar(F("a", os.urandom(700)), F("last", b"z" * last)).rstrip(b"\0")
    tar = body + bytes(-len(body) % 512) + bytes(pad)  # `pad` zeros: 0, 1 or 2+ end blocks
    root = unpacked(store, tar, OCI_GZIP, blob=gzip.compress(tar))
    assert (root / "last").stat().st_size == last


def test_empty_layers(store: Store) -> None:
    empty = "sha256:5f70bf18a086007016e948b04aed3b82103a36bea41755b6cddfaf10ace3c6ef"
    digest = store.put_bytes(bytes(1024))
    assert str(unpack_layer(store, digest, OCI_TAR)) == empty
    assert os.listdir(store.layer_dir(Digest.parse(empty))) == []
    assert os.listdir(unpacked(store, b"")) == []


def test_wrong_expected_diff_id(store: Store) -> None:
    good = unpacked(store, make_tar(F("earlier")))
    digest = store.put_bytes(gzip.compress(SAMPLE))
    with pytest.raises(DigestMismatch, match="DiffID"):
        unpack_layer(store, digest, OCI_GZIP, Digest.of(b"something else"))
    assert os.listdir(store.layers) == [good.parent.name]


def test_blob_corrupted_in_the_store(store: Store) -> None:
    digest = store.put_bytes(SAMPLE)
    path = store.blob_path(digest)
    data = bytearray(path.read_bytes())
    data[2000] ^= 1  # inside a file's content: still a valid tar
    path.write_bytes(bytes(data))
    with pytest.raises(DigestMismatch, match="corrupt"):
        unpack_layer(store, digest, OCI_TAR)
    assert os.listdir(store.layers) == []


# ----- lifecycle -----------------------------------------------------------------------------
def test_idempotent(store: Store) -> None:
    digest = store.put_bytes(SAMPLE)
    diff_id = unpack_layer(store, digest, OCI_TAR, Digest.of(SAMPLE))
    ino = os.stat(store.layer_dir(diff_id)).st_ino
    assert unpack_layer(store, digest, OCI_TAR) == diff_id  # unknown DiffID: unpacked, dropped
    assert os.stat(store.layer_dir(diff_id)).st_ino == ino
    store.blob_path(digest).unlink()  # the second call must not even open the blob
    assert unpack_layer(store, digest, OCI_TAR, diff_id) == diff_id
    assert os.listdir(store.layers) == [diff_id.hex]


@pytest.mark.parametrize("known", [True, False])
def test_same_layer_from_many_threads(store: Store, known: bool) -> None:
    digest = store.put_bytes(gzip.compress(SAMPLE))
    expected = Digest.of(SAMPLE) if known else None
    results: list[Digest | BaseException] = []

    def run() -> None:
        try:
            results.append(unpack_layer(store, digest, OCI_GZIP, expected))
        except BaseException as exc:
            results.append(exc)

    threads = [threading.Thread(target=run) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [Digest.of(SAMPLE)] * 6
    assert os.listdir(store.layers) == [Digest.of(SAMPLE).hex]


def test_incomplete_layer_debris_is_replaced(store: Store, monkeypatch) -> None:
    monkeypatch.setattr(unpack, "PUBLISH_WAIT", 0.05)
    diff_id = Digest.of(SAMPLE)
    (store.layers / diff_id.hex / "diff").mkdir(parents=True)
    (store.layers / diff_id.hex / "diff" / "junk").write_bytes(b"half")
    root = unpacked(store, SAMPLE)
    assert not (root / "junk").exists() and (root / "etc/os-release").exists()
    assert os.listdir(store.layers) == [diff_id.hex]


# ----- not root ------------------------------------------------------------------------------
def run_as_nobody(work: Path, tar: bytes, expected: Digest | None, fail_late: bool = False) -> dict:
    """Unpack in a forked child that dropped to uid/gid 65534; returns what it saw."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            os.close(read)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            out = _nobody_unpack(work, tar, expected, fail_late)
            os.write(write, json.dumps(out).encode())
            code = 0
        except BaseException as exc:
            os.write(write, json.dumps({"error": f"{type(exc).__name__}: {exc}"}).encode())
        finally:
            os._exit(code)
    os.close(write)
    with os.fdopen(read, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    return json.loads(data)


def _nobody_unpack(work: Path, tar: bytes, expected: Digest | None, fail_late: bool) -> dict:
    store = Store.open(work / "store")
    digest = store.put_bytes(tar)
    if fail_late:  # after the directories' modes are set: cleanup must undo read-only ones

        def syncfs(path: Path) -> None:
            raise OSError(errno.EIO, "simulated I/O error")

        unpack.syncfs = syncfs
    try:
        diff_id = unpack_layer(store, digest, OCI_TAR, expected)
    except (DigestMismatch, OSError) as exc:
        return {"failed": str(exc), "layers": os.listdir(store.layers)}
    root = store.layer_dir(diff_id)
    seen = {}
    for name in ("file", "ro", "ro/f", "gone", "o", "fifo"):
        st = os.lstat(root / name)
        seen[name] = [stat.S_IMODE(st.st_mode), st.st_uid, stat.S_IFMT(st.st_mode), st.st_rdev]
    return {
        "diff_id": str(diff_id),
        "names": sorted(os.listdir(root)),
        "seen": seen,
        "opaque": os.getxattr(root / "o", "user.overlay.opaque").decode(),
        "xattrs": sorted(os.listxattr(root / "file")),
    }


@needs_root
def test_not_root(tmp_path: Path) -> None:
    work = Path(tempfile.mkdtemp(prefix="unpack-nobody-", dir="/tmp"))
    try:
        os.chown(work, 65534, 65534)
        tar = make_tar(
            F("file", b"data", uid=1234, mode=0o640, xattrs={"user.a": "1", "trusted.b": "2"}),
            entry("null", tarfile.CHRTYPE, devmajor=1, devminor=3),
            entry("fifo", tarfile.FIFOTYPE, mode=0o600),
            D("ro", mode=0o500),
            F("ro/f", mode=0o400),
            F(".wh.gone"),
            D("o"),
            F("o/.wh..wh..opq"),
        )
        out = run_as_nobody(work, tar, None)
        assert "error" not in out, out
        assert out["diff_id"] == str(Digest.of(tar))
        assert out["names"] == ["fifo", "file", "gone", "o", "ro"]  # no device node
        assert out["seen"]["file"][:2] == [0o640, 65534]  # owned by the caller
        assert out["seen"]["ro"][0] == 0o500 and out["seen"]["ro/f"][0] == 0o400
        assert out["seen"]["gone"][2:] == [stat.S_IFCHR, 0]  # unprivileged whiteout
        assert out["opaque"] == "y" and out["xattrs"] == ["user.a"]
        # failed unpacks as non-root leave nothing, read-only directories included
        out = run_as_nobody(work, tar, Digest.of(b"wrong"))
        assert "DiffID" in out["failed"] and out["layers"] == [Digest.of(tar).hex], out
        shutil.rmtree(work / "store" / "layers" / Digest.of(tar).hex)
        out = run_as_nobody(work, tar, None, fail_late=True)
        assert "simulated" in out["failed"] and out["layers"] == [], out
    finally:
        shutil.rmtree(work)


# ----- kernel overlayfs ----------------------------------------------------------------------
@pytest.mark.mount
def test_kernel_overlay_mounts_unpacked_layers(store: Store, tmp_path: Path) -> None:
    require_root()
    base = make_tar(
        D("etc"),
        F("etc/keep", b"keep"),
        F("etc/gone", b"gone"),
        D("opq"),
        F("opq/old", b"old"),
        D("dirgone"),
        F("dirgone/a"),
        D("dir2file"),
        F("dir2file/x"),
        F("file2dir", b"f"),
        D("mixed"),
        F("mixed/lower", b"l"),
    )
    top = make_tar(
        F("etc/.wh.gone"),
        D("opq"),
        F("opq/.wh..wh..opq"),
        F("opq/new", b"new"),
        F(".wh.dirgone"),
        F("dir2file", b"now a file"),
        D("file2dir"),
        F("file2dir/y", b"y"),
        F("mixed/upper", b"u"),
        F(".wh.never-existed"),
    )
    lower = unpacked(store, base, OCI_GZIP, blob=gzip.compress(base))
    upper = unpacked(store, top, OCI_ZSTD, blob=zstd_frames(top))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with KernelOverlay(mnt, [upper, lower]):
        assert sorted(os.listdir(mnt)) == ["dir2file", "etc", "file2dir", "mixed", "opq"]
        assert os.listdir(mnt / "etc") == ["keep"]
        assert os.listdir(mnt / "opq") == ["new"]
        assert (mnt / "dir2file").read_bytes() == b"now a file"
        assert os.listdir(mnt / "file2dir") == ["y"]
        assert sorted(os.listdir(mnt / "mixed")) == ["lower", "upper"]
        assert hashlib.sha256((mnt / "etc/keep").read_bytes()).digest() == (
            hashlib.sha256(b"keep").digest()
        )
