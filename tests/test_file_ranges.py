"""fallocate(2) and lseek(2)'s SEEK_DATA / SEEK_HOLE through a mount: kernel overlayfs passes
both to the real file (ovl_fallocate, ovl_llseek), so a mount must give the same answers on
the same layers.  Found by running xfstests' fsx by hand against layerfs, which reported every
fallocate mode unsupported (FUSE_FALLOCATE was answered ENOSYS), and by comparing a sparse
lower file's SEEK_HOLE with the kernel's (every byte was data: `cp --sparse` and `tar -S`
lost the holes).

The upper file's map of holes is not always what a reader sees: a shared writable mmap
dirties pages of the kernel's own cache, which reach the upper file only at writeback.  While
a file is open for writing through the page cache, the daemon answers as for a file without
holes (never hiding data); the kernel's writeback cache makes it leave LSEEK to the kernel.
"""

from __future__ import annotations

import errno
import mmap
import os
from pathlib import Path

import pytest

from tests.mounts import LayerfsMount, on_both
from unionfs import syscalls

pytestmark = pytest.mark.mount

KEEP_SIZE, PUNCH_HOLE, ZERO_RANGE = 0x01, 0x02, 0x10
MiB = 1 << 20


def _layers(root: Path) -> tuple[Path, Path, Path, Path]:
    lower, upper, work, mnt = (root / n for n in ("lower", "upper", "work", "mnt"))
    for p in (lower, upper, work, mnt):
        p.mkdir(parents=True)
    with open(lower / "sparse", "wb") as f:  # hole, data at 1 MiB, hole, data at 3 MiB, hole
        f.truncate(4 * MiB)
        f.seek(MiB)
        f.write(b"a" * 4096)
        f.seek(3 * MiB)
        f.write(b"b" * 4096)
    (lower / "full").write_bytes(os.urandom(256 << 10))
    return lower, upper, work, mnt


def _seek(path: Path, offsets: list[int]) -> list[object]:
    fd = os.open(path, os.O_RDONLY)
    try:
        out: list[object] = []
        for off in offsets:
            for whence in (os.SEEK_DATA, os.SEEK_HOLE):
                try:
                    out.append(os.lseek(fd, off, whence))
                except OSError as exc:
                    out.append(errno.errorcode[exc.errno])
        return out
    finally:
        os.close(fd)


def _scenario(mnt: Path) -> dict[str, object]:
    seen: dict[str, object] = {}
    offsets = [0, 4096, MiB, MiB + 4096, 2 * MiB, 3 * MiB + 100, 4 * MiB - 1, 4 * MiB]
    seen["lower sparse"] = _seek(mnt / "sparse", offsets)

    fd = os.open(mnt / "new", os.O_CREAT | os.O_RDWR, 0o644)
    syscalls.fallocate(fd, 0, 0, MiB)
    st = os.fstat(fd)
    seen["new"] = (st.st_size, st.st_blocks >= MiB // 512, os.pread(fd, MiB, 0) == bytes(MiB))
    os.close(fd)

    before = (mnt / "full").read_bytes()
    fd = os.open(mnt / "full", os.O_RDWR)  # a copy-up
    syscalls.fallocate(fd, KEEP_SIZE, 0, MiB)
    seen["keep size"] = os.fstat(fd).st_size
    syscalls.fallocate(fd, PUNCH_HOLE | KEEP_SIZE, 64 << 10, 64 << 10)
    syscalls.fallocate(fd, ZERO_RANGE, 200 << 10, 8 << 10)
    syscalls.fallocate(fd, ZERO_RANGE, 250 << 10, 10 << 10)  # past the end: the size grows
    seen["size after"] = os.fstat(fd).st_size
    try:
        syscalls.fallocate(fd, PUNCH_HOLE, 0, 4096)  # a punch must keep the size
    except OSError as exc:
        seen["punch without keep size"] = errno.errorcode[exc.errno]
    os.close(fd)
    after = (mnt / "full").read_bytes()
    expect = bytearray(before)
    expect[64 << 10 : 128 << 10] = bytes(64 << 10)
    expect[200 << 10 : 208 << 10] = bytes(8 << 10)
    expect[250 << 10 :] = bytes(10 << 10)
    seen["data after"] = after == bytes(expect)
    seen["upper holes"] = _seek(mnt / "full", [0, 64 << 10, 100 << 10, 128 << 10, 259 << 10])
    return seen


def test_fallocate_and_seek_hole_as_kernel_overlayfs(tmp_path, fuse, root):
    seen = on_both(tmp_path, _layers, _scenario)
    want, got = seen["kernel"], seen["layerfs"]
    assert want["data after"] is True and want["lower sparse"][0] == MiB  # the oracle itself
    assert got == want


@pytest.mark.parametrize("opts", ["", "passthrough=0,writeback=0", "writeback=1"])
def test_seek_data_never_hides_data_the_kernel_holds(tmp_path, fuse, opts):
    lo, up, wk, mnt = _layers(tmp_path)
    with LayerfsMount(mnt, [lo], up, wk, extra_opts=opts):
        path = mnt / "sparse"
        fd = os.open(path, os.O_RDWR)  # copied up with its holes; cached, not passed through
        m = mmap.mmap(fd, 4 * MiB, mmap.MAP_SHARED)
        m[2 * MiB : 2 * MiB + 1] = b"x"  # a dirty page in a hole of the upper file, not synced
        reader = os.open(path, os.O_RDONLY)
        assert os.lseek(reader, MiB + 4096, os.SEEK_DATA) <= 2 * MiB
        assert os.lseek(reader, 2 * MiB, os.SEEK_HOLE) > 2 * MiB
        m.close()
        os.close(fd)  # the last writer: its pages are written back before RELEASE
        os.close(reader)
        reader = os.open(path, os.O_RDONLY)
        data = os.lseek(reader, MiB + 4096, os.SEEK_DATA)
        hole = os.lseek(reader, 2 * MiB, os.SEEK_HOLE)
        os.close(reader)
        assert path.read_bytes()[2 * MiB] == ord("x")
        if "writeback=1" in opts:  # LSEEK left to the kernel: a file without holes
            assert (data, hole) == (MiB + 4096, 4 * MiB)
        else:  # no writer left: the upper file's holes, exactly
            assert data == 2 * MiB and hole == 2 * MiB + 4096
