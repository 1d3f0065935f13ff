"""statx(2)'s birth time through a mount: kernel overlayfs reports the real file's (the
topmost one: a copied-up file's is its copy-up's), so `stat` prints a "Birth" line.  layerfs
answered FUSE_STATX ENOSYS, so the kernel never asked again and `stat` printed "Birth: -".
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.mounts import KernelOverlay, LayerfsMount
from unionfs import syscalls

pytestmark = pytest.mark.mount


def _layers(root: Path) -> tuple[Path, Path, Path, Path]:
    lower, upper, work, mnt = (root / n for n in ("lower", "upper", "work", "mnt"))
    for p in (upper, work, mnt):
        p.mkdir(parents=True)
    (lower / "d").mkdir(parents=True)
    (lower / "f").write_bytes(b"lower\n")
    (lower / "g").write_bytes(b"copied up\n")
    (lower / "s").symlink_to("f")
    return lower, upper, work, mnt


def _birth(path: Path) -> tuple[int, int] | None:
    return syscalls.btime(os.fsencode(path))


def _check(lower: Path, upper: Path, mnt: Path) -> None:
    real = _birth(lower / "f")
    assert real is not None, "the test's filesystem keeps no birth time"
    for name in ("f", "s", "d"):
        assert _birth(mnt / name) == _birth(lower / name), name
    os.chmod(mnt / "g", 0o600)  # a copy-up: the upper copy's birth time from now on
    assert _birth(mnt / "g") == _birth(upper / "g") != _birth(lower / "g")
    (mnt / "new").write_bytes(b"new\n")
    assert _birth(mnt / "new") == _birth(upper / "new")
    fd = os.open(mnt / "new", os.O_RDONLY)
    try:
        born = _birth(mnt / "new")
        os.unlink(mnt / "new")
        assert syscalls.btime(b"", fd) == born  # statx of an open file whose name is gone
    finally:
        os.close(fd)


def test_birth_time_as_kernel_overlayfs(tmp_path, fuse, root):
    klo, kup, kwk, kmnt = _layers(tmp_path / "kernel")
    with KernelOverlay(kmnt, [klo], kup, kwk):
        _check(klo, kup, kmnt)  # the oracle: the same checks hold on the kernel
    lo, up, wk, mnt = _layers(tmp_path / "layerfs")
    with LayerfsMount(mnt, [lo], up, wk):
        _check(lo, up, mnt)


def test_birth_time_on_a_read_only_stack(tmp_path, fuse):
    lo, _, _, mnt = _layers(tmp_path)
    with LayerfsMount(mnt, [lo]):
        for name in ("f", "s", "d", "."):
            assert _birth(mnt / name) == _birth(lo / name) is not None, name
