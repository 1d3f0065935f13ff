"""The mount table as this process sees it, read from /proc/self/mountinfo.

Whether a path is mounted is always read here, never by stat-ing the path: a hung FUSE
mountpoint would hang the stat.  Used by the `layer` commands (cli/mounts.py) and by the
tests' mount fixtures.  Reads a fresh copy on every call; no state.
"""

from __future__ import annotations


def _unescape_mountinfo(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash as octal escapes (`\\040`)."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and len(field) >= i + 4 and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mount_table() -> list[tuple[str, str]]:
    """(mountpoint, fstype) of every mount visible to this process, in mount order."""
    table = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            table.append((_unescape_mountinfo(left.split()[4]), right.split()[0]))
    return table


def fstype(mountpoint: str) -> str | None:
    """The type of the topmost mount on `mountpoint`, or None when nothing is mounted there."""
    found = None
    for path, typ in mount_table():
        if path == mountpoint:
            found = typ
    return found
