"""Layer directories for tests, built with Python, using every marker kind layerfs reads.

`build_sample(root)` writes three layers (l0 bottom, l1, l2 top) and returns them top-first.
`to_kernel_format(src, dst)` copies a layer and converts the markers the kernel does not read
(OCI `.wh.` files, `user.overlay.opaque`, `user.fuseoverlayfs.opaque`, `.wh..wh..opq`) to
the kernel's own (char device 0/0, `trusted.overlay.opaque=y`), restoring directory mtimes
so the two trees stay comparable.
"""

from __future__ import annotations

import os
import socket
import stat
import subprocess
from pathlib import Path

WH = b".wh."
OPQ = b".wh..wh..opq"


def write(path: Path, data: bytes = b"", mode: int = 0o644, mtime: int | None = 1_600_000_000):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.chmod(path, mode)
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


def whiteout(path: Path) -> None:
    """Kernel-format whiteout: a character device 0/0."""
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(0, 0))


def oci_whiteout(path: Path) -> None:
    write(path.parent / (".wh." + path.name))


def opaque(path: Path, xattr: str = "trusted.overlay.opaque") -> None:
    path.mkdir(parents=True, exist_ok=True)
    os.setxattr(path, xattr, b"y")


def build_sample(root: Path) -> list[Path]:
    l0, l1, l2 = root / "l0", root / "l1", root / "l2"
    for d in (l0, l1, l2):
        d.mkdir(parents=True)
    # --- bottom layer: a small rootfs --------------------------------------------------
    write(l0 / "etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
    os.setxattr(l0 / "etc/passwd", "user.test", b"hello")
    write(l0 / "etc/hosts", b"127.0.0.1 localhost\n")
    write(l0 / "etc/motd", b"old motd\n")
    write(l0 / "etc/issue", b"Debian\n")
    write(l0 / "etc/shadow", b"secret\n", mode=0o640)
    os.chown(l0 / "etc/shadow", 0, 42)
    write(l0 / "bin/sh", b"#!/bin/true\n" * 100, mode=0o755)
    write(l0 / "bin/su", b"su", mode=0o4755)
    write(l0 / "bin/link1", b"linked\n")
    os.link(l0 / "bin/link1", l0 / "bin/link2")
    os.link(l0 / "bin/link1", l0 / "etc/link3")
    os.symlink("sh", l0 / "bin/sym")
    os.symlink("/etc/passwd", l0 / "bin/abs")
    os.symlink("nowhere", l0 / "bin/dangling")
    for name in "ab":
        write(l0 / "var/cache" / name, name.encode())
    for name in "cd":
        write(l0 / "var/lib" / name, name.encode())
    write(l0 / "var/log/e", b"e")
    write(l0 / "var/spool/f", b"f")
    write(l0 / "var/tmp/keep", b"k")
    os.chmod(l0 / "var/tmp", 0o1777)
    write(l0 / "opt/dirtofile/inner", b"inner")
    write(l0 / "opt/filetodir", b"was a file")
    write(l0 / "opt/gone/deep/file", b"deep")
    write(l0 / "srv/merged/m0", b"m0")
    write(l0 / "srv/merged/sub/s0", b"s0")
    write(l0 / "srv/xw/gone", b"will be whited out by xattr")
    write(l0 / "srv/xw/kept", b"kept")
    write(l0 / "srv/recreated/old", b"old")
    os.setxattr(l0 / "srv/merged", "user.dirattr", b"bottom")
    write(l0 / "data/big", os.urandom(3 << 20))
    with open(l0 / "data/sparse", "wb") as f:
        f.seek(64 << 20)
        f.write(b"end")
    (l0 / "empty").mkdir()
    for i in range(300):
        write(l0 / "many" / f"entry-{i:04d}-{'x' * 40}", str(i).encode())
    write(l0 / "names" / "with space", b"1")
    write(l0 / "names" / "ünïcode", b"2")
    write(Path(os.fsdecode(bytes(l0 / "names") + b"/raw\xffbyte")), b"3")
    write(l0 / "names" / ("n" * 255), b"4")
    (l0 / "dev").mkdir()
    os.mkfifo(l0 / "dev/fifo")
    if os.geteuid() == 0:
        os.mknod(l0 / "dev/null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
        os.mknod(l0 / "dev/loop0", stat.S_IFBLK | 0o660, os.makedev(7, 0))
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(l0 / "dev/sock"))
    sock.close()
    # --- middle layer: every marker kind -----------------------------------------------
    whiteout(l1 / "etc/motd")  # char device 0/0
    oci_whiteout(l1 / "etc/issue")  # .wh.issue
    whiteout(l1 / "bin/link1")  # one name of a hard-link group
    opaque(l1 / "var/cache")  # trusted.overlay.opaque=y
    write(l1 / "var/cache/new", b"new cache")
    opaque(l1 / "var/lib", "user.overlay.opaque")
    write(l1 / "var/lib/x", b"x")
    opaque(l1 / "var/log", "user.fuseoverlayfs.opaque")
    write(l1 / "var/spool/.wh..wh..opq")  # OCI opaque marker
    write(l1 / "var/spool/g", b"g")
    write(l1 / "opt/dirtofile", b"now a file")
    write(l1 / "opt/filetodir/z", b"now a dir")
    write(l1 / "srv/merged/m1", b"m1")
    write(l1 / "srv/merged/sub/s1", b"s1")
    os.setxattr(l1 / "srv/merged", "user.dirattr", b"middle")
    (l1 / "srv/xw").mkdir(parents=True)
    write(l1 / "srv/xw/gone", b"")
    os.setxattr(l1 / "srv/xw/gone", "trusted.overlay.whiteout", b"y")
    os.setxattr(l1 / "srv/xw", "trusted.overlay.opaque", b"x")
    whiteout(l1 / "srv/recreated")
    write(l1 / "hl/one", b"hard in middle")
    os.link(l1 / "hl/one", l1 / "hl/two")
    # --- top layer ------------------------------------------------------------------------
    write(l2 / "etc/motd", b"new motd\n")  # re-created over a whiteout
    whiteout(l2 / "opt/gone")  # a whole lower directory
    write(l2 / "srv/merged/m2", b"m2")
    write(l2 / "srv/merged/m0", b"m0 replaced")
    opaque(l2 / "srv/recreated")
    write(l2 / "srv/recreated/new", b"new")
    write(l2 / "top/only", b"only in the top layer")
    oci_whiteout(l2 / "var/tmp/keep")
    for d in (l0, l1, l2):
        _fix_dir_times(d)
    return [l2, l1, l0]


def _fix_dir_times(root: Path) -> None:
    for dirpath, _dirs, _files in os.walk(root, topdown=False):
        os.utime(dirpath, (1_600_000_000, 1_600_000_000))


def to_kernel_format(src: Path, dst: Path) -> Path:
    subprocess.run(["cp", "-a", str(src), str(dst)], check=True)
    for dirpath, dirnames, filenames in os.walk(dst, topdown=False):
        d = Path(dirpath)
        times = os.lstat(d)
        changed = False
        for name in list(filenames) + list(dirnames):
            raw = os.fsencode(name)
            if raw == OPQ:
                os.unlink(d / name)
                os.setxattr(d, "trusted.overlay.opaque", b"y")
                changed = True
            elif raw.startswith(WH):
                os.unlink(d / name)
                whiteout(Path(os.fsdecode(bytes(d) + b"/" + raw[len(WH) :])))
                changed = True
        for attr in ("user.overlay.opaque", "user.fuseoverlayfs.opaque"):
            try:
                value = os.getxattr(d, attr)
            except OSError:
                continue
            os.removexattr(d, attr)
            if value.rstrip(b"\0") == b"y":
                os.setxattr(d, "trusted.overlay.opaque", b"y")
        if changed:
            os.utime(d, ns=(times.st_atime_ns, times.st_mtime_ns))
    return dst
