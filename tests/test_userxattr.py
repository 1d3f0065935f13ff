"""`userxattr` given as root, as kernel overlayfs takes it: the mount keeps its state in
`user.overlay.*` only (opaque directories, redirects, whiteouts made by xattr), reads none
from `trusted.overlay.*`, which is then a user's own xattr like any other (kept and shown as
it is, not escaped), and neither follows nor makes directory redirects (`redirect_dir`
other than `nofollow`, and `metacopy=on`, conflict with it).  layerfs refused the option as
root before (xfstests overlay/084, 088).  Every case runs on the kernel first, each engine
over its own copy of the layers.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.mounts import LAYERFS, KernelOverlay, LayerfsMount, overlay_options
from tests.ops import value_or_errno

pytestmark = pytest.mark.mount


def _layers(root: Path) -> dict[str, Path]:
    p = {n: root / n for n in ("lower", "upper", "work", "mnt")}
    for d in p.values():
        d.mkdir(parents=True)
    for name in ("uo", "to"):  # a directory in both layers, marked opaque in the upper
        (p["lower"] / name).mkdir()
        (p["lower"] / name / "below").write_bytes(b"lower\n")
        (p["upper"] / name).mkdir()
        (p["upper"] / name / "above").write_bytes(b"upper\n")
    os.setxattr(p["upper"] / "uo", "user.overlay.opaque", b"y")  # the marker with userxattr
    os.setxattr(p["upper"] / "to", "trusted.overlay.opaque", b"y")  # a user's xattr then
    (p["lower"] / "d").mkdir()
    (p["lower"] / "d" / "f").write_bytes(b"f\n")
    (p["lower"] / "gone").write_bytes(b"gone\n")
    (p["lower"] / "m").mkdir()  # a lower directory: moving it needs a redirect
    (p["lower"] / "c").write_bytes(b"copied\n")
    return p


def _xattrs(path: Path) -> dict[str, bytes]:
    return {n: os.getxattr(path, n) for n in sorted(os.listxattr(path)) if "overlay" in n}


def _steps(mnt: Path) -> dict[str, Any]:
    out: dict[str, Any] = {
        "uo": sorted(os.listdir(mnt / "uo")),
        "to": sorted(os.listdir(mnt / "to")),
        "to xattrs": _xattrs(mnt / "to"),
    }
    (mnt / "n").mkdir()
    os.setxattr(mnt / "n", "trusted.overlay.opaque", b"y")
    os.setxattr(mnt / "n", "user.overlay.opaque", b"y")
    out["n xattrs"] = _xattrs(mnt / "n")
    (mnt / "gone").unlink()
    (mnt / "d" / "f").unlink()
    os.rmdir(mnt / "d")
    (mnt / "d").mkdir()  # over a removed lower directory: opaque
    out["rename lower dir"] = value_or_errno(os.rename, mnt / "m", mnt / "m2")
    with open(mnt / "c", "ab") as f:  # a copy-up: its origin in user.overlay.origin
        f.write(b"more\n")
    out["listing"] = sorted(os.listdir(mnt))
    return out


def test_userxattr_as_root_keeps_state_in_user_xattrs_only(tmp_path, fuse, root):
    got = {}
    for engine in ("kernel", "layerfs"):
        p = _layers(tmp_path / engine)
        cls = KernelOverlay if engine == "kernel" else LayerfsMount
        with cls(p["mnt"], [p["lower"]], p["upper"], p["work"], extra_opts="userxattr"):
            seen = _steps(p["mnt"])
        up = p["upper"]
        seen["upper n"] = _xattrs(up / "n")
        seen["upper d"] = _xattrs(up / "d")
        seen["upper gone"] = os.stat(up / "gone").st_rdev if (up / "gone").exists() else None
        seen["upper c"] = sorted(os.listxattr(up / "c"))
        with cls(p["mnt"], [p["lower"]], p["upper"], p["work"], extra_opts="userxattr"):
            seen["remounted d"] = sorted(os.listdir(p["mnt"] / "d"))
            # the copy keeps its lower file's number over the remount (by that origin)
            seen["c keeps its number"] = (
                os.stat(p["mnt"] / "c").st_ino == os.stat(p["lower"] / "c").st_ino
            )
        got[engine] = seen
    k = got["kernel"]
    # the oracle: user.overlay.opaque is the marker, trusted.overlay.opaque a plain xattr
    assert k["uo"] == ["above"] and k["to"] == ["above", "below"]
    assert k["n xattrs"] == {"trusted.overlay.opaque": b"y", "user.overlay.opaque": b"y"}
    assert k["upper n"] == {"trusted.overlay.opaque": b"y", "user.overlay.overlay.opaque": b"y"}
    assert k["upper d"] == {"user.overlay.opaque": b"y"}
    assert k["rename lower dir"] == "EXDEV" and k["remounted d"] == []
    assert k["upper c"] == ["user.overlay.origin"] and k["c keeps its number"]
    assert got["layerfs"] == k


@pytest.mark.parametrize("opts", ["userxattr,redirect_dir=on", "userxattr,metacopy=on"])
def test_userxattr_conflicts_as_on_the_kernel(tmp_path, root, opts):
    p = _layers(tmp_path)
    full = overlay_options([p["lower"]], p["upper"], p["work"]) + "," + opts
    k = subprocess.run(["mount", "-t", "overlay", "overlay", "-o", full, str(p["mnt"])],
                       capture_output=True, text=True)  # fmt: skip
    if k.returncode == 0:
        subprocess.run(["umount", str(p["mnt"])], check=True)
    r = subprocess.run([LAYERFS, "-o", full, str(p["mnt"])], capture_output=True, text=True)
    if r.returncode == 0:
        subprocess.run(["umount", str(p["mnt"])], check=True)
    assert k.returncode != 0
    assert r.returncode != 0 and "conflicting options: userxattr" in r.stderr
