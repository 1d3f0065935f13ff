"""`find` over a layer stack: layerfs versus kernel overlayfs (what overlay2 uses).

    python -m benchmarks.find_bench [--files N] [--rounds R]

Builds (once, cached under /var/tmp/layer-bench) three layers of small files in the
kernel's format, mounts the same directories with `mount -t overlay` and with `layerfs`,
and times `find MNT -ls` (one stat per entry) cold (after dropping the kernel's caches) and
warm, interleaving the engines round by round.  Prints medians (min–max) and the ratio to
kernel overlayfs computed pair by pair.  Root only (mount, drop_caches).  This is the first
piece of the harness that issue 6 grows.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import mount, ms, pair_ratio, umount

CACHE = Path("/var/tmp/layer-bench/find")


def build(files: int) -> list[Path]:
    root = CACHE / f"{files}"
    layers = [root / f"l{i}" for i in range(3)]
    if (root / "done").exists():
        return list(reversed(layers))
    shutil.rmtree(root, ignore_errors=True)
    for li, layer in enumerate(layers):
        share = files // (2 if li == 0 else 4)
        for i in range(share):
            d = layer / f"dir{i % 97:02d}" / f"sub{i % 7}"
            d.mkdir(parents=True, exist_ok=True)
            (d / f"f{li}-{i}").write_bytes(b"x" * (i % 4096))
        if li > 0:  # whiteouts for some lower files
            for i in range(0, files // 2, 50):
                d = layer / f"dir{i % 97:02d}" / f"sub{i % 7}"
                d.mkdir(parents=True, exist_ok=True)
                target = d / f"f0-{i}"
                if not target.exists():
                    os.mknod(target, 0o20600, os.makedev(0, 0))
    (root / "done").touch()
    return list(reversed(layers))


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3")


def timed_find(mnt: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run(["find", str(mnt), "-ls"], stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=5000)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("find_bench: needs root (mount, drop_caches)", file=sys.stderr)
        return 2
    lowers = build(args.files)
    engines = ["kernel", "layerfs"] + (["fuse-overlayfs"] if shutil.which("fuse-overlayfs") else [])
    mnts = {e: CACHE / f"mnt-{e}" for e in engines}
    results: dict[tuple[str, str], list[float]] = {}
    try:
        for e, m in mnts.items():
            m.mkdir(parents=True, exist_ok=True)
            umount(m)
            mount(e, "lowerdir=" + ":".join(map(str, lowers)), m)
        for _ in range(args.rounds):
            for e, m in mnts.items():
                drop_caches()
                results.setdefault((e, "cold"), []).append(timed_find(m))
                timed_find(m)
                results.setdefault((e, "warm"), []).append(timed_find(m))
    finally:
        for m in mnts.values():
            umount(m)
    entries = sum(
        1
        for _ in subprocess.run(
            ["find", str(lowers[-1])], capture_output=True, text=True
        ).stdout.splitlines()
    )
    print(
        f"find -ls over 3 layers (~{entries} entries in the bottom layer), "
        f"{args.rounds} rounds, medians (min-max) in ms"
    )
    for mode in ("cold", "warm"):
        base = results[("kernel", mode)]
        for e in engines:
            xs = results[(e, mode)]
            print(f"  {mode:4} {e:15} {ms(xs)}  x{pair_ratio(xs, base):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
