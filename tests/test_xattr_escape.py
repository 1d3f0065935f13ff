"""Overlay xattrs of an overlay mounted on top of this one (nesting), escaped as kernel
overlayfs escapes them since Linux 6.7: a user's `trusted.overlay.X` is kept in the layers
as `trusted.overlay.overlay.X`, which this mount does not read as its own state, and shown
unescaped again.  So a kernel overlay whose lower layers are directories inside a layerfs
mount (container storage inside a container's image, composefs-style) reads its opaque
directories and redirects there.  layerfs hid every `trusted.overlay.*` xattr and refused
to set one (EPERM), so such an inner overlay merged directories that were opaque.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.mounts import LayerfsMount, is_mounted, lazy_unmount, on_both
from tests.ops import value_or_errno

pytestmark = pytest.mark.mount


def _layers(root: Path) -> tuple[Path, Path, Path, Path]:
    lower, upper, work, mnt = (root / n for n in ("lower", "upper", "work", "mnt"))
    for p in (upper, work, mnt, root / "iu", root / "iw", root / "n"):
        p.mkdir(parents=True)
    (lower / "in/low1/d").mkdir(parents=True)
    (lower / "in/low2/d").mkdir(parents=True)
    (lower / "in/low1/d/f").write_bytes(b"f\n")
    (lower / "in/low2/d/g").write_bytes(b"g\n")
    os.setxattr(lower / "in/low2/d", "trusted.overlay.overlay.opaque", b"y")  # escaped
    (lower / "kept").write_bytes(b"k\n")
    os.setxattr(lower / "kept", "trusted.overlay.overlay.foo", b"1")
    return lower, upper, work, mnt


def _scenario(mnt: Path) -> dict[str, object]:
    root, upper = mnt.parent, mnt.parent / "upper"  # as `_layers` made them
    seen: dict[str, object] = {}
    seen["shown"] = sorted(os.listxattr(mnt / "in/low2/d"))
    seen["value"] = os.getxattr(mnt / "in/low2/d", "trusted.overlay.opaque")
    inner = root / "n"
    opts = f"lowerdir={mnt}/in/low2:{mnt}/in/low1,upperdir={root}/iu,workdir={root}/iw"
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, str(inner)], check=True)
    try:
        seen["inner opaque dir"] = sorted(os.listdir(inner / "d"))
    finally:
        subprocess.run(["umount", str(inner)], check=False)
        if is_mounted(inner):
            lazy_unmount(str(inner))
    # in a directory new in the upper: a directory made in a merged one may carry the
    # engine's own opaque mark (the kernel's, with redirect_dir=on), which is not the point
    (mnt / "nx/x").mkdir(parents=True)
    os.setxattr(mnt / "nx/x", "trusted.overlay.redirect", b"/elsewhere")
    seen["set"] = (os.getxattr(mnt / "nx/x", "trusted.overlay.redirect"),
                   os.getxattr(upper / "nx/x", "trusted.overlay.overlay.redirect"))  # fmt: skip
    seen["listed"] = sorted(os.listxattr(mnt / "nx/x"))
    os.removexattr(mnt / "nx/x", "trusted.overlay.redirect")
    seen["removed"] = sorted(os.listxattr(upper / "nx/x"))
    os.chmod(mnt / "kept", 0o600)  # a copy-up carries the escaped xattr, not the origin
    seen["copied up"] = (sorted(os.listxattr(mnt / "kept")),
                         os.getxattr(upper / "kept", "trusted.overlay.overlay.foo"))  # fmt: skip
    seen["absent"] = value_or_errno(lambda: os.getxattr(mnt / "kept", "trusted.overlay.origin"))
    return seen


def test_nested_overlay_markers_as_kernel_overlayfs(tmp_path, fuse, root):
    seen = on_both(tmp_path, _layers, _scenario)
    want, got = seen["kernel"], seen["layerfs"]
    assert want["inner opaque dir"] == ["g"] and want["shown"] == ["trusted.overlay.opaque"]
    assert got == want


def test_own_markers_stay_out_of_reach(tmp_path, fuse, root):
    lo, up, wk, mnt = _layers(tmp_path)
    with LayerfsMount(mnt, [lo], up, wk):
        for name in ("trusted.layerfs.x", "user.layerfs.x", "user.fuseoverlayfs.opaque"):
            assert value_or_errno(os.setxattr, mnt / "kept", name, b"y") == "EPERM", name
        (mnt / "n/d").mkdir(parents=True)  # in a new directory: no opaque mark of its own
        os.setxattr(mnt / "n/d", "trusted.overlay.opaque", b"y")  # escaped: not a marker
        assert "trusted.overlay.opaque" not in os.listxattr(up / "n/d")
