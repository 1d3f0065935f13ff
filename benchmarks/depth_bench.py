"""Lookup cost against stack depth, and mount time, for layerfs.

    python -m benchmarks.depth_bench [--depths 2 100 500] [--rounds 5]

For each depth D: D layers, every one holding its own file at the root and a shared
directory, the bottom one also holding usr/lib/app/ with 1,000 files.  Times the mount (until
the parent returns, i.e. until the mount answers), then, cold (caches dropped), `stat` of the
1,000 bottom-layer files.  Lookup cost should not grow with D (the kernel cannot even mount
more than 500 layers).  Root only.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

CACHE = Path("/var/tmp/layer-bench/depth")
LAYERFS = str(Path(sys.executable).parent / "layerfs")


def build(depth: int) -> list[Path]:
    root = CACHE / str(depth)
    layers = [root / f"l{i:03d}" for i in range(depth)]
    if not (root / "done").exists():
        shutil.rmtree(root, ignore_errors=True)
        for i, layer in enumerate(layers):
            (layer / "shared").mkdir(parents=True)
            (layer / f"own{i}").write_bytes(b"x")
            (layer / "shared" / f"s{i}").write_bytes(b"x")
        app = layers[0] / "usr/lib/app"
        app.mkdir(parents=True)
        for j in range(1000):
            (app / f"f{j}").write_bytes(b"y")
        (root / "done").touch()
    return list(reversed(layers))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--depths", type=int, nargs="*", default=[2, 100, 500])
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("depth_bench: needs root", file=sys.stderr)
        return 2
    mnt = CACHE / "mnt"
    mnt.mkdir(parents=True, exist_ok=True)
    print(f"{args.rounds} rounds; medians (min-max) in ms")
    for depth in args.depths:
        lowers = build(depth)
        opts = "lowerdir=" + ":".join(map(str, lowers))
        mount_t, stat_t = [], []
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            subprocess.run([LAYERFS, "-o", opts, str(mnt)], check=True)
            mount_t.append(time.perf_counter() - t0)
            try:
                os.sync()
                Path("/proc/sys/vm/drop_caches").write_text("3")
                t0 = time.perf_counter()
                for j in range(1000):
                    os.stat(mnt / "usr/lib/app" / f"f{j}")
                stat_t.append(time.perf_counter() - t0)
            finally:
                subprocess.run(["fusermount3", "-u", str(mnt)], check=True)
                time.sleep(0.2)
        for name, xs in (("mount", mount_t), ("stat 1,000 bottom files, cold", stat_t)):
            print(
                f"  depth {depth:4}  {name:30} {statistics.median(xs) * 1e3:8.1f} "
                f"({min(xs) * 1e3:.1f}-{max(xs) * 1e3:.1f})"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
