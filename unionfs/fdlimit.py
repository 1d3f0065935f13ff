"""The daemon's descriptor limit: raised as far as the system allows, once, at start.

One user holding many files open through an allow_other mount must not make everybody else's
opens fail with EMFILE: each open file costs the daemon a descriptor.  `raise_nofile()` sets
RLIMIT_NOFILE's soft limit to the hard one and, as root, both up to `fs.nr_open` (at most
TARGET), as systemd and containerd do for their daemons.  Never raises: a limit it cannot
change is logged and left as it was.
"""

from __future__ import annotations

import logging
import resource

log = logging.getLogger("layerfs")

TARGET = 1 << 20


def _nr_open() -> int:
    try:
        with open("/proc/sys/fs/nr_open") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return TARGET


def raise_nofile(target: int = TARGET) -> int:
    """Raise RLIMIT_NOFILE (see the module docstring); returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    ceiling = min(target, _nr_open())
    if hard == resource.RLIM_INFINITY or hard > ceiling:
        hard_wanted = ceiling
    else:
        hard_wanted = max(hard, ceiling)
    for new_hard in (hard_wanted, hard):
        if new_hard == resource.RLIM_INFINITY:
            continue
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new_hard, new_hard))
            return new_hard
        except (ValueError, OSError):
            continue  # not root (the hard limit cannot grow): try the soft one up to it
    log.warning("could not raise RLIMIT_NOFILE above %s", soft)
    return soft
