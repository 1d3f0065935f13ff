"""The demo's built-in sample: three small layer directories in the kernel-overlayfs format.

    base    etc/{os-release,motd,hostname}, usr/bin/hello (+ hard link hi, symlink greet),
            var/cache/apt/{pkgcache.bin,srcpkgcache.bin}
    middle  etc/motd: whiteout (char device 0/0); etc/.wh.hostname: OCI whiteout;
            var/cache/apt/: opaque directory holding only fresh.bin
    top     etc/app.conf: a new file

`build_sample(root)` writes them under ROOT/layers/ and returns them base-first.  Not
idempotent: ROOT must be fresh.  Where the machine refuses the preferred encoding (mknod or
the opaque xattr), the OCI encoding, which layerfs also reads, is used instead and the
layer's `notes` say so.  Writes files only; prints nothing.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass, field
from pathlib import Path

from unionfs import markers

MOTD = "Welcome! This line lives in the base layer.\n"
HELLO = '#!/bin/sh\necho "hello from the base layer"\n'


@dataclass
class Layer:
    """One layer directory of the sample, with what the demo should say about it."""

    name: str
    path: Path
    role: str
    notes: list[str] = field(default_factory=list)


def build_sample(root: Path) -> list[Layer]:
    """Create ROOT/layers/{base,middle,top}; returns them base-first."""
    layers = [
        Layer("base", root / "layers" / "base", "a small OS tree"),
        Layer("middle", root / "layers" / "middle", "deletes and replaces things below it"),
        Layer("top", root / "layers" / "top", "adds a file"),
    ]
    for layer in layers:
        layer.path.mkdir(parents=True)
    _build_base(layers[0].path)
    _build_middle(layers[1])
    _build_top(layers[2].path)
    return layers


def _write(path: Path, text: str | bytes, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = text.encode() if isinstance(text, str) else text
    path.write_bytes(data)
    path.chmod(mode)


def _build_base(base: Path) -> None:
    _write(base / "etc/os-release", 'NAME="Layer Demo Linux"\nID=layerdemo\nVERSION_ID="1"\n')
    _write(base / "etc/motd", MOTD)
    _write(base / "etc/hostname", "base-host\n")
    _write(base / "usr/bin/hello", HELLO, 0o755)
    os.link(base / "usr/bin/hello", base / "usr/bin/hi")
    os.symlink("hello", base / "usr/bin/greet")
    _write(base / "var/cache/apt/pkgcache.bin", bytes(range(256)) * 16)
    _write(base / "var/cache/apt/srcpkgcache.bin", bytes(range(256)) * 8)


def _build_middle(layer: Layer) -> None:
    middle = layer.path
    (middle / "etc").mkdir()
    if not _chardev_whiteout(middle / "etc/motd"):
        layer.notes.append("mknod 0/0 refused here: etc/motd is hidden with an OCI .wh. file")
        _write(middle / "etc" / os.fsdecode(markers.oci_whiteout_name(b"motd")), b"")
    _write(middle / "etc" / os.fsdecode(markers.oci_whiteout_name(b"hostname")), b"")
    apt = middle / "var/cache/apt"
    apt.mkdir(parents=True)
    if not _mark_opaque(apt):
        layer.notes.append("opaque xattr refused here: var/cache/apt uses .wh..wh..opq")
        _write(apt / markers.WH_OPAQUE.decode(), b"")
    _write(apt / "fresh.bin", b"cache rebuilt by the middle layer\n")


def _build_top(top: Path) -> None:
    _write(top / "etc/app.conf", "greeting = hello\nlayers = 3\n")


def _chardev_whiteout(path: Path) -> bool:
    """A kernel-overlayfs whiteout; False when mknod is not allowed (old kernel, no root)."""
    try:
        markers.make_whiteout(os.fsencode(path))
    except PermissionError:
        return False
    return True


def _mark_opaque(path: Path) -> bool:
    """trusted.overlay.opaque=y as root, user.overlay.opaque=y otherwise; False if refused."""
    try:
        markers.set_opaque(os.fsencode(path))
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EPERM, errno.EACCES):
            return False
        raise
    return True
