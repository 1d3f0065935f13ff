"""`layer demo`: the main job on a built-in sample, narrated step by step.

Steps, each a small function so later ones (copy-up, commit) slot in: build three layers in
a fresh temp dir (`demo_sample`), show what each holds, mount them read-only with layerfs,
show the merged tree, check what the union rules promise (etc/motd is in the base layer yet
hidden), unmount, remove the temp dir.  Unmounting always happens (`fusermount3 -u`, then
`-u -z`); the temp dir is removed unless --keep, and never while something is still mounted
in it.  Output goes through the Console that main.py passes in.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import click

from unionfs import markers

from . import demo_copyup, demo_image, demo_sample, mounts
from .demo_sample import Layer
from .errors import DemoFailed

if TYPE_CHECKING:
    from .console import Console


@click.command("demo")
@click.option("--keep", is_flag=True, help="Keep the temp dir (layers, mountpoint) afterwards.")
@click.pass_obj
def demo(console: Console, keep: bool) -> None:
    """Mount a built-in 3-layer sample and show the merged view."""
    run(console, keep)


def run(console: Console, keep: bool) -> None:
    """The whole demo; raises DemoFailed when a check fails (after cleaning up)."""
    root = Path(tempfile.mkdtemp(prefix="layer-demo-"))
    mnt = root / "merged"
    console.say(f"demo directory: {root}")
    failures: list[str] = []
    try:
        layers = demo_sample.build_sample(root)
        show_layers(console, layers)
        mnt.mkdir()
        with mounted(console, layers, mnt):
            show_merged(console, mnt)
            failures = check_merged(console, layers, mnt)
        failures += demo_copyup.show_copy_up(console, layers, root)
        failures += demo_image.show_image(console, root)
    finally:
        remove_or_keep(console, root, mnt, keep)
    if failures:
        raise DemoFailed("the merged view is wrong: " + "; ".join(failures))
    console.say("")
    console.say("demo finished: the merged view follows the overlay rules")


# --- steps -------------------------------------------------------------------------------


def show_layers(console: Console, layers: list[Layer]) -> None:
    console.heading("The layers (base first; lookups go top-down)")
    for layer in layers:
        console.say(f"{layer.name}/  ({layer.role})")
        for rel, st in walk(layer.path):
            console.say("  " + entry_line(layer.path, rel, st, note=marker_note(layer.path, rel)))
        for note in layer.notes:
            console.say(f"  note: {note}")


@contextlib.contextmanager
def mounted(console: Console, layers: list[Layer], mnt: Path) -> Iterator[None]:
    """Mount read-only (lowers top-first); always unmount on the way out."""
    lowers = [str(layer.path) for layer in reversed(layers)]
    console.heading(f"Mounting (in {mnt.parent})")
    shown = ":".join(os.path.relpath(low, mnt.parent) for low in lowers)
    console.say(f"layerfs -o lowerdir={shown} {mnt.name}")
    mounts.mount(lowers, str(mnt))
    try:
        yield
    finally:
        if mounts.unmount_quietly(str(mnt)):
            console.say(f"unmounted {mnt}")
        else:
            console.warn(f"could not unmount {mnt}; run: fusermount3 -u -z {mnt}")


def show_merged(console: Console, mnt: Path) -> None:
    console.heading(f"The merged view ({mnt}, read-only)")
    for rel, st in walk(mnt):
        console.say("  " + entry_line(mnt, rel, st))


def check_merged(console: Console, layers: list[Layer], mnt: Path) -> list[str]:
    """Run every check, print each verdict; returns the failed ones."""
    base = layers[0].path
    console.heading("What the union did")
    base_motd = base / "etc/motd"
    console.say(f"etc/motd in the base layer:  {base_motd.read_text().strip()!r}")
    console.say(f"etc/motd in the merged view: {_describe_lookup(mnt / 'etc/motd')}")
    failures = []
    for description, check in _checks(base, mnt):
        ok = check()
        console.say(f"  {'ok  ' if ok else 'FAIL'}  {description}")
        if not ok:
            failures.append(description)
    return failures


def remove_or_keep(console: Console, root: Path, mnt: Path, keep: bool) -> None:
    busy = [
        m
        for m in (mnt, root / "merged-rw")
        if mounts.fstype(mounts.canonical_mountpoint(str(m))) is not None
    ]
    if busy:
        console.warn(f"{busy[0]} is still mounted: leaving {root} in place")
    elif keep:
        console.say(f"kept {root} (--keep); layers in {root / 'layers'}")
    else:
        shutil.rmtree(root)
        console.say(f"removed {root}")


# --- checks ------------------------------------------------------------------------------


def _checks(base: Path, mnt: Path) -> list[tuple[str, Callable[[], bool]]]:
    def hidden(rel: str) -> Callable[[], bool]:
        return lambda: os.path.lexists(base / rel) and not os.path.lexists(mnt / rel)

    return [
        ("etc/motd: in the base layer, hidden by the middle layer's whiteout", hidden("etc/motd")),
        ("etc/hostname: hidden by an OCI .wh.hostname file", hidden("etc/hostname")),
        (
            "var/cache/apt: opaque in the middle layer, so only fresh.bin shows",
            lambda: sorted(os.listdir(mnt / "var/cache/apt")) == ["fresh.bin"],
        ),
        ("etc/app.conf: added by the top layer", lambda: (mnt / "etc/app.conf").is_file()),
        (
            "usr/bin/hi and usr/bin/hello: one inode (hard link)",
            lambda: os.stat(mnt / "usr/bin/hi").st_ino == os.stat(mnt / "usr/bin/hello").st_ino,
        ),
        (
            "usr/bin/greet: a symlink to hello",
            lambda: os.readlink(mnt / "usr/bin/greet") == "hello",
        ),
        ("no whiteout or opaque marker is visible", lambda: not _visible_markers(mnt)),
        ("writing fails with EROFS (no upper layer)", lambda: _write_errno(mnt) == errno.EROFS),
    ]


def _describe_lookup(path: Path) -> str:
    try:
        os.lstat(path)
    except OSError as exc:
        return f"absent ({errno.errorcode.get(exc.errno or 0, exc.errno)}: {exc.strerror})"
    return "present"


def _visible_markers(mnt: Path) -> list[str]:
    return [
        rel
        for rel, st in walk(mnt)
        if markers.is_chardev_whiteout(st)
        or os.fsencode(os.path.basename(rel)).startswith(markers.WH_PREFIX)
    ]


def _write_errno(mnt: Path) -> int | None:
    try:
        with open(mnt / "etc/new-file", "w") as f:
            f.write("x")
    except OSError as exc:
        return exc.errno
    return None


# --- trees -------------------------------------------------------------------------------


def walk(root: Path, rel: str = "") -> Iterator[tuple[str, os.stat_result]]:
    """(relative path, lstat) of everything under ROOT, sorted, parents first."""
    with os.scandir(root / rel if rel else root) as it:
        entries = sorted(it, key=lambda e: e.name)
    for entry in entries:
        path = f"{rel}/{entry.name}" if rel else entry.name
        st = entry.stat(follow_symlinks=False)
        yield path, st
        if stat.S_ISDIR(st.st_mode):
            yield from walk(root, path)


_KINDS = {
    stat.S_IFDIR: "d",
    stat.S_IFREG: "-",
    stat.S_IFLNK: "l",
    stat.S_IFCHR: "c",
    stat.S_IFBLK: "b",
    stat.S_IFIFO: "p",
    stat.S_IFSOCK: "s",
}


def entry_line(root: Path, rel: str, st: os.stat_result, note: str = "") -> str:
    """`-  1234  usr/bin/hello  (2 links)`: type, size (major/minor for devices), path."""
    kind = _KINDS.get(stat.S_IFMT(st.st_mode), "?")
    if kind == "d":
        size, rel = "", rel + "/"
    elif kind in "cb":
        size = f"{os.major(st.st_rdev)}/{os.minor(st.st_rdev)}"
    else:
        size = str(st.st_size)
    extra = []
    if kind == "l":
        extra.append("-> " + os.readlink(root / rel))
    if kind == "-" and st.st_nlink > 1:
        extra.append(f"({st.st_nlink} links)")
    if note:
        extra.append(f"[{note}]")
    return " ".join([f"{kind} {size:>6}  {rel}", *extra])


def marker_note(layer: Path, rel: str) -> str:
    """What a layer entry means to the union, if it is a whiteout or opaque marker."""
    name = os.path.basename(rel).encode()
    parent = os.path.dirname(rel)
    st = os.lstat(layer / rel)
    if markers.is_chardev_whiteout(st):
        return "whiteout: hides what is below"
    if name == markers.WH_OPAQUE:
        return f"OCI opaque marker: {parent}/ hides what is below"
    target = markers.oci_whiteout_target(name)
    if target is not None:
        return f"OCI whiteout: hides {os.path.join(parent, target.decode())}"
    if stat.S_ISDIR(st.st_mode) and markers.dir_marks(bytes(layer / rel)).opaque:
        return "opaque directory: hides what is below"
    return ""
