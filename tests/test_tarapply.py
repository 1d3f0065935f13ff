"""tarapply, through unpack_layer: entry kinds and attributes (sparse members too), and the
OCI apply rules and whiteouts in the overlay format."""

from __future__ import annotations

import errno
import os
import shutil
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest

from imagestore.store import Store
from tests.layertar import (
    MTIME,
    D,
    F,
    H,
    S,
    entry,
    is_opaque,
    is_whiteout,
    make_tar,
    needs_root,
    unpacked,
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


@needs_root
@pytest.mark.parametrize("workers", [0, 4])
def test_new_files_get_exactly_their_members_mode_and_owner(
    store: Store, monkeypatch, workers: int
) -> None:
    """A new file is created with its member's permission bits and the creator's ids, and
    chmod/chown run only where those differ: whatever the umask, special bits, the root's
    own ids, a member that replaces an earlier one of its name (O_EXCL fails there).  With
    and without the small-file workers (0: each file made in the applier's thread, as
    commit's layer build does)."""
    from imagestore import unpack

    monkeypatch.setattr(unpack, "FILE_WORKERS", workers)
    tar = make_tar(
        F("plain", b"a", mode=0o644),
        F("open", b"b", mode=0o666),
        F("none", b"c", mode=0o000),
        F("suid", b"d", mode=0o4755),
        F("sgid", b"e", mode=0o2711, gid=5),
        F("mine", b"f", mode=0o640, uid=1, gid=1),
        F("twice", b"first", mode=0o600, uid=3),
        F("twice", b"second", mode=0o6755),
    )
    old = os.umask(0o077)
    try:
        root = unpacked(store, tar)
    finally:
        os.umask(old)
    expected = {
        "plain": (0o644, 0, 0, b"a"),
        "open": (0o666, 0, 0, b"b"),
        "none": (0o000, 0, 0, b"c"),
        "suid": (0o4755, 0, 0, b"d"),
        "sgid": (0o2711, 0, 5, b"e"),
        "mine": (0o640, 1, 1, b"f"),
        "twice": (0o6755, 0, 0, b"second"),
    }
    for name, (mode, uid, gid, data) in expected.items():
        st = os.lstat(root / name)
        got = (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, (root / name).read_bytes())
        assert got == (mode, uid, gid, data), name


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


# ----- whiteouts and the OCI apply rules -----------------------------------------------------


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
