"""`python -m benchmarks run`: layerfs versus kernel overlayfs (what Docker's overlay2 uses) and
fuse-overlayfs on the same layer directories, plus the store versus skopeo/umoci.

    python -m benchmarks run [--quick] [--rounds N] [--only W1 W5 M R S P ...] [--engines ...]
                             [--results DIR] [--data DIR]
    python -m benchmarks dataset [--quick] [--data DIR]  # build (or find) the cached dataset
    python -m benchmarks report DIR/results.json    # print and redraw a saved run

Root only.  Writes DIR/results.json (every round's seconds), DIR/table.txt, DIR/table.md and
DIR/ratios.png;
DIR defaults to results/<UTC time>[-quick].  `--quick` (one round, a dataset ten times smaller)
is CI's smoke test: it proves the harness runs, not how fast anything is.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks import report
from benchmarks.dataset import CACHE, FULL, QUICK, Dataset, dataset
from benchmarks.harness import (
    ENGINES,
    OPTIONAL_ENGINES,
    Harness,
    check_root,
    fuse_overlayfs_available,
)
from benchmarks.workloads import WORKLOADS

GROUPS = [w.id for w in WORKLOADS] + ["M", "R", "S", "P"]  # P: podman paths, rows S3-S5


def _version(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        return (out.stdout or out.stderr).strip().splitlines()[-1]
    except (OSError, IndexError, subprocess.SubprocessError):
        return "?"


def _journaled(path: Path) -> bool:
    """Whether the ext4 filesystem holding `path` has a journal (jbd2 lists each one)."""
    source = _version(["findmnt", "-no", "SOURCE", "-T", str(path)]).split("[")[0]
    source = os.path.realpath(source)  # /dev/mapper/x: jbd2 names the dm-N behind it
    try:
        journals = os.listdir("/proc/fs/jbd2")
    except OSError:
        return False
    return any(j.rsplit("-", 1)[0] == os.path.basename(source) for j in journals)


def machine(data: Path) -> dict[str, Any]:
    cpu = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in open("/proc/cpuinfo")
            if ln.startswith("model name")
        ),
        platform.machine(),
    )
    mem = next(int(ln.split()[1]) for ln in open("/proc/meminfo") if ln.startswith("MemTotal"))
    fstype = _version(["findmnt", "-no", "FSTYPE", "-T", str(data)])
    if fstype == "ext4" and not _journaled(data):
        # ext4 without a journal skips inodes freed in the last minute when it allocates one,
        # looking each up: creates right after the previous round's removals stall (README)
        fstype += " without a journal"
    import pyfuse3

    head = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parent,
    ).stdout.strip()
    return {
        "machine": f"{os.cpu_count()} × {cpu}, {mem / 2**20:.0f} GiB, {fstype}, "
        f"Linux {platform.release()}",
        "python": platform.python_version(),
        "pyfuse3": pyfuse3.__version__ if hasattr(pyfuse3, "__version__") else "?",
        "fuse-overlayfs": _version(["fuse-overlayfs", "--version"]),
        "layer": head or "?",
    }


def run(args: argparse.Namespace) -> int:
    problem = check_root()
    if problem:
        print(f"benchmarks: {problem}", file=sys.stderr)
        return 2
    engines = args.engines or [
        e for e in ENGINES if e != "fuse-overlayfs" or fuse_overlayfs_available()
    ]
    only = [g.upper() for g in (args.only or GROUPS)]
    unknown = [g for g in only if g not in GROUPS]
    if unknown:
        print(
            f"benchmarks: unknown workload(s) {', '.join(unknown)}; known: {' '.join(GROUPS)}",
            file=sys.stderr,
        )
        return 2
    rounds = args.rounds or (1 if args.quick else 5)
    print(f"dataset: {'quick' if args.quick else 'full'} (built once, cached)", flush=True)
    if any(g not in ("S", "P") for g in only):
        ds = dataset(args.quick, args.data)
    else:  # the store and podman rows bring their own images: no layer dataset to build
        ds = Dataset(args.data / "none", QUICK if args.quick else FULL)
        ds.root.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.UTC)
    out = args.results or Path("results") / (
        stamp.strftime("%Y%m%d-%H%M%S") + ("-quick" if args.quick else "")
    )
    meta: dict[str, Any] = {
        "date": stamp.strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python -m benchmarks "
        + " ".join(sys.argv[1:] if len(sys.argv) > 1 else ["run"]),
        "rounds": rounds,
        "quick": args.quick,
        "engines": engines,
        **machine(args.scratch or ds.root),
    }
    run_dir = Path(tempfile.mkdtemp(prefix="run-", dir=args.scratch or ds.root.parent))
    meta["scratch"] = str(run_dir.parent)  # where every mount's upper, work and mnt dirs are
    h = Harness(ds, engines, run_dir)
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(shutil.rmtree, run_dir, True)
        stores = []
        if "S" in only:
            from benchmarks.store import StoreBench

            sizes = [ds.sizes.pull_files] + ([] if args.quick else [0])  # 0: the Debian image
            stores = [cleanup.enter_context(StoreBench(n, args.data)) for n in sizes]
        podman = None
        if "P" in only:
            from benchmarks.podman_bench import PodmanBench

            podman = cleanup.enter_context(
                PodmanBench(engines, ds.sizes.pull_files, ds.root.parent)
            )
        for r in range(rounds):
            print(f"round {r + 1}/{rounds}", flush=True)
            for g in only:
                print(f"  {g}", flush=True)
                if g == "M":
                    h.mount_round()
                elif g == "R":
                    h.floor_round()
                elif g == "S":
                    for store in stores:
                        h.store_round(store)
                elif g == "P":
                    h.podman_round(podman)
                else:
                    h.workload_round(g)
    rows = list(h.rows.values())
    text = report.save(rows, meta, out, engines)
    print(
        f"\n{meta['date']}; {meta['machine']}; {rounds} round(s); median (min–max), "
        "×ratio = median of per-round ratios to the baseline column"
    )
    print(text)
    print(f"\nresults: {out}/results.json, table.txt, table.md, ratios.png")
    failed = [f"{r.id} {r.mode} {e}" for r in rows for e in r.errors]
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run the benchmarks")
    r.add_argument("--quick", action="store_true", help="small dataset, one round (CI)")
    r.add_argument("--rounds", type=int, help="rounds (default 5, quick 1)")
    r.add_argument("--only", nargs="+", metavar="W", help=f"subset of {' '.join(GROUPS)}")
    r.add_argument("--engines", nargs="+", choices=ENGINES + OPTIONAL_ENGINES)
    r.add_argument("--results", type=Path, help="output dir (default results/<time>)")
    r.add_argument(
        "--data",
        type=Path,
        default=CACHE,
        help=f"where the dataset is cached and the mounts live (default {CACHE})",
    )
    r.add_argument(
        "--scratch",
        type=Path,
        help="where the mounts' upper, work and mount dirs go (default: beside the dataset); "
        "the filesystem the machine line names is this one's",
    )
    d = sub.add_parser("dataset", help="build the cached dataset and print where it is")
    d.add_argument("--quick", action="store_true")
    d.add_argument("--data", type=Path, default=CACHE)
    p = sub.add_parser("report", help="print and redraw a saved results.json")
    p.add_argument("json", type=Path)
    args = ap.parse_args()
    if args.cmd == "run":
        return run(args)
    if args.cmd == "dataset":
        print(dataset(args.quick, args.data).root)
        return 0
    data = json.loads(args.json.read_text())
    rows = report.from_json(data)
    print(report.save(rows, data["meta"], args.json.parent, data["meta"]["engines"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
