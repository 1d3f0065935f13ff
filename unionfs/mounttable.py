"""The mount table as this process sees it, read from /proc/self/mountinfo.

Whether a path is mounted is always read here, never by stat-ing the path: a hung FUSE
mountpoint would hang the stat.  Used by the `layer` commands (cli/mounts.py), the tests'
mount fixtures, and the daemon: its mount's own flags (atime.py) and a remount's
(fuse/mount.py).  Reads a fresh copy on every call; no state.
"""

from __future__ import annotations

import os

MOUNTINFO = "/proc/self/mountinfo"


def unescape(field: bytes) -> bytes:
    """mountinfo writes space, tab, newline and backslash as octal escapes (`\\040`); no `re`,
    whose import a mount's start-up does not otherwise pay."""
    parts = field.split(b"\\")
    out = [parts[0]]
    for part in parts[1:]:
        code = part[:3]
        if len(code) == 3 and all(0x30 <= c <= 0x37 for c in code):
            out.append(bytes([int(code, 8)]) + part[3:])
        else:
            out.append(b"\\" + part)
    return b"".join(out)


def entries(text: bytes) -> list[tuple[bytes, bytes, bytes, bytes, bytes]]:
    """Each line of mountinfo `text`, in mount order: (major:minor, mountpoint unescaped,
    per-mount options, filesystem type, superblock options); malformed lines are skipped."""
    out = []
    for line in text.splitlines():
        fields = line.split()
        try:
            sep = fields.index(b"-")
            out.append((fields[2], unescape(fields[4]), fields[5], fields[sep + 1],
                        fields[sep + 3]))  # fmt: skip
        except (ValueError, IndexError):
            continue
    return out


def read() -> bytes:
    with open(MOUNTINFO, "rb") as f:
        return f.read()


def mount_table() -> list[tuple[str, str]]:
    """(mountpoint, fstype) of every mount visible to this process, in mount order."""
    return [(os.fsdecode(where), typ.decode()) for _, where, _, typ, _ in entries(read())]


def fstype(mountpoint: str) -> str | None:
    """The type of the topmost mount on `mountpoint`, or None when nothing is mounted there."""
    found = None
    for path, typ in mount_table():
        if path == mountpoint:
            found = typ
    return found
