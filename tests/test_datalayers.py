"""Data-only lower layers (`lowerdir=A:B::C::D`, or `lowerdir+=A,datadir+=C,datadir+=D`), as
kernel overlayfs has them (composefs mounts its metadata image over an object store this
way): the layers after `::` are never merged into the tree; they only hold the data of
metacopy files (`overlay.metacopy`) in the lowest lower layer whose `overlay.redirect` is an
absolute path, found in the first data-only layer that has it, and only at the file's first
open (until then stat guesses the blocks from the size, and a missing data file fails the
open, not the stat).  Without metacopy=on this is the one kind of metacopy file allowed;
other ones are refused (EPERM), and with metacopy=on one whose data is nowhere is EIO.
layerfs refused the options by name before (xfstests overlay/079, 085, 086, 088).

Every case runs on kernel overlayfs first, the oracle, over its own copy of the layers.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.mounts import LAYERFS, KernelOverlay, LayerfsMount
from tests.ops import value_or_errno

pytestmark = pytest.mark.mount

DATA = {
    "x": ("d", b"data-one\n" * 1000),  # 9,000 bytes in the bottom data layer
    "y": ("d2", b"data-two\n"),
    "s": ("d2", b"shared, upper data layer\n"),  # also in d, which it hides
    "sp": ("d", None),  # sparse: 1 MiB, no blocks
}
NAMES = ["x", "y", "s", "sp", "gone", "out", "dot", "empty", "plain", "rel", "n"]


def _metacopy(path: Path, size: int, redirect: bytes | None) -> None:
    """A lower file as kernel overlayfs leaves a metadata-only copy: a hole of the data's
    size, `overlay.metacopy`, and where its data is (a redirect), if not by its name."""
    with open(path, "wb") as f:
        f.truncate(size)
    os.setxattr(path, "trusted.overlay.metacopy", b"")
    if redirect is not None:
        os.setxattr(path, "trusted.overlay.redirect", redirect)


def _layers(root: Path) -> dict[str, Path]:
    p = {n: root / n for n in ("e", "l", "d2", "d", "upper", "work", "mnt")}
    for d in p.values():
        d.mkdir(parents=True)
    (p["e"] / "top").write_bytes(b"top\n")
    (p["d"] / "subdir").mkdir()
    (p["d2"] / "subdir").mkdir()
    for name, (layer, data) in DATA.items():
        if data is None:
            with open(p[layer] / "subdir" / f"{name}.abs", "wb") as f:
                f.truncate(1 << 20)
        else:
            (p[layer] / "subdir" / f"{name}.abs").write_bytes(data)
    (p["d"] / "subdir/s.abs").write_bytes(b"hidden by d2\n")
    (p["d"] / "outside").write_bytes(b"not reachable\n")
    for name, (_, data) in DATA.items():
        _metacopy(p["l"] / name, len(data) if data else 1 << 20, f"/subdir/{name}.abs".encode())
    _metacopy(p["l"] / "gone", 100, b"/subdir/gone.abs")  # its data is nowhere
    _metacopy(p["l"] / "out", 14, b"/../d/outside")  # out of the layer: EXDEV at open
    _metacopy(p["l"] / "dot", 9, b"/subdir/./y.abs")  # `.` is nothing
    _metacopy(p["l"] / "empty", 9, b"/subdir//y.abs")  # an empty name: invalid
    _metacopy(p["l"] / "plain", 6, None)  # no redirect: not a data-only layer's
    _metacopy(p["l"] / "rel", 6, b"rel.orig")  # relative: not one either
    (p["d"] / "rel.orig").write_bytes(b"rel-d\n")
    (p["l"] / "n").write_bytes(b"normal\n")
    (p["l"] / "subdir").mkdir()
    return p


def _seen(mnt: Path) -> dict[str, Any]:
    out: dict[str, Any] = {"listing": sorted(os.listdir(mnt))}
    for name in NAMES:
        f = mnt / name
        before = value_or_errno(lambda f=f: (os.stat(f).st_size, os.stat(f).st_blocks))
        data = value_or_errno(lambda f=f: f.read_bytes())
        after = value_or_errno(lambda f=f: os.stat(f).st_blocks)
        out[name] = (before, data if isinstance(data, str) else len(data), after)
    return out


def _both(
    tmp_path: Path,
    lowers: list[str],
    data: list[str],
    opts: str,
    steps: Callable[[Path], Any],
    writable: bool = False,
) -> dict[str, Any]:
    got = {}
    for engine in ("kernel", "layerfs"):
        p = _layers(tmp_path / engine)
        up = (p["upper"], p["work"]) if writable else (None, None)
        cls = KernelOverlay if engine == "kernel" else LayerfsMount
        with cls(p["mnt"], [p[n] for n in lowers], *up, extra_opts=opts, data=[p[n] for n in data]):
            got[engine] = steps(p["mnt"])
    return got


@pytest.mark.parametrize("opts", ["", "metacopy=on,redirect_dir=follow", "redirect_dir=nofollow"])
def test_data_only_layers_hold_the_data_of_the_lowest_layers_metacopy_files(
    tmp_path, fuse, root, opts
):
    got = _both(tmp_path, ["e", "l"], ["d2", "d"], opts, _seen)
    # the oracle: data by absolute redirect, top data layer first, lazily; nothing else
    assert got["kernel"]["x"] == ((9000, 24), 9000, 24)
    assert got["kernel"]["s"][1] == len(DATA["s"][1])
    assert got["kernel"]["sp"] == ((1 << 20, 2048), 1 << 20, 0)
    assert got["kernel"]["gone"][1:] == ("ENOENT", 8) and got["kernel"]["out"][1] == "EXDEV"
    assert got["kernel"]["plain"][0] == ("EIO" if "metacopy=on" in opts else "EPERM")
    assert "subdir" in got["kernel"]["listing"] and "top" in got["kernel"]["listing"]
    assert got["layerfs"] == got["kernel"]


@pytest.mark.parametrize("opts", ["", "metacopy=on,redirect_dir=follow"])
def test_only_the_lowest_lower_layer_reaches_the_data_only_layers(tmp_path, fuse, root, opts):
    """`l` above a normal layer `d2`: its metacopy files find their data in `d2` with
    metacopy=on and nowhere else (EIO); without it they are refused (EPERM)."""
    got = _both(tmp_path, ["l", "d2"], ["d"], opts, _seen)
    assert got["kernel"]["x"][0] == ("EIO" if opts else "EPERM")
    assert got["layerfs"] == got["kernel"]


def _copy_ups(mnt: Path) -> dict[str, Any]:
    out = {}
    os.chmod(mnt / "x", 0o400)  # metacopy=on: the metadata only
    out["append y"] = value_or_errno(lambda: open(mnt / "y", "ab").write(b"more\n"))
    out["append gone"] = value_or_errno(lambda: open(mnt / "gone", "ab").write(b"more\n"))
    out["x"] = value_or_errno(lambda: (mnt / "x").read_bytes()[:9])
    out["y"] = value_or_errno(lambda: (mnt / "y").read_bytes())
    return out


def _upper(p: Path, name: str) -> tuple[Any, ...]:
    f = p / name
    if not f.exists():
        return ("absent",)
    xattrs = sorted(n for n in os.listxattr(f) if n.startswith("trusted.overlay."))
    data = f.read_bytes()
    return (f.stat().st_size, xattrs, data.strip(b"\0")[:9])


def _heads(mnt: Path) -> dict[str, Any]:
    return {n: value_or_errno(lambda n=n: (mnt / n).read_bytes()[:9]) for n in "xy"}


def test_copy_ups_take_the_data_from_the_data_only_layers(tmp_path, fuse, root):
    results = {}
    for engine in ("kernel", "layerfs"):
        p = _layers(tmp_path / engine)
        cls = KernelOverlay if engine == "kernel" else LayerfsMount
        lowers, data = [p["e"], p["l"]], [p["d2"], p["d"]]
        mc = "metacopy=on,redirect_dir=on"
        with cls(p["mnt"], lowers, p["upper"], p["work"], extra_opts=mc, data=data):
            steps = _copy_ups(p["mnt"])
        uppers = {n: _upper(p["upper"], n) for n in ("x", "y", "gone")}
        with cls(p["mnt"], lowers, p["upper"], p["work"], extra_opts=mc, data=data):
            again = _heads(p["mnt"])
        with cls(p["mnt"], lowers, p["upper"], p["work"], data=data):  # metacopy=off
            off = _heads(p["mnt"])
        results[engine] = (steps, uppers, again, off)
    k = results["kernel"]
    assert k[0]["append gone"] == "ENOENT" and k[0]["y"] == b"data-two\nmore\n"
    assert k[1]["x"] == (9000, ["trusted.overlay.metacopy", "trusted.overlay.origin"], b"")
    assert k[2] == {"x": b"data-one\n", "y": b"data-two\n"}
    assert k[3] == {"x": "EPERM", "y": b"data-two\n"}  # an upper metacopy file: not this form
    assert results["layerfs"] == results["kernel"]


def test_lowerdir_plus_and_datadir_plus_options(tmp_path, fuse, root):
    """The same layers given one per option; their paths are taken as they are (a `:` is a
    character of the name, no escapes), and the kernel's rules on mixing them hold."""
    got = {}
    for engine in ("kernel", "layerfs"):
        p = _layers(tmp_path / engine)
        colon = tmp_path / engine / "with:colon"
        (p["l"]).rename(colon)
        opts = f"lowerdir+={p['e']},lowerdir+={colon},datadir+={p['d2']},datadir+={p['d']}"
        refused = []
        for bad in (
            f"lowerdir={p['e']},datadir+={p['d']}",  # the two forms mixed
            f"datadir+={p['d']},lowerdir+={p['e']}",  # a data layer first
            f"lowerdir+={p['e']},datadir+={p['d']},lowerdir+={colon}",  # a lower after data
            f"lowerdir+={p['e']}\\:x",  # no escapes: a name that is not there
        ):
            cmd = (
                ["mount", "-t", "overlay", "overlay", "-o", bad, str(p["mnt"])]
                if engine == "kernel"
                else [LAYERFS, "-o", bad, str(p["mnt"])]
            )
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
            refused.append(r.returncode != 0)
            if r.returncode == 0:
                subprocess.run(["umount", str(p["mnt"])], check=True)
        cmd = (
            ["mount", "-t", "overlay", "overlay", "-o", opts, str(p["mnt"])]
            if engine == "kernel"
            else [LAYERFS, "-o", opts, str(p["mnt"])]
        )
        subprocess.run(cmd, check=True, timeout=30)
        try:
            got[engine] = (refused, _seen(p["mnt"]))
        finally:
            subprocess.run(["umount", str(p["mnt"])], check=True, timeout=30)
    assert got["kernel"][0] == [True] * 4
    assert got["kernel"][1]["x"][1] == 9000
    assert got["layerfs"] == got["kernel"]
