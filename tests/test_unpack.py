"""unpack_layer: layer blobs → overlay-format layer directories.

Layers are built here with Python's tarfile.  Tiers: entry kinds and attributes; compression
and media types; DiffID and verification; lifecycle (idempotence, races, debris); OCI apply
rules and whiteouts; hostile layers (each must fail with CorruptLayer, leave nothing in the
store and write nothing outside it); non-root behaviour (a forked child as nobody); and a
kernel overlayfs mount of a small unpacked image.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import tarfile
import tempfile
import threading
from pathlib import Path

import pytest
import zstandard

from imagestore import tarsafe, unpack
from imagestore.digest import Digest
from imagestore.errors import BlobNotFound, CorruptLayer, DigestMismatch
from imagestore.store import Store
from imagestore.unpack import unpack_layer
from tests.mounts import KernelOverlay, require_root

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


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store.open(tmp_path / "store")


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


# ----- entry kinds and attributes ------------------------------------------------------------
@needs_root
def test_every_entry_kind_and_attribute(store: Store) -> None:
    frac = {"mtime": "1600000000.123456789", "atime": "1600000001.5"}
    tar = make_tar(
        D("./", mode=0o750, mtime=MTIME + 1),
        D("d", mode=0o1777, uid=7, gid=8, mtime=MTIME + 2, xattrs={"user.dir": "yes"}),
        F("d/suid", b"hello", mode=0o4755, uid=1234, gid=5678, xattrs={"user.comment": "hi"}),
        F("d/sgid", mode=0o2750, gid=5678, pax=frac),
        S("d/link", "/nowhere/at/all", uid=42, gid=43, mtime=MTIME + 3),
        H("d/hard", "d/suid"),
        entry("d/fifo", tarfile.FIFOTYPE, mode=0o640, uid=9),
        entry("d/null", tarfile.CHRTYPE, devmajor=1, devminor=3, mode=0o666),
        entry("d/loop", tarfile.BLKTYPE, devmajor=7, devminor=0, mode=0o660),
        D("ro", mode=0o555, mtime=MTIME + 4),
        F("ro/inside", b"x", mode=0o400, xattrs={"trusted.t": "v"}),
    )
    root = unpacked(store, tar)
    st = os.lstat(root)
    assert (stat.S_IMODE(st.st_mode), st.st_mtime) == (0o750, MTIME + 1)
    st = os.lstat(root / "d")
    assert stat.S_IMODE(st.st_mode) == 0o1777 and (st.st_uid, st.st_gid) == (7, 8)
    assert st.st_mtime == MTIME + 2  # applied after its children were created
    assert os.getxattr(root / "d", "user.dir") == b"yes"
    st = os.lstat(root / "d/suid")
    assert stat.S_IMODE(st.st_mode) == 0o4755 and (st.st_uid, st.st_gid) == (1234, 5678)
    assert (root / "d/suid").read_bytes() == b"hello" and st.st_nlink == 2
    assert os.getxattr(root / "d/suid", "user.comment") == b"hi"
    st = os.lstat(root / "d/sgid")
    assert stat.S_IMODE(st.st_mode) == 0o2750
    assert st.st_mtime_ns == 1600000000_123456789 and st.st_atime_ns == 1600000001_500000000
    st = os.lstat(root / "d/link")
    assert stat.S_ISLNK(st.st_mode) and os.readlink(root / "d/link") == "/nowhere/at/all"
    assert (st.st_uid, st.st_gid, st.st_mtime) == (42, 43, MTIME + 3)
    assert os.lstat(root / "d/hard").st_ino == os.lstat(root / "d/suid").st_ino
    st = os.lstat(root / "d/fifo")
    assert stat.S_ISFIFO(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o640 and st.st_uid == 9
    st = os.lstat(root / "d/null")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3)
    st = os.lstat(root / "d/loop")
    assert stat.S_ISBLK(st.st_mode) and st.st_rdev == os.makedev(7, 0)
    assert stat.S_IMODE(os.lstat(root / "ro").st_mode) == 0o555
    assert os.lstat(root / "ro").st_mtime == MTIME + 4
    assert os.getxattr(root / "ro/inside", "trusted.t") == b"v"


def test_names_are_normalised_into_the_layer(store: Store) -> None:
    tar = make_tar(F("/abs/file", b"a"), F("./rel/file", b"r"), F("x/../y", b"y"), F("//z/./f"))
    root = unpacked(store, tar)
    assert (root / "abs/file").read_bytes() == b"a"
    assert (root / "rel/file").read_bytes() == b"r"
    assert (root / "y").read_bytes() == b"y" and not (root / "x").exists()
    assert (root / "z/f").is_file()


def test_internal_xattrs_in_a_layer_are_dropped(store: Store) -> None:
    tar = make_tar(D("d", xattrs={"trusted.overlay.redirect": "/etc", "user.overlay.opaque": "y"}))
    root = unpacked(store, tar)
    assert not [x for x in os.listxattr(root / "d") if ".overlay." in x]


def test_gnu_format_long_names(store: Store) -> None:
    long = "/".join(["n" * 200] * 3)
    tar = make_tar(F(long, b"deep"), S("l" * 150, "t" * 300), fmt=tarfile.GNU_FORMAT)
    root = unpacked(store, tar)
    assert (root / long).read_bytes() == b"deep"
    assert os.readlink(root / ("l" * 150)) == "t" * 300


@pytest.mark.skipif(shutil.which("tar") is None, reason="needs GNU tar to write sparse members")
@pytest.mark.parametrize("fmt", ["gnu", "posix"])  # old GNU sparse headers; GNU sparse 1.0 (pax)
def test_sparse_members(store: Store, tmp_path: Path, fmt: str) -> None:
    src = tmp_path / "src"
    src.mkdir()
    with open(src / "sparse", "wb") as f:
        f.truncate(8 << 20)
        f.seek(3 << 20)
        f.write(b"middle")
        f.seek(8 << 20)
        f.write(b"end")
    out = subprocess.run(
        ["tar", "--sparse", f"--format={fmt}", "-C", str(src), "-cf", "-", "sparse"],
        capture_output=True,
        check=True,
    ).stdout
    root = unpacked(store, out)
    assert (root / "sparse").read_bytes() == (src / "sparse").read_bytes()
    assert os.stat(root / "sparse").st_blocks * 512 <= 256 << 10  # the holes stayed holes


# ----- compression and media types -----------------------------------------------------------
SAMPLE = make_tar(
    D("etc"), F("etc/os-release", b"ID=test\n" * 5000), F("bin/sh", os.urandom(70000))
)


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


# ----- whiteouts and the OCI apply rules -----------------------------------------------------
def is_whiteout(path: Path) -> bool:
    st = os.lstat(path)
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def is_opaque(path: Path) -> bool:
    try:
        return os.getxattr(path, OPAQUE, follow_symlinks=False) == b"y"
    except OSError:
        return False


def test_whiteouts_become_char_devices(store: Store) -> None:
    root = unpacked(store, make_tar(D("etc"), F("etc/.wh.shadow"), F(".wh.top")))
    assert is_whiteout(root / "etc/shadow") and is_whiteout(root / "top")
    assert sorted(os.listdir(root / "etc")) == ["shadow"]
    assert sorted(os.listdir(root)) == ["etc", "top"]


def test_opaque_directories(store: Store) -> None:
    tar = make_tar(
        D("o"),
        F("o/before", b"b"),
        F("o/.wh..wh..opq"),
        F("o/after", b"a"),
        F("implicit/.wh..wh..opq"),  # no entry for the directory itself
    )
    root = unpacked(store, tar)
    assert is_opaque(root / "o") and sorted(os.listdir(root / "o")) == ["after", "before"]
    assert is_opaque(root / "implicit") and os.listdir(root / "implicit") == []


def test_oci_apply_rules(store: Store) -> None:
    tar = make_tar(
        D("dir2file"),
        F("dir2file/inner"),
        F("dir2file", b"now a file"),  # a non-directory replaces a whole tree
        F("file2dir", b"f"),
        D("file2dir", mode=0o700),  # ... and a directory a file: opaque (lower content gone)
        F("file2dir/in", b"i"),
        F(".wh.p"),
        F("p/child", b"c"),  # an entry below a whiteout of its parent
        F(".wh.q"),
        D("q"),
        F("dup", b"one"),
        F("dup", b"two"),  # later wins
        D("dd", mode=0o700),
        D("dd", mode=0o750),  # a directory over a directory: metadata only
        F("dd/x"),
        F("kept", b"k"),
        F(".wh.kept"),  # a whiteout never hides an entry of its own layer
        D("kd"),
        F("kd/f"),
        F(".wh.kd"),  # ... a directory of this layer stays, and hides the lower one
        H("dup2", "dup"),
    )
    root = unpacked(store, tar)
    assert (root / "dir2file").read_bytes() == b"now a file"
    assert (root / "file2dir").is_dir() and is_opaque(root / "file2dir")
    assert os.listdir(root / "file2dir") == ["in"]
    assert stat.S_IMODE(os.stat(root / "file2dir").st_mode) == 0o700
    assert (root / "p").is_dir() and is_opaque(root / "p") and os.listdir(root / "p") == ["child"]
    assert (root / "q").is_dir() and is_opaque(root / "q")
    assert (root / "dup").read_bytes() == b"two" and (root / "dup2").read_bytes() == b"two"
    assert stat.S_IMODE(os.stat(root / "dd").st_mode) == 0o750 and not is_opaque(root / "dd")
    assert (root / "kept").read_bytes() == b"k"
    assert is_opaque(root / "kd") and os.listdir(root / "kd") == ["f"]
    assert not [n for n in os.listdir(root) if n.startswith(".wh.")]


@pytest.mark.parametrize(
    "entries",
    [
        [F("a/b", b"x"), F("a/b/.wh.c")],
        [F("a/b/.wh.c"), F("a/b", b"x")],
        [F("a/b", b"x"), F("a/b/.wh..wh..opq")],
        [S("a/b", "/etc"), F("a/b/.wh.c")],
    ],
    ids=["file-then-whiteout", "whiteout-then-file", "opaque-below-file", "below-symlink"],
)
def test_quirk_whiteout_below_a_non_directory_is_ignored(store: Store, entries) -> None:
    root = unpacked(store, make_tar(*entries))
    assert os.path.islink(root / "a/b") or (root / "a/b").read_bytes() == b"x"
    assert os.listdir(root / "a") == ["b"]


def test_whiteout_below_a_whiteout_is_ignored(store: Store) -> None:
    root = unpacked(store, make_tar(F(".wh.w"), F("w/.wh.x"), F("w/.wh..wh..opq")))
    assert is_whiteout(root / "w") and os.listdir(root) == ["w"]


def test_aufs_metadata_is_skipped(store: Store) -> None:
    root = unpacked(store, make_tar(D(".wh..wh.plnk"), F(".wh..wh.plnk/1.2"), F(".wh..wh.aufs")))
    assert os.listdir(root) == []


def test_whiteout_fallback_when_mknod_is_refused(store: Store, monkeypatch, caplog) -> None:
    real_mknod = os.mknod

    def mknod(path, mode=0o600, device=0, *, dir_fd=None):
        if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            raise PermissionError(errno.EPERM, "Operation not permitted")
        return real_mknod(path, mode, device, dir_fd=dir_fd)

    monkeypatch.setattr(os, "mknod", mknod)
    tar = make_tar(
        F(".wh.gone"),
        F(".wh.back"),
        F("back", b"again"),  # replaces the fallback whiteout
        F(".wh.p"),
        F("p/child"),  # an entry below a fallback whiteout: an opaque directory
        F("p2/.wh.x"),
        entry("null", tarfile.CHRTYPE, devmajor=1, devminor=3),
    )
    root = unpacked(store, tar)
    assert sorted(os.listdir(root)) == [".wh.gone", "back", "p", "p2"]
    assert (root / ".wh.gone").stat().st_size == 0 and (root / "back").read_bytes() == b"again"
    assert is_opaque(root / "p") and os.listdir(root / "p") == ["child"]
    assert os.listdir(root / "p2") == [".wh.x"]
    assert "device 'null' skipped" in caplog.text


def test_opaque_marker_fallback_when_xattrs_are_refused(store: Store, monkeypatch) -> None:
    real_setxattr = os.setxattr

    def setxattr(path, name, value, flags=0, *, follow_symlinks=True):
        if b"overlay.opaque" in os.fsencode(name):
            raise OSError(errno.ENOTSUP, "Operation not supported")
        return real_setxattr(path, name, value, flags, follow_symlinks=follow_symlinks)

    monkeypatch.setattr(os, "setxattr", setxattr)
    root = unpacked(store, make_tar(D("o"), F("o/.wh..wh..opq"), F("o/f"), F("x", b"1"), D("x")))
    assert sorted(os.listdir(root / "o")) == [".wh..wh..opq", "f"]
    assert os.listdir(root / "x") == [".wh..wh..opq"]


# ----- hostile layers ------------------------------------------------------------------------
ESCAPE = "../../../../canary"  # from layers/.tmp-x/diff up to tmp_path


def huge_file_header() -> bytes:
    info = tarfile.TarInfo("big")
    info.size = tarsafe.MAX_FILE_SIZE + 1
    return info.tobuf(tarfile.PAX_FORMAT) + bytes(4096)


def odd_type() -> bytes:
    info = tarfile.TarInfo("volume")
    info.type = b"V"
    return make_tar((info, b""))


def corrupt(data: bytes, at: int) -> bytes:
    out = bytearray(data)
    for i in range(at, at + 16):
        out[i] ^= 0x5A
    return bytes(out)


HOSTILE = {
    "dotdot": lambda c: make_tar(F(f"{ESCAPE}/pwned")),
    "inner-dotdot": lambda c: make_tar(F("a/../../../../../canary/pwned")),
    "symlink-parent-absolute": lambda c: make_tar(S("esc", str(c)), F("esc/pwned")),
    "symlink-parent-relative": lambda c: make_tar(S("up", ESCAPE), F("up/pwned")),
    "symlink-deeper": lambda c: make_tar(D("d"), S("d/s", "/"), F("d/s/tmp/pwned")),
    "symlink-parent-dir-entry": lambda c: make_tar(S("esc", str(c)), D("esc/pwned")),
    "hardlink-outside": lambda c: make_tar(H("h", f"{ESCAPE}/secret")),
    "hardlink-absolute": lambda c: make_tar(H("h", str(c / "secret"))),
    "hardlink-through-symlink": lambda c: make_tar(S("s", str(c)), H("h", "s/secret")),
    "hardlink-forward": lambda c: make_tar(H("h", "later"), F("later")),
    "hardlink-to-dir": lambda c: make_tar(D("d"), H("h", "d")),
    "hardlink-to-whiteout": lambda c: make_tar(F(".wh.w"), H("h", "w")),
    "long-name": lambda c: make_tar(F("x" * 256)),
    "long-path": lambda c: make_tar(F("/".join(["p" * 250] * 17))),
    "huge-file": lambda c: huge_file_header(),
    "odd-type": lambda c: odd_type(),
    "file-below-file": lambda c: make_tar(F("f"), F("f/g")),
    "root-as-file": lambda c: make_tar(F("./")),
    "whiteout-dotdot": lambda c: make_tar(F(".wh..."), F(".wh..")),
    "whiteout-as-dir": lambda c: make_tar(F(".wh.x/y")),
    "truncated-tar": lambda c: SAMPLE[:3000],
    "garbage-header": lambda c: make_tar(F("a", b"1"))[:1024] + b"\xff" * 512 + bytes(1024),
    "not-a-tar": lambda c: b"\xff" * 2048,
    "truncated-gzip": lambda c: gzip.compress(SAMPLE)[:-30],
    "corrupt-gzip": lambda c: corrupt(gzip.compress(SAMPLE), 2000),
    "gzip-trailing-garbage": lambda c: gzip.compress(SAMPLE) + b"garbage!",
    "truncated-zstd": lambda c: zstd_frames(SAMPLE)[:-10],
    "truncated-zstd-frame": lambda c: zstd_frames(SAMPLE, 3)[:-400],
    "corrupt-zstd": lambda c: corrupt(zstd_frames(SAMPLE), 300),
}


@pytest.fixture
def canary(tmp_path: Path) -> Path:
    c = tmp_path / "canary"
    c.mkdir()
    (c / "secret").write_bytes(b"do not touch")
    return c


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_layers(store: Store, canary: Path, tmp_path: Path, case: str) -> None:
    earlier = unpacked(store, make_tar(F("earlier")))
    digest = store.put_bytes(HOSTILE[case](canary))
    with pytest.raises(CorruptLayer) as info:
        unpack_layer(store, digest, OCI_GZIP)
    assert str(info.value).startswith(f"layer {digest.short}")
    assert os.listdir(store.layers) == [earlier.parent.name]
    assert os.listdir(canary) == ["secret"] and (canary / "secret").read_bytes() == b"do not touch"
    assert os.stat(canary / "secret").st_nlink == 1
    assert not [p for p, _, names in os.walk(tmp_path) for n in names if n == "pwned"]


@pytest.mark.parametrize(
    ("case", "words"),
    [
        ("dotdot", "escapes the layer root"),
        ("symlink-parent-absolute", "parent 'esc' is a symlink"),
        ("hardlink-forward", "not an earlier file"),
        ("long-name", "longer than 255"),
        ("huge-file", "'big'"),
        ("odd-type", "unsupported tar entry type"),
        ("truncated-zstd", "truncated zstd"),
        ("truncated-gzip", "corrupt or truncated gzip"),
        ("garbage-header", "invalid tar header"),
    ],
)
def test_hostile_errors_name_the_problem(store: Store, canary: Path, case: str, words: str) -> None:
    digest = store.put_bytes(HOSTILE[case](canary))
    with pytest.raises(CorruptLayer, match=words):
        unpack_layer(store, digest, OCI_TAR)


def test_limits_on_entries_and_headers(store: Store, monkeypatch) -> None:
    monkeypatch.setattr(tarsafe, "MAX_ENTRIES", 3)
    digest = store.put_bytes(make_tar(*[F(f"f{i}") for i in range(5)]))
    with pytest.raises(CorruptLayer, match="more than 3 entries"):
        unpack_layer(store, digest, OCI_TAR)
    monkeypatch.setattr(tarsafe, "MAX_HEADER_SIZE", 1000)
    digest = store.put_bytes(make_tar(F("x", pax={"comment": "y" * 2000})))
    with pytest.raises(CorruptLayer, match="extended header"):
        unpack_layer(store, digest, OCI_TAR)
    assert os.listdir(store.layers) == []


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
