"""Commit of a change touching 1,000 files: `layer commit` versus `umoci repack`.

    python -m benchmarks.commit_bench [--files N] [--rounds R]

Lower image: the pull benchmark's image (3 gzip layers, N files).  Each round, for layer: mount
the image with a fresh upper, rewrite 1,000 of its files, unmount, time `layer commit`; for
umoci: `umoci unpack` into a fresh bundle, rewrite the same 1,000 files in its rootfs, time
`umoci repack`.  Medians and the median of pair-by-pair ratios.  Root only.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import ms, pair_ratio
from benchmarks.pull_bench import CACHE, build_image

LAYER = str(Path(sys.executable).parent / "layer")


def touch_files(root: Path, files: int) -> None:
    for i in range(0, min(files, 3000), max(1, min(files, 3000) // 1000)):
        p = root / f"usr/share/l{i % 3}/d{(i // 3) % 50}/f{i // 3}"
        if p.exists():
            p.write_bytes(b"changed %d\n" % i)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    image = CACHE / f"image-{args.files}"
    build_image(image, args.files)
    work = Path(tempfile.mkdtemp(prefix="commit-bench-"))
    ours, theirs = [], []
    try:
        store = work / "store"
        subprocess.run(
            [LAYER, "pull", "-q", "--root", str(store), "--name", "base", f"oci:{image}:v1"],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        for r in range(args.rounds):
            mnt = work / f"mnt{r}"
            mnt.mkdir()
            subprocess.run(
                [LAYER, "mount", "--root", str(store), "base", str(mnt), "--name", f"c{r}"],
                check=True,
                stdout=subprocess.DEVNULL,
            )
            try:
                touch_files(mnt, args.files)
            finally:
                subprocess.run(["fusermount3", "-u", str(mnt)], check=True)
            t0 = time.perf_counter()
            subprocess.run(
                [LAYER, "commit", "--root", str(store), f"c{r}", f"new:{r}"],
                check=True,
                stdout=subprocess.DEVNULL,
            )
            ours.append(time.perf_counter() - t0)
            layout, bundle = work / f"o{r}", work / f"b{r}"
            shutil.copytree(image, layout)
            subprocess.run(
                ["umoci", "unpack", "--image", f"{layout}:v1", str(bundle)],
                check=True,
                capture_output=True,
            )
            touch_files(bundle / "rootfs", args.files)
            t0 = time.perf_counter()
            subprocess.run(
                ["umoci", "repack", "--image", f"{layout}:new", str(bundle)],
                check=True,
                capture_output=True,
            )
            theirs.append(time.perf_counter() - t0)
            shutil.rmtree(bundle)
            shutil.rmtree(layout)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"commit of 1,000 changed files over a {args.files}-file image, {args.rounds} rounds")
    print(f"  layer commit   {ms(ours)}")
    print(f"  umoci repack   {ms(theirs)}")
    print(f"  ratio (layer / umoci), median of pairs: x{pair_ratio(ours, theirs):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
