"""CI's smoke test of the benchmark harness: `python -m benchmarks run --quick` runs every
workload on every engine and writes its table, JSON and chart.  It checks that the harness
works (every row has a number for every engine, nothing failed, nothing stays mounted), never
how fast anything is: speed is the harness's own business, on a quiet machine.
"""

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests import mounts
from tests.registry_util import require_tool

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(900)
def test_quick_run_covers_every_workload_and_engine(tmp_path, fuse, root):
    for tool, package in (
        ("fio", "fio"),
        ("fuse-overlayfs", "fuse-overlayfs"),
        ("skopeo", "skopeo"),
        ("umoci", "umoci"),
        ("docker-registry", "docker-registry"),
    ):
        require_tool(tool, package)
    data, results = tmp_path / "data", tmp_path / "results"
    try:
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "benchmarks",
                "run",
                "--quick",
                "--data",
                str(data),
                "--results",
                str(results),
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=840,
        )
    finally:
        left = mounts.sweep(str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert not left, f"the harness left mounts behind: {left}"

    report = json.loads((results / "results.json").read_text())
    assert report["meta"]["quick"] is True and report["meta"]["rounds"] == 1
    rows = {(r["id"], r["mode"]): r for r in report["rows"]}
    engines = {"kernel", "fuse-overlayfs", "layerfs"}
    wanted = {f"W{i}" for i in range(1, 11)} | {"M1", "M10", "M100", "M500", "R1", "R2"}
    assert wanted <= {i for i, _ in rows}
    for (wid, mode), row in rows.items():
        assert not row["errors"], (wid, mode, row["errors"])
        if wid.startswith(("W", "M", "R")):
            assert engines <= set(row["samples"]), (wid, mode)
            for engine in engines - {"kernel"}:
                assert row["summary"][engine]["ratio"] > 0
    assert set(rows[("S1", "once")]["samples"]) == {"layer", "skopeo+umoci"}
    assert set(rows[("S2", "once")]["samples"]) == {"layer", "umoci"}
    assert set(rows[("S6", "once")]["samples"]) == {"with fingerprints", "without"}
    assert set(rows[("S7", "warm")]["samples"]) == {"layer", "cat"}
    assert ("W1", "cold") in rows and ("W1", "warm") in rows
    # issue 11's R1 target is for the daemon pinned to the caller's CPU; unpinned is reported too
    assert rows[("R1", "pinned")]["target"] == 15e-6 and rows[("R1", "warm")]["target"] is None
    assert engines <= set(rows[("R2", "pinned")]["samples"])
    # each M row is also timed until the mount's first answer, which comes after the mount
    first, once = rows[("M1", "first")]["samples"], rows[("M1", "once")]["samples"]
    assert all(f >= o for f, o in zip(first["layerfs"], once["layerfs"], strict=True))
    png = (results / "ratios.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    table = (results / "table.txt").read_text()
    assert "W10" in table and "×" in table
    # the stack it mounted is in overlay format: whiteouts and opaque directories
    upper_layers = [data / "data-quick" / name for name in ("l1", "l2")]
    whiteouts = [
        p for layer in upper_layers for p in layer.rglob("*") if stat.S_ISCHR(p.lstat().st_mode)
    ]
    opaque = [
        p
        for layer in upper_layers
        for p in layer.rglob("*")
        if p.is_dir() and not p.is_symlink() and b"y" == _xattr(p, "trusted.overlay.opaque")
    ]
    assert len(whiteouts) > 20 and len(opaque) >= 3


def _xattr(path, name):
    try:
        return os.getxattr(path, name, follow_symlinks=False)
    except OSError:
        return None


@pytest.mark.timeout(600)
def test_scratch_puts_the_mounts_on_another_filesystem(tmp_path, fuse, root):
    """`--scratch DIR`: the uppers, work and mount dirs go to DIR's filesystem (here a tmpfs),
    the machine line names that filesystem, and nothing is left there afterwards."""
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512m", "tmpfs", str(scratch)], check=True)
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "benchmarks", "run", "--quick", "--only", "W8",
             "--engines", "kernel", "layerfs", "--data", str(tmp_path / "data"),
             "--results", str(tmp_path / "results"), "--scratch", str(scratch)],
            cwd=REPO, capture_output=True, text=True, timeout=540,
        )  # fmt: skip
        left_in_scratch = os.listdir(scratch)
    finally:
        left = mounts.sweep(str(scratch))  # the harness's own, under the tmpfs
        mounts.lazy_unmount(str(scratch))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert not left, f"the harness left mounts behind: {left}"
    assert left_in_scratch == []
    report = json.loads((tmp_path / "results" / "results.json").read_text())
    assert ", tmpfs, " in report["meta"]["machine"] and report["meta"]["scratch"] == str(scratch)
    (row,) = [r for r in report["rows"] if r["id"] == "W8"]
    assert not row["errors"] and {"kernel", "layerfs"} <= set(row["samples"])
