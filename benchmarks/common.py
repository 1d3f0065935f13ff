"""What the benchmark modules share: where layerfs is, and unmounting whatever happens.
Root only; nothing here is timed itself.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

LAYERFS = str(Path(sys.executable).parent / "layerfs")


def umount(mnt: Path) -> None:
    """Unmount if mounted; lazily when busy."""
    if not any(line.split()[4] == str(mnt) for line in open("/proc/self/mountinfo")):
        return
    if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
