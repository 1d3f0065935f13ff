"""The workloads W1–W10: what each one does to a mounted stack, and the target ratio to kernel
overlayfs that issue 11 sets for it (`WORKLOADS`).

A workload is run on a fresh mount (fresh upper and work dirs) of the dataset's three lower
layers.  Its modes say how it is timed on that mount: `cold` drops the kernel's caches first
(the daemon is fresh too, since the mount is), `warm` runs it once untimed (or after the cold
run) and times the second run, `once` syncs and times a single run (write workloads).  Real
tools do the work where there is one (find, ls, dd, fio, cat, rm, tar), so the times include
what a user's command would see; W6 and W7 are Python loops of open/write/close.  Nothing here
measures time itself except `fio_runtime` (fio reports its own I/O time, without its start-up).
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.dataset import Dataset


@dataclass(frozen=True)
class Workload:
    id: str
    title: str
    modes: tuple[str, ...]
    targets: dict[str, float]
    # returns None (time it from outside) or the seconds the tool itself reported
    run: Callable[[Path, Dataset], float | None]
    notes: str = field(default="")


def _quiet(cmd: list[str], cwd: Path | None = None) -> None:
    subprocess.run(cmd, cwd=cwd, stdout=subprocess.DEVNULL, check=True)


def w1_find(mnt: Path, ds: Dataset) -> None:
    _quiet(["find", str(mnt), "-ls"])


def w2_ls(mnt: Path, ds: Dataset) -> None:
    _quiet(["ls", "-lR", str(mnt)])


def w3_seqread(mnt: Path, ds: Dataset) -> None:
    subprocess.run(
        ["dd", f"if={mnt / ds.big}", "of=/dev/null", "bs=1M"], capture_output=True, check=True
    )


def w4_randread(mnt: Path, ds: Dataset) -> float:
    out = subprocess.run(
        [
            "fio",
            "--name=w4",
            f"--filename={mnt / ds.big}",
            "--readonly",
            "--rw=randread",
            "--bs=4k",
            "--ioengine=psync",
            f"--size={ds.sizes.big_bytes}",
            f"--io_size={ds.sizes.random_read_bytes}",
            "--randrepeat=1",
            "--norandommap",
            "--invalidate=0",
            "--output-format=json",
        ],
        capture_output=True,
        check=True,
        text=True,
    ).stdout
    job = json.loads(out[out.index("{") :])["jobs"][0]
    return float(job["read"]["runtime"]) / 1e3


def w5_smallread(mnt: Path, ds: Dataset) -> None:
    names = [f"f{i:05d}" for i in range(ds.sizes.small_files)]
    _quiet(["cat", *names], cwd=mnt / "small")


def w6_create(mnt: Path, ds: Dataset) -> None:
    d = mnt / "created"
    d.mkdir()
    data = b"c" * 4096
    for i in range(ds.sizes.create_files):
        fd = os.open(d / f"f{i}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
    os.sync()


def w7_copyup(mnt: Path, ds: Dataset) -> None:
    for rel in ds.manifest()["copyup"]:
        fd = os.open(mnt / rel, os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, b"!")
        finally:
            os.close(fd)


def w8_rmrf(mnt: Path, ds: Dataset) -> None:
    _quiet(["rm", "-rf", str(mnt / "rmrf")])


def w9_untar(mnt: Path, ds: Dataset) -> None:
    _quiet(["tar", "-xf", str(ds.tarball), "-C", str(mnt)])
    os.sync()


def w10_seqwrite(mnt: Path, ds: Dataset) -> None:
    subprocess.run(
        [
            "dd",
            "if=/dev/zero",
            f"of={mnt / 'w10'}",
            "bs=1M",
            f"count={ds.sizes.write_bytes >> 20}",
            "conv=fsync",
        ],
        capture_output=True,
        check=True,
    )


# Targets: issue 11 (ratio to kernel overlayfs, median of the per-round ratios).
WORKLOADS = [
    Workload(
        "W1", "find -ls (stat every entry)", ("cold", "warm"), {"cold": 1.5, "warm": 1.3}, w1_find
    ),
    Workload("W2", "ls -lR", ("cold", "warm"), {"cold": 2, "warm": 1.5}, w2_ls),
    Workload(
        "W3",
        "sequential read of the big file (dd bs=1M)",
        ("cold", "warm"),
        {"cold": 1.1, "warm": 1.2},
        w3_seqread,
    ),
    Workload(
        "W4",
        "4 KiB random reads of the big file (fio psync)",
        ("cold", "warm"),
        {"cold": 1.2, "warm": 1.2},
        w4_randread,
        "fio's own runtime",
    ),
    Workload(
        "W5",
        "read every small file (cat)",
        ("cold", "warm"),
        {"cold": 1.8, "warm": 1.5},
        w5_smallread,
    ),
    Workload("W6", "create small files of 4 KiB + sync", ("once",), {"once": 2.5}, w6_create),
    Workload("W7", "copy-up: append 1 byte to lower files", ("once",), {"once": 1.3}, w7_copyup),
    Workload("W8", "rm -rf a lower directory", ("once",), {"once": 4}, w8_rmrf),
    Workload("W9", "untar into the merged dir + sync", ("once",), {"once": 1.8}, w9_untar),
    Workload(
        "W10",
        "sequential write + fsync (dd bs=1M conv=fsync)",
        ("once",),
        {"once": 1.0},
        w10_seqwrite,
    ),
]


def describe(w: Workload, ds: Dataset) -> str:
    """The title with this dataset's sizes filled in."""
    s = ds.sizes
    extra = {
        "W3": f"{s.big_bytes >> 20} MiB",
        "W4": f"{s.random_read_bytes >> 20} MiB over {s.big_bytes >> 20} MiB",
        "W5": f"{s.small_files:,} × 4 KiB",
        "W6": f"{s.create_files:,}",
        "W7": f"{s.copyup_files:,} files",
        "W8": f"{s.rmrf_entries:,} entries",
        "W9": f"{s.tar_bytes >> 20} MiB",
        "W10": f"{s.write_bytes >> 20} MiB",
    }.get(w.id)
    return f"{w.title} [{extra}]" if extra else w.title
