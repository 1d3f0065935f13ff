"""POSIX ACLs on a real mount, kernel overlayfs beside it as the oracle.

layerfs asks the kernel for FUSE_POSIX_ACL, so the kernel checks permissions with a file's
ACL (kernel overlayfs does the same with the real inode's ACL) and caches ACLs; an ACL set
through the mount lands on the upper copy, its XATTR_CREATE/XATTR_REPLACE flags apply there,
and one set by an owner outside the file's group clears setgid (FUSE_SETXATTR_ACL_KILL_SGID).
Without FUSE_POSIX_ACL the kernel checked the mode bits alone: a user an ACL lets in got
EACCES, one it shuts out got in.
"""

from __future__ import annotations

import errno
import os
import stat
import struct
import subprocess
from pathlib import Path

import pytest

from tests.layerdata import write
from tests.mounts import KernelOverlay, LayerfsMount, open_path_to

pytestmark = pytest.mark.mount

ACCESS = "system.posix_acl_access"
USER_OBJ, USER, GROUP_OBJ, GROUP, MASK, OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
NOBODY = 65534


def acl(*entries: tuple[int, int, int]) -> bytes:
    """posix_acl_xattr bytes: version 2, then (tag, perm, id) sorted by tag and id."""
    out = struct.pack("<I", 2)
    for tag, perm, xid in entries:
        out += struct.pack("<HHI", tag, perm, xid)
    return out


def base(user: int, group: int, other: int, *named: tuple[int, int, int], mask: int = 0):
    """A full ACL: owner, named entries, group, mask, other (the order the kernel wants)."""
    undef = 0xFFFFFFFF
    entries = [(USER_OBJ, user, undef)]
    entries += [e for e in named if e[0] == USER]
    entries.append((GROUP_OBJ, group, undef))
    entries += [e for e in named if e[0] == GROUP]
    entries += [(MASK, mask, undef), (OTHER, other, undef)]
    return acl(*entries)


def _as_nobody(*argv: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *argv],
        capture_output=True,
        timeout=30,
    )


def _sides(tmp_path: Path, fill):
    """(name, lower, upper, work, mnt) for the kernel and for layerfs, the same lower."""
    out = []
    for name in ("kernel", "layerfs"):
        d = tmp_path / name
        for sub in ("lower", "upper", "work", "mnt"):
            (d / sub).mkdir(parents=True)
        fill(d / "lower")
        out.append((name, d / "lower", d / "upper", d / "work", d / "mnt"))
    open_path_to(tmp_path)  # pytest's temp dirs are 0700: let nobody reach the mounts
    return out


def _mount(name, lower, upper, work, mnt, extra: str = ""):
    if name == "kernel":
        return KernelOverlay(mnt, [lower], upper, work)
    return LayerfsMount(mnt, [lower], upper, work, extra)


def _access_lower(lo: Path) -> None:
    # nobody may read through a named-user entry, though the mode bits say no
    write(lo / "granted", b"granted\n", mode=0o640)
    os.setxattr(lo / "granted", ACCESS, base(6, 4, 0, (USER, 4, NOBODY), mask=4))
    # nobody is shut out by a named-user entry, though "other" may read
    write(lo / "denied", b"denied\n", mode=0o644)
    os.setxattr(lo / "denied", ACCESS, base(6, 4, 4, (USER, 0, NOBODY), mask=4))
    write(lo / "plain", b"plain\n", mode=0o600)
    (lo / "dir").mkdir()
    os.chmod(lo / "dir", 0o700)  # nobody may enter through the ACL only
    os.setxattr(lo / "dir", ACCESS, base(7, 5, 0, (USER, 5, NOBODY), mask=5))
    write(lo / "dir" / "inside", b"inside\n", mode=0o644)


def test_acl_entries_decide_access_as_on_kernel_overlayfs(tmp_path, fuse, root):
    seen = {}
    for name, lo, up, wk, mnt in _sides(tmp_path, _access_lower):
        with _mount(name, lo, up, wk, mnt):
            seen[name] = {
                f: _as_nobody("cat", str(mnt / f)).returncode == 0
                for f in ("granted", "denied", "plain", "dir/inside")
            }
            # a second time: now from the kernel's cached ACLs
            assert _as_nobody("cat", str(mnt / "granted")).returncode == 0
            assert os.getxattr(mnt / "granted", ACCESS) == os.getxattr(lo / "granted", ACCESS)
    assert seen["layerfs"] == seen["kernel"]
    assert seen["layerfs"] == {"granted": True, "denied": False, "plain": False,
                               "dir/inside": True}  # fmt: skip


def _set_lower(lo: Path) -> None:
    write(lo / "f", b"f\n", mode=0o644)
    write(lo / "x", b"x\n", mode=0o644)
    os.setxattr(lo / "x", "user.k", b"lower")
    write(lo / "s", b"s\n", mode=0o644)
    os.chown(lo / "s", NOBODY, 0)  # owned by nobody, group root: nobody is outside it
    os.chmod(lo / "s", 0o2775)


@pytest.mark.parametrize("transport", ["native", "pyfuse3"])
def test_acls_set_through_the_mount_as_on_kernel_overlayfs(tmp_path, fuse, root, transport):
    """Also on the pyfuse3 fallback, which gets no FUSE_SETXATTR_ACL_KILL_SGID from the
    kernel (pyfuse3 does not negotiate SETXATTR_EXT): setgid stayed (xfstests 375)."""
    granted = base(6, 4, 4, (USER, 6, NOBODY), mask=6)
    seen = {}
    for name, lo, up, wk, mnt in _sides(tmp_path, _set_lower):
        with _mount(name, lo, up, wk, mnt, f"fuse={transport}"):
            os.setxattr(mnt / "f", ACCESS, granted)  # copy-up, then the ACL on the upper
            mode = os.stat(mnt / "f").st_mode  # the group bits show the mask (0664)
            writable = _as_nobody("sh", "-c", f"echo more >> {mnt}/f").returncode == 0
            errs = []
            for attr, flags in (("user.k", os.XATTR_CREATE), ("user.none", os.XATTR_REPLACE)):
                try:
                    os.setxattr(mnt / "x", attr, b"new", flags)
                    errs.append(0)
                except OSError as exc:
                    errs.append(exc.errno)
            # the owner, outside the file's group, sets an ACL: setgid goes
            owner_set = _as_nobody(
                "/usr/bin/python3", "-c",
                f"import os; os.setxattr({str(mnt / 's')!r}, {ACCESS!r}, {granted!r})",
            )  # fmt: skip
            assert owner_set.returncode == 0, owner_set.stderr
            seen[name] = (
                mode, writable, os.getxattr(mnt / "f", ACCESS), errs,
                oct(os.stat(mnt / "s").st_mode), os.getxattr(mnt / "x", "user.k"),
            )  # fmt: skip
        assert os.getxattr(up / "f", ACCESS) == granted  # on the upper copy
        assert not os.stat(up / "s").st_mode & 0o2000
    assert seen["layerfs"] == seen["kernel"]
    mode, writable, value, errs, s_mode, kept = seen["layerfs"]
    assert mode & 0o777 == 0o664 and writable and value == granted
    assert errs == [errno.EEXIST, errno.ENODATA] and kept == b"lower"
    assert s_mode == oct(0o100664)


def _inherit_lower(lo: Path) -> None:
    (lo / "d").mkdir()
    os.setxattr(lo / "d", "system.posix_acl_default", base(7, 7, 5, (USER, 5, NOBODY), mask=7))
    write(lo / "d" / "wh", b"over me\n")
    (lo / "plain").mkdir()


def _creates(mnt: Path) -> None:
    old = os.umask(0o027)  # ignored under a default ACL, applied elsewhere
    try:
        (mnt / "d" / "f").touch(mode=0o666)
        os.mkdir(mnt / "d" / "sub", 0o777)
        os.mkfifo(mnt / "d" / "fifo", 0o666)
        os.unlink(mnt / "d" / "wh")
        (mnt / "d" / "wh").touch(mode=0o666)  # over a whiteout: made in the work dir
        os.mkdir(mnt / "d" / "priv", 0o700)  # the mode narrows the inherited ACL
        (mnt / "plain" / "f").touch(mode=0o666)
        os.mkdir(mnt / "plain" / "sub", 0o777)
    finally:
        os.umask(old)


def _acls(mnt: Path) -> dict[str, tuple]:
    out = {}
    for p in ("d/f", "d/sub", "d/fifo", "d/wh", "d/priv", "plain/f", "plain/sub"):
        path = mnt / p
        out[p] = (oct(os.lstat(path).st_mode),
                  {n: os.getxattr(path, n) for n in sorted(os.listxattr(path))})  # fmt: skip
    return out


def test_new_objects_inherit_default_acls_as_on_kernel_overlayfs(tmp_path, fuse, root):
    """Files over a whiteout are made in the work dir, where the real file system inherits
    nothing, and the daemon's own umask is not the caller's: layerfs applies the parent's
    default ACL itself, to everything it makes (over what the upper gave it in place)."""
    seen = {}
    for name, lo, up, wk, mnt in _sides(tmp_path, _inherit_lower):
        with _mount(name, lo, up, wk, mnt):
            _creates(mnt)
            seen[name] = _acls(mnt)
    assert seen["layerfs"] == seen["kernel"]
    got = seen["layerfs"]
    assert got["d/f"][0] == oct(0o100664) and got["plain/f"][0] == oct(0o100640)
    assert set(got["d/sub"][1]) == {ACCESS, "system.posix_acl_default"}
    assert got["plain/sub"] == (oct(0o40750), {})


def test_inheritance_rules():
    from unionfs import acl as A

    default = base(7, 7, 5, (USER, 5, NOBODY), mask=7)
    made = A.inherit(None, 0o666, 0o022, stat.S_IFREG)
    assert (made.mode, made.access, made.default) == (0o644, None, None)
    made = A.inherit(default, 0o4640, 0o077, stat.S_IFREG)  # the umask does not count
    assert made.mode == 0o4640 and made.default is None
    assert A.entries(made.access) == [[USER_OBJ, 6, 0xFFFFFFFF], [USER, 5, NOBODY],
                                      [GROUP_OBJ, 7, 0xFFFFFFFF], [MASK, 4, 0xFFFFFFFF],
                                      [OTHER, 0, 0xFFFFFFFF]]  # fmt: skip
    plain = base(7, 5, 5)[:-16] + base(7, 5, 5)[-8:]  # owner, group, other: no mask
    made = A.inherit(plain, 0o777, 0o022, stat.S_IFDIR)
    assert made.mode == 0o755 and made.access is None and made.default == plain
    made = A.inherit(default, 0o777, 0, stat.S_IFLNK)  # symlinks carry no ACL
    assert made.access is None and made.mode == 0o777
    assert A.inherit(b"\1\0\0\0", 0o666, 0o022, stat.S_IFREG).mode == 0o644  # not an ACL


@pytest.mark.parametrize("transport", ["native", "pyfuse3"])
def test_acls_on_both_transports_and_noacl_turns_them_off(tmp_path, fuse, root, transport):
    """Both transports ask for FUSE_POSIX_ACL; fuse-overlayfs's `noacl` turns it off (the
    kernel then checks the mode bits alone, as it did before layerfs asked for ACLs)."""
    _, lo, up, wk, mnt = _sides(tmp_path, _access_lower)[1]  # the layerfs side
    for extra, granted in (("", True), (",noacl", False)):
        with LayerfsMount(mnt, [lo], up, wk, f"fuse={transport}{extra}"):
            assert (_as_nobody("cat", str(mnt / "granted")).returncode == 0) is granted
            assert (_as_nobody("cat", str(mnt / "denied")).returncode == 0) is not granted


def test_a_default_acl_on_the_workdir_reaches_nothing_in_the_mount(tmp_path, fuse, root):
    """The kernel removes the POSIX ACLs its work dir inherits from the workdir given
    (ovl_make_workdir), since objects are built there before they move into place.  layerfs
    kept them: with `setfacl -d -m o::rwx WORKDIR`, a directory copied up carried that
    default ACL, and a file made in it was world-writable (xfstests overlay/023)."""

    def lower(lo: Path) -> None:
        _inherit_lower(lo)
        write(lo / "f", b"f\n")
        (lo / "e").mkdir()

    seen = {}
    for name, lo, up, wk, mnt in _sides(tmp_path, lower):
        os.setxattr(wk, "system.posix_acl_default", base(7, 5, 7))
        with _mount(name, lo, up, wk, mnt):
            with open(mnt / "f", "ab") as f:
                f.write(b"more\n")  # a file copied up
            os.chmod(mnt / "e", 0o755)  # a directory copied up
            old = os.umask(0o022)
            try:
                (mnt / "e" / "new").touch(mode=0o666)
            finally:
                os.umask(old)
            _creates(mnt)
            got = _acls(mnt)
            for p in ("f", "e", "e/new"):
                xattrs = {n: os.getxattr(mnt / p, n) for n in sorted(os.listxattr(mnt / p))}
                got[p] = (oct(os.lstat(mnt / p).st_mode), xattrs)
            seen[name] = got
        assert not [n for n in os.listxattr(up / "e") if n.startswith("system.posix_acl")]
    assert seen["layerfs"] == seen["kernel"]
    assert seen["layerfs"]["e/new"] == (oct(0o100644), {})
