"""Snapshots of a mounted tree, for comparing layerfs with the oracle (kernel overlayfs).

A snapshot maps each path to what a user can observe: type, mode, owner, size, mtime,
content hash, symlink target, device number, link count, xattrs and the directory's names.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from dataclasses import dataclass, field


@dataclass
class Obj:
    kind: str
    mode: int
    uid: int
    gid: int
    size: int | None
    mtime_ns: int
    nlink: int
    content: str | None = None
    target: bytes | None = None
    rdev: int | None = None
    xattrs: dict[bytes, bytes] = field(default_factory=dict)
    names: list[bytes] | None = None
    ino: int = 0
    d_inos: dict[bytes, int] = field(default_factory=dict)


def _kind(mode: int) -> str:
    return {
        stat.S_IFDIR: "dir",
        stat.S_IFREG: "file",
        stat.S_IFLNK: "symlink",
        stat.S_IFCHR: "chardev",
        stat.S_IFBLK: "blockdev",
        stat.S_IFIFO: "fifo",
        stat.S_IFSOCK: "socket",
    }[stat.S_IFMT(mode)]


def _xattrs(path: bytes) -> dict[bytes, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as exc:
        if exc.errno == errno.ENOTSUP:
            return {}
        raise
    out = {}
    for n in names:
        out[os.fsencode(n)] = os.getxattr(path, n, follow_symlinks=False)
    return out


def snapshot(root: str | os.PathLike[str]) -> dict[bytes, Obj]:
    base = os.fsencode(root)
    result: dict[bytes, Obj] = {}

    def visit(rel: bytes) -> None:
        path = base + rel if rel else base
        st = os.lstat(path)
        kind = _kind(st.st_mode)
        obj = Obj(
            kind,
            stat.S_IMODE(st.st_mode),
            st.st_uid,
            st.st_gid,
            None if kind == "dir" else st.st_size,
            st.st_mtime_ns,
            st.st_nlink,
            ino=st.st_ino,
        )
        obj.xattrs = _xattrs(path)
        if kind == "file":
            h = hashlib.sha256()
            with open(path, "rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
            obj.content = h.hexdigest()
        elif kind == "symlink":
            obj.target = os.readlink(path)
        elif kind in ("chardev", "blockdev"):
            obj.rdev = st.st_rdev
        result[rel or b"/"] = obj
        if kind == "dir":
            with os.scandir(path) as it:
                entries = sorted((e.name, e.inode()) for e in it)
            obj.names = [n for n, _ in entries]
            obj.d_inos = dict(entries)
            for name in obj.names:
                visit(rel + b"/" + name)

    visit(b"")
    return result


def subdir_count(tree: dict[bytes, Obj], path: bytes) -> int:
    obj = tree[path]
    prefix = b"" if path == b"/" else path
    return sum(1 for n in obj.names or [] if tree[prefix + b"/" + n].kind == "dir")


def diff(
    ours: dict[bytes, Obj],
    theirs: dict[bytes, Obj],
    *,
    merged_dir_nlink_one: bool = True,
    compare_mtime: bool = True,
) -> list[str]:
    """Differences a user could see; empty when the trees agree.  Inode numbers are not
    compared across filesystems, and the kernel's nlink=1 for merged directories is
    accepted where ours gives the real count (checked separately)."""
    problems = []
    for path in sorted(set(ours) | set(theirs)):
        a, b = ours.get(path), theirs.get(path)
        if a is None or b is None:
            problems.append(f"{path!r}: only in {'theirs' if a is None else 'ours'}")
            continue
        fields = [
            "kind",
            "mode",
            "uid",
            "gid",
            "size",
            "content",
            "target",
            "rdev",
            "xattrs",
            "names",
        ] + (["mtime_ns"] if compare_mtime else [])
        for fld in fields:
            va, vb = getattr(a, fld), getattr(b, fld)
            if va != vb:
                problems.append(f"{path!r}: {fld} {va!r} != {vb!r}")
        if a.nlink != b.nlink and not (a.kind == "dir" and merged_dir_nlink_one and b.nlink == 1):
            problems.append(f"{path!r}: nlink {a.nlink} != {b.nlink}")
    return problems


def inode_problems(tree: dict[bytes, Obj]) -> list[str]:
    """st_ino must equal readdir's d_ino everywhere, and be unique per object."""
    problems = []
    for path, obj in tree.items():
        if obj.kind != "dir":
            continue
        prefix = b"" if path == b"/" else path
        for name, d_ino in obj.d_inos.items():
            child = tree[prefix + b"/" + name]
            if child.ino != d_ino:
                problems.append(f"{prefix + b'/' + name!r}: st_ino {child.ino} != d_ino {d_ino}")
    return problems


def link_groups(tree: dict[bytes, Obj]) -> dict[bytes, tuple[bytes, ...]]:
    """Each non-directory's path -> every path showing the same st_ino (itself included):
    which names are one inode, comparable across filesystems."""
    by_ino: dict[int, list[bytes]] = {}
    for path, obj in tree.items():
        if obj.kind != "dir":
            by_ino.setdefault(obj.ino, []).append(path)
    return {p: tuple(sorted(by_ino[o.ino])) for p, o in tree.items() if o.kind != "dir"}


def link_group_problems(ours: dict[bytes, Obj], theirs: dict[bytes, Obj]) -> list[str]:
    """Names that are one inode on one side and not on the other."""
    a, b = link_groups(ours), link_groups(theirs)
    return [
        f"{path!r}: one inode with {a[path]!r} != {b[path]!r}"
        for path in sorted(set(a) & set(b))
        if a[path] != b[path]
    ]
