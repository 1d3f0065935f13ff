"""Inode flags through a mount (lsattr/chattr: FS_IOC_GETFLAGS/SETFLAGS, FSGETXATTR/FSSETXATTR),
against kernel overlayfs on the same layers.

The kernel shows the real object's flags, keeps immutable and append-only of an upper object
in its `overlay.protattr` xattr (never on the real file: Linux 5.13), and refuses what the
VFS refuses for them.  layerfs answered FUSE_IOCTL ENOSYS: lsattr said "Operation not
supported", chattr +i failed, and an upper the kernel had marked immutable was writable.
"""

from __future__ import annotations

import fcntl
import os
import struct
from pathlib import Path

import pytest

from tests.mounts import KernelOverlay, LayerfsMount, on_both
from tests.ops import value_or_errno
from unionfs import fileattr, markers

pytestmark = pytest.mark.mount

IMM, APP, DUMP = fileattr.FS_IMMUTABLE_FL, fileattr.FS_APPEND_FL, 0x40  # chattr +i, +a, +d


def _flags(path: Path) -> int:
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        return fileattr.real_flags(fd)
    finally:
        os.close(fd)


def _set(path: Path, add: int = 0, drop: int = 0) -> None:
    """chattr: read, change, write back (what the kernel then sends is the whole set)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        flags = fileattr.real_flags(fd)
        fcntl.ioctl(fd, fileattr.FS_IOC_SETFLAGS, struct.pack("<I", (flags | add) & ~drop))
    finally:
        os.close(fd)


def _xflags(path: Path) -> int:
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        buf = bytearray(fileattr.FSXATTR.size)
        fcntl.ioctl(fd, fileattr.FS_IOC_FSGETXATTR, buf, True)
        return int(fileattr.FSXATTR.unpack(buf)[0])
    finally:
        os.close(fd)


def _layers(root: Path) -> tuple[Path, Path, Path, Path]:
    lower, upper, work, mnt = (root / n for n in ("lower", "upper", "work", "mnt"))
    for p in (lower / "d", upper, work, mnt):
        p.mkdir(parents=True)
    for name in ("f", "g", "h", "d/c"):
        (lower / name).write_bytes(b"lower\n")
    _set(lower / "h", add=DUMP)
    return lower, upper, work, mnt


def _write(path: Path, flags: int, data: bytes = b"+\n") -> object:
    def go() -> int:
        fd = os.open(path, flags)
        try:
            return os.write(fd, data)
        finally:
            os.close(fd)

    return value_or_errno(go)


def _steps(mnt: Path) -> dict[str, object]:
    up = mnt.parent / "upper"
    seen: dict[str, object] = {}
    # read: the real object's flags (extents and all), a lower file's own +d
    seen["read"] = [_flags(mnt / n) & ~(IMM | APP) for n in ("f", "d", "h")]
    seen["read h"] = bool(_flags(mnt / "h") & DUMP)
    # immutable, set on a lower file: copied up; the real upper file never gets it
    _set(mnt / "f", add=IMM)
    seen["f flags"] = (bool(_flags(mnt / "f") & IMM), bool(_xflags(mnt / "f") & 0x8))
    seen["f upper real"] = bool(_flags(up / "f") & IMM)
    seen["f protattr"] = markers.protattr(os.fsencode(up / "f"))
    seen["f refused"] = [
        _write(mnt / "f", os.O_WRONLY | os.O_APPEND),
        _write(mnt / "f", os.O_RDONLY | os.O_TRUNC),
        value_or_errno(os.unlink, mnt / "f"),
        value_or_errno(os.rename, mnt / "f", mnt / "f2"),
        value_or_errno(os.chmod, mnt / "f", 0o600),
        value_or_errno(os.utime, mnt / "f", None),
        value_or_errno(os.utime, mnt / "f", (1, 1)),
        value_or_errno(os.link, mnt / "f", mnt / "f3"),
        value_or_errno(os.setxattr, mnt / "f", "user.k", b"v"),
        value_or_errno(os.truncate, mnt / "f", 0),
    ]
    seen["f data"] = (mnt / "f").read_bytes()
    # append-only: appends only, times only to now, never removed
    _set(mnt / "g", add=APP)
    seen["g refused"] = [
        _write(mnt / "g", os.O_WRONLY | os.O_APPEND),
        _write(mnt / "g", os.O_WRONLY),
        value_or_errno(os.truncate, mnt / "g", 0),
        value_or_errno(os.utime, mnt / "g", None),
        value_or_errno(os.utime, mnt / "g", (1, 1)),
        value_or_errno(os.chmod, mnt / "g", 0o600),
        value_or_errno(os.unlink, mnt / "g"),
    ]
    seen["g data"] = (mnt / "g").read_bytes()
    # an immutable directory: no entry comes or goes, its children still change
    _set(mnt / "d", add=IMM)
    seen["d refused"] = [
        _write(mnt / "d" / "new", os.O_WRONLY | os.O_CREAT),
        value_or_errno(os.mkdir, mnt / "d" / "sub"),
        value_or_errno(os.symlink, "c", mnt / "d" / "s"),
        value_or_errno(os.unlink, mnt / "d" / "c"),
        value_or_errno(os.rename, mnt / "d" / "c", mnt / "c"),
        value_or_errno(os.rename, mnt / "g", mnt / "d" / "g"),
        value_or_errno(os.chmod, mnt / "d" / "c", 0o600),
        _write(mnt / "d" / "c", os.O_WRONLY | os.O_APPEND),
    ]
    seen["d listing"] = sorted(os.listdir(mnt / "d"))
    # cleared again: everything allowed, the record gone
    _set(mnt / "f", drop=IMM)
    _set(mnt / "g", drop=APP)
    _set(mnt / "d", drop=IMM)
    seen["cleared"] = [markers.protattr(os.fsencode(up / n)) for n in ("f", "g", "d")] + [
        _write(mnt / "f", os.O_WRONLY | os.O_APPEND),
        value_or_errno(os.unlink, mnt / "g"),
    ]
    # a flag that is not kept apart goes onto the real upper object
    _set(mnt / "d" / "c", add=DUMP)
    seen["c real"] = bool(_flags(up / "d" / "c") & DUMP)
    # ioctls that are no inode flags: ENOTTY, as on a file that has none
    fd = os.open(mnt / "f", os.O_RDONLY)
    try:
        seen["tcgets"] = value_or_errno(fcntl.ioctl, fd, 0x5401, bytes(60))  # isatty's
    finally:
        os.close(fd)
    return seen


@pytest.mark.parametrize("extra", ["", "writeback=1,passthrough=0"])
def test_inode_flags_as_kernel_overlayfs(tmp_path, fuse, root, extra):
    """Also with the writeback cache, where the kernel sends utime(NULL)'s mtime as a time
    of its own clock (not "now"): an append-only file took it for a time given and refused
    it (xfstests generic/079 with passthrough=0)."""
    results = on_both(tmp_path, _layers, _steps, extra)
    kernel, layerfs = results["kernel"], results["layerfs"]
    assert kernel["f flags"] == (True, True) and kernel["f upper real"] is False  # the oracle
    assert kernel["f refused"] == ["EPERM"] * 10 and kernel["d refused"][-2:] == [None, 2]
    assert layerfs == kernel


def test_flags_outlive_the_mount_and_the_engine(tmp_path, fuse, root):
    """An upper made immutable through layerfs stays so on a remount and for the kernel; one
    the kernel made immutable is refused by layerfs (its protattr was ignored before)."""
    for first, then in (("layerfs", "kernel"), ("kernel", "layerfs"), ("layerfs", "layerfs")):
        lo, up, wk, mnt = _layers(tmp_path / f"{first}-{then}")
        for i, engine in enumerate((first, then)):
            mount = KernelOverlay(mnt, [lo], up, wk) if engine == "kernel" else (
                LayerfsMount(mnt, [lo], up, wk))  # fmt: skip
            with mount:
                if i == 0:
                    _set(mnt / "f", add=IMM)
                    _set(mnt / "d", add=APP)
                    continue
                assert _flags(mnt / "f") & IMM and _flags(mnt / "d") & APP, (first, then)
                assert _write(mnt / "f", os.O_WRONLY | os.O_APPEND) == "EPERM", (first, then)
                assert value_or_errno(os.unlink, mnt / "d" / "c") == "EPERM", (first, then)
                assert _write(mnt / "d" / "new", os.O_WRONLY | os.O_CREAT) == 2  # append-only
                _set(mnt / "f", drop=IMM)
                assert _write(mnt / "f", os.O_WRONLY | os.O_APPEND) == 2


def test_a_copy_up_carries_a_lower_files_flags(tmp_path, fuse, root):
    """A lower file's own immutable flag goes into its copy's protattr, and its data with it
    even when the change that copied it up meant to truncate it (the change is refused)."""

    def layers(root: Path) -> tuple[Path, Path, Path, Path]:
        made = _layers(root)
        _set(made[0] / "f", add=IMM)
        return made

    def steps(mnt: Path) -> object:
        try:
            return [
                value_or_errno(os.chown, mnt / "f", 0, 0),  # a copy-up, then refused
                (mnt.parent / "upper" / "f").exists()
                and markers.protattr(os.fsencode(mnt.parent / "upper" / "f")),
                (mnt / "f").read_bytes(),
                value_or_errno(os.truncate, mnt / "f", 0),
                (mnt / "f").read_bytes(),
                bool(_flags(mnt / "f") & IMM),
            ]
        finally:
            for p in (mnt.parent / "lower" / "f", mnt.parent / "upper" / "f"):
                if p.exists():  # a test's tmp_path must stay removable
                    _set(p, drop=IMM)

    results = on_both(tmp_path, layers, steps)
    assert results["layerfs"][:3] == ["EPERM", IMM, b"lower\n"]
    # the kernel refuses before copying up; the view is the same either way
    assert results["layerfs"][2:] == results["kernel"][2:]


def test_the_writeback_caches_own_times_reach_an_immutable_file(tmp_path, fuse, root):
    """With the writeback cache the kernel keeps a file's times from its writes and sends
    them later (a SETATTR of mtime and ctime, at close or sync).  For a file made immutable
    after the writes, that is no change of the caller's: refused, it failed the close and
    fsync with EPERM, and a later punched hole with EIO (the stress test's writeback run)."""
    lo, up, wk, mnt = _layers(tmp_path)
    with LayerfsMount(mnt, [lo], up, wk, extra_opts="writeback=1,passthrough=0"):
        fd = os.open(mnt / "f", os.O_RDWR)
        try:
            os.pwrite(fd, b"x" * 100, 4000)  # a dirty page, and times the kernel keeps
            _set(mnt / "f", add=IMM)
            assert value_or_errno(os.fsync, fd) is None
            assert value_or_errno(os.utime, mnt / "f", (1, 1)) == "EPERM"  # a caller's
        finally:
            os.close(fd)  # a close error would raise here
        _set(mnt / "f", drop=IMM)
        assert (mnt / "f").read_bytes()[4000:4100] == b"x" * 100


SYNC, DAX_X = fileattr.FS_SYNC_FL, 0x8000  # chattr +S; FS_XFLAG_DAX (xfs_io chattr +x)


def _inherited(mnt: Path) -> dict[str, object]:
    """New objects in a directory whose flags the upper filesystem hands to its children
    (ext4: +S, +d and the DAX flag), made directly in it and over a whiteout of a lower
    name (xfstests generic/607)."""
    up = mnt.parent / "upper"
    (mnt / "a").mkdir()
    _set(mnt / "a", add=SYNC | DUMP)
    fd = os.open(mnt / "a", os.O_RDONLY)
    try:
        buf = bytearray(fileattr.FSXATTR.size)
        fcntl.ioctl(fd, fileattr.FS_IOC_FSGETXATTR, buf, True)
        fields = list(fileattr.FSXATTR.unpack(buf))
        fields[0] |= DAX_X
        fcntl.ioctl(fd, fileattr.FS_IOC_FSSETXATTR, fileattr.FSXATTR.pack(*fields))
    finally:
        os.close(fd)
    (mnt / "a" / "sub").mkdir()
    (mnt / "a" / "sub" / "deeper").mkdir()
    (mnt / "a" / "f").write_bytes(b"x")
    os.symlink("f", mnt / "a" / "s")
    os.mkfifo(mnt / "a" / "p")
    (mnt / "d" / "c").unlink()  # then made again over its whiteout
    (mnt / "d" / "c").mkdir()
    seen: dict[str, object] = {}
    for name in ("a/sub", "a/sub/deeper", "a/f", "d/c"):
        seen[name] = (
            _flags(mnt / name) & (SYNC | DUMP),
            bool(_xflags(mnt / name) & DAX_X),
            _flags(up / name) & (SYNC | DUMP),
        )
    seen["kinds"] = sorted(os.listdir(up / "a"))
    return seen


def test_new_objects_inherit_their_directorys_flags_as_on_the_kernel(tmp_path, fuse, root):
    """mkdir, mknod and symlink through layerfs made the object in the work dir and renamed
    it into place, so it inherited the work dir's flags, not its directory's: a directory
    made in a `chattr +S` or DAX directory lacked them; the kernel makes it in place."""
    results = on_both(tmp_path, _layers, _inherited)
    kernel = results["kernel"]
    assert kernel["a/sub"] == (SYNC | DUMP, True, SYNC | DUMP)  # the oracle
    assert results["layerfs"] == kernel


def _upper_flagged(root: Path) -> tuple[Path, Path, Path, Path]:
    """Objects made append-only in the upper itself (chattr +a on the real files, not through
    a mount: no overlay.protattr), as xfstests overlay/030 makes them."""
    lower, upper, work, mnt = (root / n for n in ("lower", "upper", "work", "mnt"))
    for p in (lower, upper / "d", work, mnt):
        p.mkdir(parents=True)
    (upper / "f").write_bytes(b"upper\n")
    (upper / "g").write_bytes(b"upper\n")
    for p in (upper / "f", upper / "g", upper / "d"):
        _set(p, add=APP)
    return lower, upper, work, mnt


def _append_only_steps(mnt: Path) -> dict[str, object]:
    try:
        return {
            "append": _write(mnt / "f", os.O_WRONLY | os.O_APPEND, b"one\n"),
            "append rw": _write(mnt / "f", os.O_RDWR | os.O_APPEND, b"two\n"),
            "write": _write(mnt / "g", os.O_WRONLY),
            "now": value_or_errno(os.utime, mnt / "f"),
            "dir now": value_or_errno(os.utime, mnt / "d"),
            "times": value_or_errno(os.utime, mnt / "g", (1, 1)),
            "data": (mnt / "f").read_bytes(),
        }
    finally:
        for p in ("f", "g", "d"):
            _set(mnt.parent / "upper" / p, drop=APP)  # or pytest cannot remove them


def test_objects_append_only_in_the_upper_itself_as_kernel_overlayfs(tmp_path, fuse, root):
    """The kernel opens an append-only real file for appending and sets "now" on it;
    layerfs opened the real file without O_APPEND (the kernel sends the offsets) and set
    "now" as a time given, so both failed with EPERM (xfstests overlay/030)."""
    seen = on_both(tmp_path, _upper_flagged, _append_only_steps)
    assert seen["layerfs"] == seen["kernel"]
    assert seen["layerfs"]["data"] == b"upper\none\ntwo\n"
    assert seen["layerfs"]["write"] == "EPERM" and seen["layerfs"]["times"] == "EPERM"


def _flagged_parents(root: Path) -> tuple[Path, Path, Path, Path]:
    lower, upper, work, mnt = (root / n for n in ("lower", "upper", "work", "mnt"))
    for p in (lower / "low/dir", upper / "imm/dir", upper / "app/dir", work, mnt):
        p.mkdir(parents=True)
    for p in (lower / "low/dir/f", upper / "imm/dir/f", upper / "app/dir/f"):
        p.write_bytes(b"x\n")
    _set(upper / "imm", add=IMM)
    _set(upper / "app", add=APP)
    return lower, upper, work, mnt


def _rmdir_steps(mnt: Path) -> dict[str, object]:
    try:
        return {p: value_or_errno(os.rmdir, mnt / p) for p in ("imm/dir", "app/dir", "low/dir")}
    finally:
        for p in ("imm", "app"):
            _set(mnt.parent / "upper" / p, drop=IMM | APP)


def test_removing_a_full_directory_from_a_flagged_one_is_eperm_as_on_the_kernel(
    tmp_path, fuse, root
):
    """The VFS refuses a removal from an immutable or append-only directory (may_delete)
    before the filesystem finds the directory not empty: EPERM, where layerfs said
    ENOTEMPTY for flags set in the upper itself (xfstests overlay/030)."""
    seen = on_both(tmp_path, _flagged_parents, _rmdir_steps)
    assert seen["layerfs"] == seen["kernel"]
    assert seen["layerfs"] == {"imm/dir": "EPERM", "app/dir": "EPERM", "low/dir": "ENOTEMPTY"}
