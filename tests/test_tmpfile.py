"""open(2) with O_TMPFILE in a mount, and linkat(2) of such a file, against kernel overlayfs
(which has it since Linux 6.6: ovl_tmpfile makes the file in the parent's upper directory).
Found while checking what `fsx` and coreutils ask of a mount: layerfs answered FUSE_TMPFILE
ENOSYS, so the kernel said EOPNOTSUPP and every program fell back to a named temporary file.

The file gets its name by linkat(fd, "", AT_EMPTY_PATH).  (The other way open(2) documents,
linkat of /proc/self/fd/N with AT_SYMLINK_FOLLOW, fails with EXDEV on the test VM's kernel
for a plain ext4 directory too, so it cannot be compared here.)
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

from tests.mounts import LayerfsMount, on_both
from tests.ops import value_or_errno
from unionfs import syscalls

pytestmark = pytest.mark.mount


def _layers(root: Path) -> tuple[Path, Path, Path, Path]:
    lower, upper, work, mnt = (root / n for n in ("lower", "upper", "work", "mnt"))
    for p in (upper, work, mnt):
        p.mkdir(parents=True)
    (lower / "dir" / "sub").mkdir(parents=True)
    (lower / "dir" / "gone").write_bytes(b"lower file\n")
    os.chmod(lower / "dir", 0o2775)  # setgid: the new file takes the directory's group
    os.chown(lower / "dir", 0, 1234)
    return lower, upper, work, mnt


def _link_fd(fd: int, path: Path) -> None:
    syscalls.link_fd(fd, os.fsencode(path))  # linkat(fd, "", AT_FDCWD, path, AT_EMPTY_PATH)


def _scenario(mnt: Path) -> dict[str, object]:
    seen: dict[str, object] = {}
    d = mnt / "dir" / "sub"  # a lower directory: copied up for the file
    old = os.umask(0o022)
    try:
        fd = os.open(d, os.O_TMPFILE | os.O_RDWR, 0o664)
    finally:
        os.umask(old)
    os.write(fd, b"written before it had a name\n")
    st = os.fstat(fd)
    seen["unnamed"] = (oct(st.st_mode), st.st_nlink, st.st_size, st.st_gid)
    seen["listing before"] = sorted(os.listdir(d))
    _link_fd(fd, d / "named")
    os.write(fd, b"and after\n")
    st2 = os.stat(d / "named")
    seen["named"] = (oct(st2.st_mode), st2.st_nlink, st2.st_size, st2.st_ino == st.st_ino)
    seen["second link"] = value_or_errno(lambda: _link_fd(fd, d / "again"))
    os.close(fd)
    seen["data"] = (d / "named").read_bytes()
    seen["nlink after"] = os.stat(d / "named").st_nlink

    # onto a whited-out name: the link takes its place
    os.unlink(mnt / "dir" / "gone")
    fd = os.open(mnt / "dir", os.O_TMPFILE | os.O_WRONLY, 0o600)
    os.write(fd, b"new\n")
    _link_fd(fd, mnt / "dir" / "gone")
    os.close(fd)
    seen["over whiteout"] = (mnt / "dir" / "gone").read_bytes()

    # O_EXCL: never linkable; closed without a name: gone
    fd = os.open(mnt / "dir", os.O_TMPFILE | os.O_RDWR | os.O_EXCL, 0o600)
    seen["excl link"] = value_or_errno(lambda: _link_fd(fd, mnt / "dir" / "x"))
    os.close(fd)
    fd = os.open(mnt / "dir", os.O_TMPFILE | os.O_RDWR, 0o600)
    os.write(fd, b"never named\n")
    os.close(fd)
    seen["listing after"] = sorted(os.listdir(mnt / "dir"))
    seen["read-only"] = value_or_errno(lambda: os.open(mnt / "dir", os.O_TMPFILE | os.O_RDONLY))
    return seen


def _upper_files(upper: Path) -> list[tuple[str, int, bytes]]:
    return sorted(
        (str(p.relative_to(upper)), p.stat().st_nlink, p.read_bytes())
        for p in upper.rglob("*")
        if p.is_file() and stat.S_ISREG(p.lstat().st_mode)
    )


def test_tmpfile_and_its_link_as_kernel_overlayfs(tmp_path, fuse, root):
    seen = on_both(tmp_path, _layers, _scenario)
    want, got = seen["kernel"], seen["layerfs"]
    lo, up, wk, mnt = (tmp_path / "layerfs" / n for n in ("lower", "upper", "work", "mnt"))
    kup = tmp_path / "kernel" / "upper"
    assert want["unnamed"][1] == 0 and want["data"].endswith(b"and after\n")  # the oracle
    assert got == want
    assert _upper_files(up) == _upper_files(kup)
    with LayerfsMount(mnt, [lo], up, wk):  # the names it was given stay
        assert (mnt / "dir" / "sub" / "named").read_bytes() == want["data"]


def test_tmpfile_on_a_read_only_stack(tmp_path, fuse):
    lo, _, _, mnt = _layers(tmp_path)
    with LayerfsMount(mnt, [lo]):
        with pytest.raises(OSError) as exc:
            os.open(mnt / "dir", os.O_TMPFILE | os.O_RDWR, 0o600)
        assert exc.value.errno == errno.EROFS
