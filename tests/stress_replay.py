"""Read the layers a failed test_stress run kept (/var/tmp/layerfs-stress/SEED) the ways the
test does, and print where they disagree: `python -m tests.stress_replay DIR [OPTIONS]`
(OPTIONS: the run's mode, e.g. `index=on`).  Root only; every mount is unmounted on exit.

The kept layers were moved, not copied, so the upper's origin marks still name the lower's
inodes.  Each mount gets a fresh work dir under DIR/replay; the layers themselves are read
only, except what kernel overlayfs writes to an upper it mounts (origins of merged
directories), as in the test.  A single-threaded tool, run by hand.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from tests import treecmp
from tests.mounts import KernelOverlay, LayerfsMount
from tests.test_stress import kernel_opts


def main(argv: list[str]) -> int:
    if not argv or not (Path(argv[0]) / "lo").is_dir() or not (Path(argv[0]) / "up").is_dir():
        print("usage: python -m tests.stress_replay DIR [OPTIONS]  (DIR holds lo/ and up/)")
        return 2
    base, opts = Path(argv[0]), argv[1] if len(argv) > 1 else ""
    lo, up, work = base / "lo", base / "up", base / "replay"
    shutil.rmtree(work, ignore_errors=True)
    for p in ("wk", "wk2", "mnt"):
        (work / p).mkdir(parents=True)
    mnt = work / "mnt"
    with LayerfsMount(mnt, [lo], up, work / "wk", extra_opts=opts, log_path=work / "log"):
        ours = treecmp.snapshot(mnt)
    with KernelOverlay(mnt, [lo], up, work / "wk2", kernel_opts(opts)):
        kernel = treecmp.snapshot(mnt)
    problems = treecmp.diff(ours, kernel, compare_mtime=False)
    for line in problems:
        print(line)
    print(f"{len(problems)} differences between layerfs and the kernel ({work / 'log'})")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
