"""The demo's second act: the same layers with a writable upper — copy-up and whiteouts.

Mounts the sample with an upper and a work dir, appends to a file of the base layer (the file
is copied up first), removes a base-layer file (a whiteout appears in the upper), renames a
base-layer directory (the kernel would say EXDEV), and shows what landed in the upper while
the base layer stays untouched.  Returns the failed checks; always unmounts.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING

from unionfs import markers

from . import mounts
from .demo_sample import Layer

if TYPE_CHECKING:
    from .console import Console


def show_copy_up(console: Console, layers: list[Layer], root: Path) -> list[str]:
    upper, work, mnt = root / "upper", root / "work", root / "merged-rw"
    for d in (upper, work, mnt):
        d.mkdir()
    lowers = [str(layer.path) for layer in reversed(layers)]
    base = layers[0].path
    console.heading("Copy-up: the same layers with a writable upper")
    console.say(f"layerfs -o lowerdir=...,upperdir={upper.name},workdir={work.name} {mnt.name}")
    mounts.mount(lowers, str(mnt), str(upper), str(work))
    try:
        ino_before = os.stat(mnt / "etc/os-release").st_ino
        with open(mnt / "etc/os-release", "a") as f:
            f.write('PRETTY_NAME="changed through the mount"\n')
        os.unlink(mnt / "usr/bin/hi")
        os.rename(mnt / "var/cache", mnt / "var/cache.old")
        ino_after = os.stat(mnt / "etc/os-release").st_ino
        merged_text = (mnt / "etc/os-release").read_text()
        console.say("appended to etc/os-release, removed usr/bin/hi, renamed var/cache")
    finally:
        if not mounts.unmount_quietly(str(mnt)):
            console.warn(f"could not unmount {mnt}; run: fusermount3 -u -z {mnt}")
    console.say(f"unmounted {mnt}; the upper now holds:")
    for dirpath, dirnames, filenames in sorted(os.walk(upper)):
        for name in sorted(dirnames + filenames):
            path = Path(dirpath) / name
            console.say(f"  {_describe(path, upper)}")
    checks = [
        (
            "etc/os-release was copied up with the new line",
            "changed through the mount" in (upper / "etc/os-release").read_text()
            and merged_text.startswith('NAME="Layer Demo Linux"'),
        ),
        ("the base layer is untouched", "changed" not in (base / "etc/os-release").read_text()),
        ("st_ino did not change with the copy-up", ino_before == ino_after),
        ("usr/bin/hi became a whiteout in the upper", _is_whiteout(upper / "usr/bin/hi")),
        (
            "var/cache moved (redirect), old name whited out",
            (upper / "var/cache.old").is_dir() and _is_whiteout(upper / "var/cache"),
        ),
    ]
    return report_checks(console, checks)


def report_checks(console: Console, checks: list[tuple[str, bool]]) -> list[str]:
    """Print each check's verdict; return the descriptions of the failed ones."""
    for description, ok in checks:
        console.say(f"  {'ok  ' if ok else 'FAIL'}  {description}")
    return [description for description, ok in checks if not ok]


def _is_whiteout(path: Path) -> bool:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def _describe(path: Path, upper: Path) -> str:
    rel = path.relative_to(upper)
    st = os.lstat(path)
    if _is_whiteout(path):
        return f"c  {rel}  (whiteout: hides the lower {rel.name})"
    if stat.S_ISDIR(st.st_mode):
        notes = []
        for attr in os.listxattr(path):
            if os.fsencode(attr).startswith(markers.OVERLAY_PREFIXES):
                notes.append(f"{attr}={os.getxattr(path, attr).decode(errors='replace')}")
        return f"d  {rel}/" + (f"  ({', '.join(notes)})" if notes else "  (copied up)")
    return f"-  {rel}  ({st.st_size} bytes)"
