"""The daemon's descriptors: the limit raised once at start, and a budget for open files.

One user holding many files open through an allow_other mount must not make everybody else's
opens fail with EMFILE, nor leave the daemon without descriptors for its own work (lookups,
copy-up, listings, the control socket): each open file costs the daemon a descriptor.

- `raise_nofile()` sets RLIMIT_NOFILE's soft limit to the hard one and, with CAP_SYS_RESOURCE,
  both up to `fs.nr_open` (at most TARGET), as systemd and containerd do for their daemons.
  Never raises: a limit it cannot change is logged and left as it was.
- `FdBudget` then shares what the limit allows among the openers, by uid (see its docstring).
  Where the hard limit cannot be raised (a container without CAP_SYS_RESOURCE, a rootless
  mount) the budget is what keeps root and the daemon working.

Concurrency: FdBudget is used from the trio thread only (the handlers that open and release).
"""

from __future__ import annotations

import errno
import resource
from collections import Counter

from .logs import log

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


class FdBudget:
    """Open-file handles counted per uid against the daemon's descriptor limit.

    - RESERVE (an eighth of the limit, at least 64) is never given to handles: the daemon's own
      work needs descriptors at any time.
    - The rest is the pool.  Root's opens may use all of it.
    - Users other than root together hold at most three quarters of the pool, and one user at
      most half, so one user can starve neither root nor every other user.

    An open beyond its share fails with ENFILE ("too many open files in system": the
    filesystem's table is full for that user), while the opener's own EMFILE limit is untouched.
    """

    def __init__(self, limit: int | None = None) -> None:
        if limit is None:
            limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
            if limit == resource.RLIM_INFINITY:
                limit = TARGET
        self.limit = limit
        self.reserve = max(64, limit // 8)
        self.pool = max(0, limit - self.reserve)
        self.users_cap = self.pool * 3 // 4
        self.user_cap = self.pool // 2
        self._held: Counter[int] = Counter()
        self._total = 0

    def take(self, uid: int) -> None:
        """Count one more handle for `uid`, or raise OSError(ENFILE) when over its share."""
        others = self._total - self._held[0]
        if uid == 0:
            allowed = self._total < self.pool
        else:
            allowed = others < self.users_cap and self._held[uid] < self.user_cap
        if not allowed:
            log.warning("open refused for uid %d: %d handles held (limit %d)",
                        uid, self._held[uid], self.limit)  # fmt: skip
            raise OSError(errno.ENFILE, "open-file budget of this mount exhausted")
        self._held[uid] += 1
        self._total += 1

    def give(self, uid: int) -> None:
        """A handle of `uid` was released."""
        if self._held[uid] > 0:
            self._held[uid] -= 1
            self._total -= 1
            if not self._held[uid]:
                del self._held[uid]
