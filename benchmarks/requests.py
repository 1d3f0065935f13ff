"""How many FUSE requests each workload makes on layerfs, by kind: the profile evidence for
the ratios (time ≈ requests × the cost of one round trip, see `floor`).

    python -m benchmarks requests [--quick] [--only W1 W5 ...] [--data DIR]

Runs each workload once, on a fresh layerfs mount started in debug mode (`layerfs -d` logs
every request it handles), cold then warm like the timed run, and counts the log's lines per
request kind between markers: a lookup of a name that cannot exist, made before and after each
timed part.  Debug logging slows layerfs down, so nothing here is timed.  Either transport:
the native session logs every request it reads (`LOOKUP #12 node 1 ...`, FORGET and RELEASE
included); the pyfuse3 one (`--fuse pyfuse3`) logs its handlers' calls, without RELEASE,
RELEASEDIR and FORGET (they never fail and the kernel does not wait for them).  Root only.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from benchmarks.common import LAYERFS, umount
from benchmarks.dataset import CACHE, Dataset, dataset
from benchmarks.harness import fresh_mount_dirs, prepare
from benchmarks.workloads import WORKLOADS

_LINE = re.compile(rb"DEBUG ([a-z_]+)\(")  # pyfuse3: a handler's call
_NATIVE = re.compile(rb"DEBUG ([A-Z][A-Z0-9_]*) #\d+ node")  # native: a request as read


def _mark(mnt: Path, tag: str) -> bytes:
    name = f".bench-mark-{tag}"
    os.path.exists(mnt / name)  # a LOOKUP the log shows (negative entries: a new name each time)
    return name.encode()


def count(ds: Dataset, wid: str, run_dir: Path) -> dict[str, Counter[str]]:
    w = next(w for w in WORKLOADS if w.id == wid)
    mnt, opts = fresh_mount_dirs(run_dir, ds.lowers)
    log = run_dir / "log"
    with open(log, "wb") as logf:
        proc = subprocess.Popen([LAYERFS, "-d", "-o", opts, str(mnt)], stderr=logf)
    marks: list[tuple[str, bytes, bytes]] = []
    try:
        deadline = time.monotonic() + 20
        while not os.path.ismount(mnt):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"layerfs -d did not mount: {log.read_text()[-500:]}")
            time.sleep(0.05)
        for i, mode in enumerate(w.modes):
            prepare(w, mode, i == 0, mnt, ds)
            start = _mark(mnt, f"{mode}-start")
            w.run(mnt, ds)
            end = _mark(mnt, f"{mode}-end")
            marks.append((mode, start, end))
    finally:
        umount(mnt)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
    data = log.read_bytes()
    out: dict[str, Counter[str]] = {}
    for mode, start, end in marks:
        a = data.index(start)
        b = data.index(end, a)
        part = data[data.index(b"\n", a) + 1 : data.rfind(b"\n", a, b)]
        found = _NATIVE.findall(part) or _LINE.findall(part)
        out[mode] = Counter(m.decode().lower() for m in found)
    shutil.rmtree(run_dir, ignore_errors=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks requests", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", nargs="+", metavar="W")
    ap.add_argument("--data", type=Path, default=CACHE)
    ap.add_argument("--fuse", choices=("native", "pyfuse3"), help="the transport (LAYERFS_FUSE)")
    args = ap.parse_args()
    if args.fuse:
        os.environ["LAYERFS_FUSE"] = args.fuse
    if os.geteuid() != 0:
        print("benchmarks requests: needs root", file=sys.stderr)
        return 2
    ds = dataset(args.quick, args.data)
    wanted = [w.id for w in WORKLOADS if not args.only or w.id in {o.upper() for o in args.only}]
    for wid in wanted:
        for mode, counts in count(ds, wid, ds.root.parent / "requests-run").items():
            total = sum(counts.values())
            kinds = ", ".join(f"{k} {n:,}" for k, n in counts.most_common())
            print(f"{wid:4} {mode:5} {total:7,} requests: {kinds}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
