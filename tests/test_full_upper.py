"""A full upper filesystem: what a container that fills its disk meets.  The same steps on
kernel overlayfs and on layerfs, each with its upper on a 2 MiB tmpfs, give the same
outcomes (ENOSPC where the kernel gives it, and nothing else), and nothing is lost or left
half-done: a copy-up that does not fit leaves the lower file shown whole, no partial copy
stays in the upper or the work dir, the mount keeps serving, and once space is freed the
same changes go through; a remount shows what the user last saw.
"""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
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
        upfs.mkdir()
        mnt.mkdir()
        tmpfs = ["mount", "-t", "tmpfs", "-o", "size=2m", "layertest", str(upfs)]
        subprocess.run(tmpfs, check=True, timeout=30)
        try:
            up, wk = upfs / "u", upfs / "w"
            up.mkdir()
            wk.mkdir()
            mount = KernelOverlay if engine == "kernel" else LayerfsMount
            with mount(mnt, [lo], up, wk, "redirect_dir=on"):
                results[engine] = _steps(mnt)
                seen = {p: _digest(mnt / p) for p in ("big", "d/f2", "d/f3", "d2m/x")}
            with mount(mnt, [lo], up, wk, "redirect_dir=on"):
                after[engine] = {p: _digest(mnt / p) for p in seen}
                assert after[engine] == seen, engine
            if engine == "layerfs":  # its own bookkeeping only: no partial copy ("t<N>")
                work[engine] = {p.name for p in (wk / "layerfs").iterdir()}
        finally:
            subprocess.run(["umount", str(upfs)], timeout=30)
    assert results["layerfs"] == results["kernel"]
    steps = dict(r[:2] for r in results["layerfs"])
    assert steps["copy-up that does not fit"] == ("err", "ENOSPC")  # the test means something
    assert steps["freed: copy-up of the big file"] == ("ok", None)
    assert after["layerfs"] == after["kernel"]
    assert work["layerfs"] <= {"control", "whiteout"}
