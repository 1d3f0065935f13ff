"""A full upper filesystem, out of space or out of inodes: what a container that fills its
disk meets.  The same steps on kernel overlayfs and on layerfs, each with its upper on a
small tmpfs (2 MiB, or 24 inodes), give the same outcomes (ENOSPC where the kernel gives
it, and nothing else), and nothing is lost or left half-done: a copy-up that does not fit
leaves the lower file shown whole, no partial copy stays in the upper or the work dir, the
mount keeps serving, and once space is freed the same changes go through; a remount shows
what the user last saw.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.layerdata import write
from tests.mounts import KernelOverlay, LayerfsMount

pytestmark = pytest.mark.mount

BIG = 1 << 20  # half of what the upper's filesystem holds


def _outcome(fn) -> tuple[str, Any]:
    try:
        return ("ok", fn())
    except OSError as exc:
        return ("err", errno.errorcode[exc.errno])


def _append(path: Path, data: bytes) -> None:
    with open(path, "ab") as f:
        f.write(data)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _shown(mnt: Path) -> list[str]:
    return sorted(os.listdir(mnt))


@contextlib.contextmanager
def _small_upper(fs: Path, size: str) -> Iterator[tuple[Path, Path]]:
    """An upper and a work dir on a tmpfs of `size` (its mount option) made at `fs`, and
    unmounted after the block."""
    fs.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", size, "layertest", str(fs)], check=True,
                   timeout=30)  # fmt: skip
    try:
        up, wk = fs / "u", fs / "w"
        up.mkdir()
        wk.mkdir()
        yield up, wk
    finally:
        subprocess.run(["umount", str(fs)], timeout=30)


def _steps(mnt: Path) -> list[tuple[str, Any]]:
    r: list[tuple[str, Any]] = []
    filled = 0
    while filled < 100:
        step = _outcome(lambda n=filled: _append(mnt / f"new{n}", b"x" * 100_000))
        if step[0] == "err":
            r.append(("filling stops", filled, step))
            break
        filled += 1
    r.append(("copy-up that does not fit", _outcome(lambda: _append(mnt / "big", b"!"))))
    r.append(("the lower file, whole", _outcome(lambda: _digest(mnt / "big"))))
    r.append(("unlink of a lower file", _outcome(lambda: os.unlink(mnt / "d/f1"))))
    r.append(("mkdir", _outcome(lambda: os.mkdir(mnt / "newdir"))))
    r.append(("rename of a lower dir", _outcome(lambda: os.rename(mnt / "d2", mnt / "d2m"))))
    r.append(("copy-up of a small file", _outcome(lambda: _append(mnt / "d/f2", b"!"))))
    r.append(("chmod of a lower file", _outcome(lambda: os.chmod(mnt / "d/f3", 0o600))))
    r.append(("d/f2", _outcome(lambda: (mnt / "d/f2").read_bytes())))
    r.append(("d", _outcome(lambda: _shown(mnt / "d"))))
    r.append(("/", _outcome(lambda: _shown(mnt))))
    for i in range(filled + 1):
        (mnt / f"new{i}").unlink(missing_ok=True)
    r.append(("freed: copy-up of the big file", _outcome(lambda: _append(mnt / "big", b"!"))))
    r.append(("its size", _outcome(lambda: os.stat(mnt / "big").st_size)))
    r.append(("freed: copy-up of a small file", _outcome(lambda: _append(mnt / "d/f2", b"!"))))
    r.append(("freed: chmod", _outcome(lambda: os.chmod(mnt / "d/f3", 0o600))))
    r.append(("d/f2", _outcome(lambda: (mnt / "d/f2").read_bytes())))
    r.append(("d/f3 mode", _outcome(lambda: oct(os.stat(mnt / "d/f3").st_mode))))
    return r


def test_a_full_upper_gives_enospc_and_loses_nothing(tmp_path, fuse, root):
    results, after, work = {}, {}, {}
    for engine in ("kernel", "layerfs"):
        base = tmp_path / engine
        lo, upfs, mnt = base / "lo", base / "upfs", base / "mnt"
        # the same bytes on both sides
        write(lo / "big", bytes(range(256)) * (BIG // 256))
        for i in (1, 2, 3):
            write(lo / f"d/f{i}", b"f%d\n" % i)
        write(lo / "d2/x", b"x\n")
        mnt.mkdir()
        with _small_upper(upfs, "size=2m") as (up, wk):
            mount = KernelOverlay if engine == "kernel" else LayerfsMount
            with mount(mnt, [lo], up, wk, "redirect_dir=on"):
                results[engine] = _steps(mnt)
                seen = {p: _digest(mnt / p) for p in ("big", "d/f2", "d/f3", "d2m/x")}
            with mount(mnt, [lo], up, wk, "redirect_dir=on"):
                after[engine] = {p: _digest(mnt / p) for p in seen}
                assert after[engine] == seen, engine
            if engine == "layerfs":  # its own bookkeeping only: no partial copy ("t<N>")
                work[engine] = {p.name for p in (wk / "layerfs").iterdir()}
    assert results["layerfs"] == results["kernel"]
    steps = dict(r[:2] for r in results["layerfs"])
    assert steps["copy-up that does not fit"] == ("err", "ENOSPC")  # the test means something
    assert steps["freed: copy-up of the big file"] == ("ok", None)
    assert after["layerfs"] == after["kernel"]
    assert work["layerfs"] <= {"control", "whiteout"}


def _inode_steps(mnt: Path) -> list[tuple[str, Any]]:
    """With no inode left, every change that needs a new upper object (a copied-up parent,
    a whiteout, a new object) is refused; once inodes are freed, they go through."""
    r: list[tuple[str, Any]] = []
    filled = 0
    while filled < 200:
        step = _outcome(lambda n=filled: (mnt / f"new{n}").write_bytes(b"x"))
        if step[0] == "err":
            r.append(("filling stops", step))
            break
        filled += 1
    changes = [
        ("unlink in a lower dir", lambda: os.unlink(mnt / "d/f1")),
        ("unlink at the top", lambda: os.unlink(mnt / "g")),
        ("rename of a lower file", lambda: os.rename(mnt / "h", mnt / "h2")),
        ("rename of a lower dir", lambda: os.rename(mnt / "d2", mnt / "d2m")),
        ("rmdir of a lower dir", lambda: os.rmdir(mnt / "e")),
        ("mkdir", lambda: os.mkdir(mnt / "nd")),
        ("symlink", lambda: os.symlink("x", mnt / "sl")),
        ("link of a lower file", lambda: os.link(mnt / "d/f2", mnt / "lk")),
        ("chmod of a lower file", lambda: os.chmod(mnt / "d/f3", 0o600)),
    ]
    r += [(name, _outcome(fn)) for name, fn in changes]
    r.append(("/", _outcome(lambda: [n for n in _shown(mnt) if not n.startswith("new")])))
    r.append(("d", _outcome(lambda: _shown(mnt / "d"))))
    for i in range(filled):
        (mnt / f"new{i}").unlink()
    r += [("freed: " + name, _outcome(fn)) for name, fn in changes]
    r.append(("/", _outcome(lambda: _shown(mnt))))
    r.append(("d", _outcome(lambda: _shown(mnt / "d"))))
    return r


def test_an_upper_out_of_inodes_gives_enospc_and_loses_nothing(tmp_path, fuse, root):
    results, after = {}, {}
    for engine in ("kernel", "layerfs"):
        base = tmp_path / engine
        lo, upfs, mnt = base / "lo", base / "upfs", base / "mnt"
        for i in (1, 2, 3):
            write(lo / f"d/f{i}", b"f%d\n" % i)
        for name in ("g", "h", "d2/x"):
            write(lo / name, name.encode())
        (lo / "e").mkdir()
        mnt.mkdir()
        # room for the kernel's work dir and a few objects: filled up by the steps
        with _small_upper(upfs, "nr_inodes=24") as (up, wk):
            mount = KernelOverlay if engine == "kernel" else LayerfsMount
            with mount(mnt, [lo], up, wk, "redirect_dir=on"):
                results[engine] = _inode_steps(mnt)
            with mount(mnt, [lo], up, wk, "redirect_dir=on"):
                after[engine] = (_shown(mnt), _shown(mnt / "d"), (mnt / "lk").read_bytes())
    assert results["layerfs"] == results["kernel"]
    steps = dict(results["layerfs"])
    assert steps["unlink in a lower dir"] == ("err", "ENOSPC")  # the test means something
    assert steps["freed: unlink in a lower dir"] == ("ok", None)
    assert after["layerfs"] == after["kernel"]


def _full_mount_steps(mnt: Path) -> list[tuple[str, Any]]:
    return [
        ("read-only", bool(os.statvfs(mnt).f_flag & os.ST_RDONLY)),
        ("listing", _shown(mnt)),
        ("read", _outcome(lambda: (mnt / "f").read_bytes())),
        ("create", _outcome(lambda: (mnt / "new").touch())),
        ("append", _outcome(lambda: _append(mnt / "f", b"+"))),
        ("unlink", _outcome(lambda: (mnt / "f").unlink())),
    ]


def test_an_upper_too_full_for_the_work_dir_mounts_read_only(tmp_path, fuse, root):
    """An upper filesystem with no inode left for the work directory: the kernel mounts
    read-only ("failed to create directory ...; mounting read-only"), so what is on the full
    disk can still be read, and so does layerfs now.  Before, `layerfs` refused to mount
    (ENOSPC making its work dir), also when the dir was there from an earlier mount, since
    it is made afresh at each one (xfstests' first run met it after a test filled the
    scratch filesystem)."""
    results = {}
    for engine in ("kernel", "layerfs"):
        base = tmp_path / engine
        lo, upfs, mnt = base / "lo", base / "upfs", base / "mnt"
        write(lo / "f", b"lower\n")
        mnt.mkdir()
        with _small_upper(upfs, "nr_inodes=16") as (up, wk):
            for i in range(64):  # every inode left
                try:
                    (up / f"u{i}").touch()
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC
                    break
            mount = KernelOverlay if engine == "kernel" else LayerfsMount
            with mount(mnt, [lo], up, wk):
                results[engine] = _full_mount_steps(mnt)
    assert results["layerfs"] == results["kernel"]
    steps = dict(results["layerfs"])
    assert steps["read-only"] is True and steps["create"] == ("err", "EROFS")


def test_a_mount_whose_control_socket_cannot_be_made_stays_mounted(tmp_path, fuse, root):
    """The control socket (freezing for `layer commit --live`) is made in the work dir once
    the mount is live.  When it could not be made, the daemon ended and unmounted what was
    already in use: xfstests overlay/078 shuts the filesystem down right after a mount, and
    the next `umount` found nothing.  Kernel overlayfs stays mounted; so does layerfs now,
    without the socket, saying so in its log.  Here the upper's tmpfs runs out of inodes
    just before the socket (found by trying a few sizes)."""
    import time

    write(tmp_path / "lo/f", b"lower\n")
    hit = False
    for inodes in range(4, 9):
        base = tmp_path / str(inodes)
        base.mkdir()
        mnt, log = base / "mnt", base / "daemon.log"
        mnt.mkdir()
        with (
            _small_upper(base / "fs", f"nr_inodes={inodes}") as (up, wk),
            LayerfsMount(mnt, [tmp_path / "lo"], up, wk, log_path=log) as m,
        ):
            time.sleep(0.3)  # the socket is made after the mount answers
            assert m.proc is not None and m.proc.poll() is None, log.read_text()
            assert (mnt / "f").read_bytes() == b"lower\n"
            assert os.path.ismount(mnt)
            hit = "cannot make the control socket" in log.read_text()
        if hit:
            break
    assert hit, "no size of the upper made the control socket fail"
