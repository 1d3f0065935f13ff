"""Write-side workloads: layerfs versus kernel overlayfs (and fuse-overlayfs) on the same layers.

    python -m benchmarks.write_bench [--rounds R]

Each round, for each engine in turn (interleaved), mounts the same lower layers with a fresh
upper/work dir and times:
  create  — create 10,000 small files (4 KiB) in a new directory, then `sync`
  copyup  — append one byte to 1,000 lower files (each append copies a file up)
  rmrf    — `rm -rf` a lower directory of 2,000 entries
  untar   — untar a 100 MB tarball into the merged directory, then `sync`
Prints medians (min–max) and the median of pair-by-pair ratios to kernel overlayfs.  Root only.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from benchmarks.common import mount, ms, pair_ratio, umount

CACHE = Path("/var/tmp/layer-bench/write")


def build() -> tuple[Path, Path]:
    lower, tarball = CACHE / "lower", CACHE / "100mb.tar"
    if (CACHE / "done").exists():
        return lower, tarball
    shutil.rmtree(CACHE, ignore_errors=True)
    for i in range(1000):
        p = lower / "copyup" / f"d{i % 10}" / f"f{i}"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(os.urandom(1024 + (i * 37) % 16384))
    for i in range(2000):
        p = lower / "rmrf" / f"d{i % 20}" / f"f{i}"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x" * 100)
    src = CACHE / "tarsrc"
    for i in range(400):
        p = src / f"pkg{i % 25}" / f"file{i}"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(os.urandom(256 << 10))
    with tarfile.open(tarball, "w") as tf:
        tf.add(src, arcname="untarred")
    shutil.rmtree(src)
    (CACHE / "done").touch()
    return lower, tarball


def w_create(mnt: Path, _tar: Path) -> None:
    d = mnt / "created"
    d.mkdir()
    data = b"c" * 4096
    for i in range(10000):
        fd = os.open(d / f"f{i}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(fd, data)
        os.close(fd)
    os.sync()


def w_copyup(mnt: Path, _tar: Path) -> None:
    for i in range(1000):
        fd = os.open(mnt / "copyup" / f"d{i % 10}" / f"f{i}", os.O_WRONLY | os.O_APPEND)
        os.write(fd, b"!")
        os.close(fd)


def w_rmrf(mnt: Path, _tar: Path) -> None:
    subprocess.run(["rm", "-rf", str(mnt / "rmrf")], check=True)


def w_untar(mnt: Path, tar: Path) -> None:
    subprocess.run(["tar", "-xf", str(tar), "-C", str(mnt)], check=True)
    os.sync()


WORKLOADS = {"create": w_create, "copyup": w_copyup, "rmrf": w_rmrf, "untar": w_untar}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--only", nargs="*", default=list(WORKLOADS))
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("write_bench: needs root", file=sys.stderr)
        return 2
    lower, tar = build()
    engines = ["kernel", "layerfs"] + (["fuse-overlayfs"] if shutil.which("fuse-overlayfs") else [])
    results: dict[tuple[str, str], list[float]] = {}
    run = CACHE / "run"
    for _ in range(args.rounds):
        for name in args.only:
            for engine in engines:
                shutil.rmtree(run, ignore_errors=True)
                for d in ("upper", "work", "mnt"):
                    (run / d).mkdir(parents=True)
                opts = f"lowerdir={lower},upperdir={run / 'upper'},workdir={run / 'work'}"
                mount(engine, opts, run / "mnt")
                try:
                    os.sync()
                    t0 = time.perf_counter()
                    WORKLOADS[name](run / "mnt", tar)
                    results.setdefault((name, engine), []).append(time.perf_counter() - t0)
                finally:
                    umount(run / "mnt")
    shutil.rmtree(run, ignore_errors=True)
    print(f"{args.rounds} rounds, medians (min-max) in ms, ratio = median of per-round ratios")
    for name in args.only:
        base = results[(name, "kernel")]
        for engine in engines:
            xs = results[(name, engine)]
            print(f"  {name:7} {engine:15} {ms(xs)}  x{pair_ratio(xs, base):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
