"""What the benchmark scripts share: mounting an engine, unmounting, and the one way results
are summarised (median, min–max, and the median of pair-by-pair ratios, since these machines
are noisy).  Root only; nothing here is timed itself.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
from pathlib import Path

LAYERFS = str(Path(sys.executable).parent / "layerfs")


def mount(engine: str, opts: str, mnt: Path) -> None:
    """Mount with `kernel` overlayfs, `fuse-overlayfs` or `layerfs`, same options for all."""
    cmd = {
        "kernel": ["mount", "-t", "overlay", "overlay", "-o", opts, str(mnt)],
        "fuse-overlayfs": ["fuse-overlayfs", "-o", opts, str(mnt)],
        "layerfs": [LAYERFS, "-o", opts, str(mnt)],
    }[engine]
    subprocess.run(cmd, check=True)


def umount(mnt: Path) -> None:
    """Unmount if mounted; lazily when busy."""
    if not any(line.split()[4] == str(mnt) for line in open("/proc/self/mountinfo")):
        return
    if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def ms(xs: list[float]) -> str:
    """`median (min-max)` in milliseconds."""
    return f"{statistics.median(xs) * 1e3:8.1f} ({min(xs) * 1e3:.1f}-{max(xs) * 1e3:.1f}) ms"


def pair_ratio(xs: list[float], base: list[float]) -> float:
    """Median of the per-round ratios xs[i] / base[i]."""
    return statistics.median(a / b for a, b in zip(xs, base, strict=True))
