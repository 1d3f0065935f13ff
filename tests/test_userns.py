"""layerfs as uid 0 of a user namespace: how rootless podman runs its mount_program.

There the daemon is uid 0 but may not set trusted.* xattrs (that needs CAP_SYS_ADMIN in the
host's user namespace), so its markers must go to user.overlay.*, as kernel overlayfs's
`userxattr` option puts them.  Before, layerfs chose trusted.* for any uid 0: a directory
made over a removed lower one, or a moved one, failed with EPERM, and so (once directories
were marked impure) did every copy-up.  The same steps run in a user namespace on kernel
overlayfs (`userxattr`) and on layerfs; what the user sees must agree, layerfs's upper must
hold user.overlay.* markers only, and read the same after a remount, by layerfs and by
the kernel.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests import imagedata
from tests.mounts import LAYERFS, need, require_fuse

pytestmark = pytest.mark.mount

NOBODY = 65534

# Runs inside the namespace: mounts with $ENGINE (twice: the steps, then a remount that only
# reads), prints what a user sees; unmounts whatever happens.
SCRIPT = r"""
B=$1; ENGINE=$2; STEPS=$3
m=$B/mnt
mnt() {
    if [ "$ENGINE" = kernel ]; then
        mount -t overlay overlay -o userxattr,lowerdir=$B/lo,upperdir=$B/up,workdir=$B/wk $m
    else
        "$LAYERFS" -o lowerdir=$B/lo,upperdir=$B/up,workdir=$B/wk,log=$B/daemon.log $m
    fi
}
show() {
    cd $m && find . | sort | while read -r p; do
        if [ -f "$p" ]; then echo "$p $(stat -c %a "$p") $(head -c 40 "$p" | tr '\n' ' ')"
        else echo "$p $(stat -c %F "$p")"; fi
    done
    getfattr -n user.x --only-values $m/d/f2 2>&1 | sed "s|$m/||"
    cd /
}
r() { "$@" 2>&1 | sed "s|$m/||g"; }
mnt || exit 1
if [ "$STEPS" = 1 ]; then
    r sh -c "echo more >> $m/d/f1"
    r rm $m/g
    r rm -r $m/e
    r mkdir $m/e
    r mv $m/d/f3 $m/e/f3
    r chmod 600 $m/d/f2
    r setfattr -n user.x -v 1 $m/d/f2
    r ln -s f1 $m/d/s
    r cat $m/big > /dev/null  # a file big enough to pass through, where that can be had
fi
show
umount $m
"""


def _run(base: Path, engine: str, steps: bool) -> str:
    """SCRIPT as uid 0 of a new user namespace (mapped to nobody), with its own mounts."""
    cmd = [
        "setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
        "unshare", "--user", "--map-root-user", "--mount",
        "sh", "-c", SCRIPT, "sh", str(base), engine, "1" if steps else "0",
    ]  # fmt: skip
    env = {**os.environ, "LAYERFS": LAYERFS}
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)
    finally:
        # the mount lives in the namespace, held by its daemon: gone with it
        subprocess.run(["pkill", "-KILL", "-f", f"upperdir={base}/up"], capture_output=True)
    assert r.returncode == 0, r.stderr
    return r.stdout


def _layers(base: Path) -> None:
    lo = base / "lo"
    for d in ("d", "e/sub"):
        (lo / d).mkdir(parents=True)
    for name in ("d/f1", "d/f2", "d/f3", "g", "e/sub/h"):
        (lo / name).write_text(f"{name}\n")
    (lo / "big").write_bytes(b"big\n" * (1 << 20))
    for p in ("up", "wk", "mnt"):
        (base / p).mkdir()
    for p in [base, *base.rglob("*")]:
        os.chown(p, NOBODY, NOBODY, follow_symlinks=False)


def _markers(upper: Path) -> set[str]:
    names = set()
    for p in [upper, *upper.rglob("*")]:
        names.update(os.listxattr(p, follow_symlinks=False))
    return {n for n in names if ".overlay." in n}


def test_markers_go_to_user_xattrs_in_a_user_namespace(fuse):
    need(os.geteuid() == 0, "needs root to switch to an unprivileged user")
    for tool in ("setpriv", "unshare", "getfattr", "pkill"):
        need(shutil.which(tool) is not None, f"{tool} is missing")
    require_fuse()
    need(os.stat("/dev/fuse").st_mode & 0o006 == 0o006, "/dev/fuse is not open to users here")
    root = Path(tempfile.mkdtemp(prefix="layer-userns-", dir="/tmp"))
    try:
        os.chmod(root, 0o755)
        seen = {}
        for engine in ("kernel", "layerfs"):
            base = root / engine
            base.mkdir()
            _layers(base)
            seen[engine] = _run(base, engine, steps=True)
        assert seen["layerfs"] == seen["kernel"]
        assert "e/f3" in seen["layerfs"] and "Operation not permitted" not in seen["layerfs"]
        # no passthrough asked for where it cannot be had (CAP_SYS_ADMIN, as trusted xattrs)
        log = (root / "layerfs" / "daemon.log").read_text()
        assert "passthrough" not in log and "Traceback" not in log, log
        markers = _markers(root / "layerfs" / "up")
        assert "user.overlay.opaque" in markers
        assert not any(n.startswith("trusted.") for n in markers), markers
        # the steps print nothing when they succeed: all there is, is what `show` printed
        assert _run(root / "layerfs", "layerfs", steps=False) == seen["layerfs"]
        assert _run(root / "layerfs", "kernel", steps=False) == seen["layerfs"]
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_pull_in_a_user_namespace_keeps_opaque_markers_in_user_xattrs(tmp_path):
    """`layer pull` as uid 0 of a user namespace: the store's unpacked layers say "opaque"
    with user.overlay.opaque (there, the trusted one is refused; before, every opaque
    directory was kept as an OCI `.wh..wh..opq` file, with a warning each)."""
    need(os.geteuid() == 0, "needs root to switch to an unprivileged user")
    for tool in ("setpriv", "unshare"):
        need(shutil.which(tool) is not None, f"{tool} is missing")
    base = Path(tempfile.mkdtemp(prefix="layer-userns-pull-", dir="/tmp"))
    try:
        os.chmod(base, 0o755)
        imagedata.write_oci_layout(base / "src")
        for p in [base, *base.rglob("*")]:
            os.chown(p, NOBODY, NOBODY)
        layer = str(Path(LAYERFS).parent / "layer")
        cmd = [
            "setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
            "unshare", "--user", "--map-root-user",
            layer, "pull", "--root", str(base / "store"), f"oci:{base / 'src'}",
        ]  # fmt: skip
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert "kept as a file" not in r.stderr, r.stderr
        layers = base / "store" / "layers"
        opaque = [
            p
            for p in layers.rglob("*")
            if p.is_dir() and "user.overlay.opaque" in os.listxattr(p, follow_symlinks=False)
        ]
        assert opaque, "no opaque directory in the sample's layers"
        assert not list(layers.rglob(".wh..wh..opq"))
    finally:
        shutil.rmtree(base, ignore_errors=True)
