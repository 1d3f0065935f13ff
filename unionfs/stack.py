"""LayerStack: the union model — resolve names through the layers, merge directories, own inodes.

Pure and synchronous: never imports pyfuse3, so it is unit-tested without a mount.
Layers are given top-first (index 0 is the upper directory when there is one, then the lowers
top to bottom), exactly as overlayfs's lowerdir option lists them.

Semantics (Documentation/filesystems/overlayfs.rst): a lookup goes top-down; a non-directory
hides everything below it; directories of the same name merge until an opaque directory; the
markers of `markers` hide lower names and are never shown themselves.  The root merges every
layer (the kernel ignores opaque markers on layer roots).

Why lookups do not get slower with depth: each directory node remembers the (layer, real
path) pairs where it exists (`Node.dirs`), and its merged listing is built once, by one
`scandir` per such layer, into a dict.  A lookup is then a dict hit, whatever the number of
layers; a directory that lives only in the bottom layer has a one-element chain.

Inode numbers: the daemon owns them.  A non-directory's number comes from its real object's
(st_dev, st_ino) — so hard links in a layer share it — and a directory's from its *bottom*
(origin) real directory, so it does not change when an upper copy appears above it.  Numbers
are composed like overlayfs's xino: the high bits carry an index of the underlying device.
Each Node counts kernel lookups; `forget` drops it at zero (pyfuse3's contract), so memory
follows what the kernel caches, not what was ever seen.

Caching: lower layers are read-only by contract (overlayfs: changing them under a mount is
undefined), so listings and stat results of lower objects are cached for the node's life.
Concurrency: called from the single trio thread only; no method awaits, so each call is atomic.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass
from typing import NewType

from . import markers
from .errors import NotADirectory, NotFound, StaleHandle

Inode = NewType("Inode", int)
ROOT_INODE = Inode(1)

_XINO_SHIFT = 48
_XINO_MAX_DEV = (1 << 15) - 1
_FALLBACK_BASE = 1 << 63

_DTYPE_KIND = {
    "dir": stat.S_IFDIR,
    "reg": stat.S_IFREG,
    "lnk": stat.S_IFLNK,
}


@dataclass(slots=True)
class DirLayer:
    """One real directory taking part in a merged directory."""

    layer: int
    path: bytes
    ino: int  # the real st_ino, from readdir (d_ino) or lstat


@dataclass(slots=True)
class Child:
    """An entry of a merged listing: the topmost real object of that name."""

    kind: int  # S_IFMT of the topmost object
    layer: int
    path: bytes
    ino: int
    dirs: list[DirLayer] | None  # directories only: every layer where it is a directory
    trimmed: list[DirLayer] | None = None  # `dirs` cut at the first opaque one (lazily)
    node_ino: int = 0  # the merged inode number, once known


class Node:
    """A merged object known to the kernel (or the root).  See the module docstring."""

    __slots__ = (
        "ino",
        "parent",
        "name",
        "kind",
        "layer",
        "path",
        "dirs",
        "st",
        "lookups",
        "listing",
        "attrs",
    )

    def __init__(
        self,
        ino: Inode,
        parent: Node | None,
        name: bytes,
        kind: int,
        layer: int,
        path: bytes,
        dirs: list[DirLayer] | None,
    ) -> None:
        self.ino = ino
        self.parent = parent
        self.name = name
        self.kind = kind
        self.layer = layer
        self.path = path
        self.dirs = dirs
        self.st: os.stat_result | None = None
        self.lookups = 0
        self.listing: dict[bytes, Child] | None = None
        self.attrs: object | None = None  # the adapter's cached reply, for immutable objects

    @property
    def is_dir(self) -> bool:
        return self.kind == stat.S_IFDIR

    @property
    def merged(self) -> bool:
        return self.dirs is not None and len(self.dirs) > 1

    def merged_path(self) -> bytes:
        parts: list[bytes] = []
        node: Node | None = self
        while node is not None and node.parent is not None:
            parts.append(node.name)
            node = node.parent
        return b"/" + b"/".join(reversed(parts))


class LayerStack:
    """The union of `layers` (top-first).  `upper` is True when layers[0] is writable."""

    def __init__(self, lowers: list[str], upper: str | None = None) -> None:
        paths = ([upper] if upper is not None else []) + list(lowers)
        self.layers: list[bytes] = [os.fsencode(os.path.abspath(p)) for p in paths]
        self.has_upper = upper is not None
        self.devs = [os.stat(p).st_dev for p in self.layers]
        self._dev_index: dict[int, int] = {}
        self._fallback: dict[tuple[int, int], Inode] = {}
        self.nodes: dict[Inode, Node] = {}
        root_dirs = [DirLayer(i, p, os.stat(p).st_ino) for i, p in enumerate(self.layers)]
        self.root = Node(ROOT_INODE, None, b"", stat.S_IFDIR, 0, self.layers[0], root_dirs)
        self.root.lookups = 1  # the kernel never forgets the root
        self.nodes[ROOT_INODE] = self.root
        # Mark directories that may hold xattr whiteouts (overlay.opaque=x).
        self._xwh: set[bytes] = set()
        for d in root_dirs:
            if markers.dir_marks(d.path).xwhiteouts:
                self._xwh.add(d.path)

    # ----- inode numbers -------------------------------------------------------------
    def ino_for(self, layer: int, real_ino: int) -> Inode:
        dev = self.devs[layer]
        idx = self._dev_index.setdefault(dev, len(self._dev_index))
        if real_ino < (1 << _XINO_SHIFT) and idx < _XINO_MAX_DEV:
            return Inode(((idx + 1) << _XINO_SHIFT) | real_ino)
        key = (dev, real_ino)
        found = self._fallback.get(key)
        if found is None:
            found = Inode(_FALLBACK_BASE + len(self._fallback))
            self._fallback[key] = found
        return found

    # ----- node table ----------------------------------------------------------------
    def node(self, ino: int) -> Node:
        try:
            return self.nodes[Inode(ino)]
        except KeyError:
            raise StaleHandle(f"unknown inode {ino}") from None

    def remember(self, node: Node, count: int = 1) -> None:
        """The kernel learned of `node` (lookup, readdirplus entry, create): count it."""
        node.lookups += count
        self.nodes[node.ino] = node

    def forget(self, ino: int, count: int) -> None:
        node = self.nodes.get(Inode(ino))
        if node is None or node is self.root:
            return
        node.lookups -= count
        if node.lookups <= 0:
            del self.nodes[node.ino]

    def drop_if_unused(self, node: Node) -> None:
        if node.lookups <= 0 and node is not self.root:
            self.nodes.pop(node.ino, None)

    # ----- resolution ----------------------------------------------------------------
    def listing(self, node: Node) -> dict[bytes, Child]:
        if not node.is_dir or node.dirs is None:
            raise NotADirectory()
        if node.listing is None:
            node.listing = self._merge(node.dirs)
        return node.listing

    def _merge(self, dirs: list[DirLayer]) -> dict[bytes, Child]:
        result: dict[bytes, Child] = {}
        blocked: set[bytes] = set()  # names a higher layer settled as non-dir or whiteout
        last = len(dirs) - 1
        for pos, d in enumerate(dirs):
            whiteouts: list[bytes] = []
            xwh = d.path in self._xwh
            with os.scandir(d.path) as it:
                for de in it:
                    name: bytes = de.name  # type: ignore[assignment]
                    if name == markers.WH_OPAQUE:
                        continue
                    target = markers.oci_whiteout_target(name)
                    if target is not None:
                        whiteouts.append(target)
                        continue
                    kind = _kind(de)
                    if kind == stat.S_IFCHR or (xwh and kind == stat.S_IFREG):
                        st = de.stat(follow_symlinks=False)
                        if markers.is_chardev_whiteout(st) or (
                            xwh and markers.is_xattr_whiteout(de.path, st)  # type: ignore[arg-type]
                        ):
                            whiteouts.append(name)
                            continue
                    if name in blocked:
                        continue
                    path: bytes = de.path  # type: ignore[assignment]
                    existing = result.get(name)
                    if existing is None:
                        isdir = kind == stat.S_IFDIR
                        dl = [DirLayer(d.layer, path, de.inode())] if isdir else None
                        result[name] = Child(kind, d.layer, path, de.inode(), dl)
                        if not isdir:
                            blocked.add(name)
                    elif existing.dirs is not None and kind == stat.S_IFDIR and pos <= last:
                        existing.dirs.append(DirLayer(d.layer, path, de.inode()))
                    else:
                        blocked.add(name)
            blocked.update(whiteouts)
        return result

    def lookup(self, parent: Node, name: bytes) -> Node:
        """Resolve `name` in directory `parent`; the caller `remember`s the result."""
        if name == b".":
            return parent
        if name == b"..":
            return parent.parent or self.root
        child = self.listing(parent).get(name)
        if child is None:
            raise NotFound()
        return self.node_for(parent, name, child)

    def node_for(self, parent: Node, name: bytes, child: Child) -> Node:
        """The node of a listing entry: the known one, or a new one (not yet remembered)."""
        if child.node_ino:
            node = self.nodes.get(Inode(child.node_ino))
            if node is not None and (not node.is_dir or node.parent is parent):
                return node
        if child.dirs is not None and child.trimmed is None:
            child.trimmed = self._trim(child.dirs)
        dirs = child.trimmed
        origin_layer, origin_ino = (
            (dirs[-1].layer, dirs[-1].ino) if dirs else (child.layer, child.ino)
        )
        ino = self.ino_for(origin_layer, origin_ino)
        child.node_ino = ino
        node = self.nodes.get(ino)
        if node is not None:
            if node.is_dir:  # a directory has one place; keep its name current
                node.parent, node.name = parent, name
            return node
        return Node(
            ino,
            parent,
            name,
            child.kind,
            child.layer,
            child.path,
            list(dirs) if dirs is not None else None,
        )

    def _trim(self, chain: list[DirLayer]) -> list[DirLayer]:
        """Cut a directory chain after its first opaque member; note xattr-whiteout dirs."""
        if len(chain) == 1:
            return list(chain)
        out: list[DirLayer] = []
        for pos, d in enumerate(chain):
            out.append(d)
            marks = markers.dir_marks(d.path)
            if marks.xwhiteouts:
                self._xwh.add(d.path)
            if pos == len(chain) - 1:
                break
            if marks.opaque or _exists(os.path.join(d.path, markers.WH_OPAQUE)):
                break
        return out

    # ----- attributes and content ---------------------------------------------------
    def immutable(self, node: Node) -> bool:
        """True when nothing can change the node's attributes: it lives in a lower layer."""
        return not (self.has_upper and node.layer == 0)

    def stat(self, node: Node) -> os.stat_result:
        """lstat of the node's topmost real object; cached for objects in lower layers."""
        if node.st is not None:
            return node.st
        st = os.lstat(node.path)
        if not (self.has_upper and node.layer == 0):
            node.st = st
        return st

    def nlink(self, node: Node, st: os.stat_result) -> int:
        """Link count; for a merged directory, 2 + its merged subdirectories (the kernel
        reports 1 there; this is what a plain directory would say)."""
        if not node.merged:
            return st.st_nlink
        listing = self.listing(node)
        return 2 + sum(1 for c in listing.values() if c.dirs is not None)

    def readlink(self, node: Node) -> bytes:
        if node.kind != stat.S_IFLNK:
            raise OSError(errno.EINVAL, "not a symlink")
        return os.readlink(node.path)

    def getxattr(self, node: Node, name: bytes) -> bytes:
        if markers.is_internal_xattr(name):
            raise OSError(errno.ENODATA, "no such attribute")
        return os.getxattr(node.path, name, follow_symlinks=False)

    def listxattr(self, node: Node) -> list[bytes]:
        names = os.listxattr(node.path, follow_symlinks=False)
        return [n for n in map(os.fsencode, names) if not markers.is_internal_xattr(n)]

    def statvfs(self) -> os.statvfs_result:
        return os.statvfs(self.layers[0])


def _kind(de: os.DirEntry) -> int:  # type: ignore[type-arg]
    """S_IFMT from d_type where the filesystem gives it; lstat otherwise."""
    if de.is_dir(follow_symlinks=False):
        return stat.S_IFDIR
    if de.is_symlink():
        return stat.S_IFLNK
    if de.is_file(follow_symlinks=False):
        return stat.S_IFREG
    return stat.S_IFMT(de.stat(follow_symlinks=False).st_mode)


def _exists(path: bytes) -> bool:
    try:
        os.lstat(path)
    except FileNotFoundError:
        return False
    return True
