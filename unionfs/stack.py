"""LayerStack: the union model — resolve names through the layers, merge directories, own inodes.

Pure and synchronous: never imports pyfuse3, so it is unit-tested without a mount.
Layers are given top-first (index 0 is the upper directory when there is one, then the lowers
top to bottom), exactly as overlayfs's lowerdir option lists them.

Semantics (Documentation/filesystems/overlayfs.rst): a lookup goes top-down; a non-directory
hides everything below it; directories of the same name merge until an opaque directory; a
directory's redirect (in any layer but the bottom one) says under which path the layers below
hold the rest of it; the markers of `markers` hide lower names and are never shown
themselves.  The root merges every layer (the kernel ignores opaque markers on layer roots).

Why lookups do not get slower with depth: each directory node remembers the (layer, real
path) pairs where it exists (`Node.dirs`), and its merged listing is built once, by one
`scandir` per such layer, into a dict.  A lookup is then a dict hit, whatever the number of
layers; a directory that lives only in the bottom layer has a one-element chain.  The first
few names looked up in a directory that nothing has listed yet are found by an lstat of
the name in each of its layers instead (`_probe`, `_merge`'s rules for one name): a
directory walked through or a file opened by name costs no listing of a directory that may
hold 200,000 names.

Inode numbers: the daemon owns them.  A non-directory's number comes from its real object's
(st_dev, st_ino) — so hard links in a layer share it — and a directory's from its *bottom*
(origin) real directory, so it does not change when an upper copy appears above it.  An
upper file copied up keeps its lower original's number: in this mount by `origins`, after a
remount by the kernel's `overlay.origin` stored at copy-up (origin.py).  With every layer on
one filesystem a number is the real one, as the kernel's (its root shows the topmost layer
root's); else numbers are composed like overlayfs's xino: the high bits carry an index of
the underlying device, counted in layer order at mount, so every mount of the same layers
gives the same numbers.
Each Node counts kernel lookups; `forget` drops it at zero (pyfuse3's contract), so memory
follows what the kernel caches, not what was ever seen.  One number has one Node object while
anything refers to it: a lookup finds a forgotten object that is still some node's parent
again (`_objects`), so renaming it moves every path below it.  A file whose names the daemon
no longer knows (`unlinked`) keeps its number and node until its real object is gone
(`deleted`): another name of it, looked up later, is the same inode, as on the kernel.

Real objects are reached through `fs` (a `fsat.Roots`): every call is relative to the fd of
its layer root, opened in the constructor — before the daemon mounts, so a mount over one of
its own layers works — and paths have no length limit.  Names longer than the layers allow
(`namemax`, the largest f_namemax of them, as overlayfs computes it) fail with ENAMETOOLONG.

Hard links (overlayfs's `index=`).  With `index=off` (the kernel's default) on a writable
stack, each name of a multiply-linked lower non-directory is a node of its own (the kernel
does not hash such inodes by their lower inode, because copy-up will break the link): its
number is fresh per (layer, real path), while stat reports the lower object's number, so the
names still show one st_ino and the lower link count until one of them is copied up; from
then on that name reports its upper file's number and link count.  `shown` holds the st_ino
of every node whose reported number differs from its node number.  With `index=on` (and on
read-only stacks) the names share one node, and copy-up links them in the upper (writer.py).

Caching: lower layers are read-only by contract (overlayfs: changing them under a mount is
undefined), so listings, stat results and xattr answers of lower objects are cached for the
node's life (dropped at copy-up, when the node's real object becomes an upper one).
Size: over 500 lines because resolution, inode numbering and hard-link bookkeeping are one
model; the marker rules are in rules.py, the encodings in markers.py.
Concurrency: called from the single trio thread only; no method awaits, so each call is atomic.
"""

from __future__ import annotations

import errno
import os
import stat
import sys
import weakref

from . import markers, origin, rules
from .errors import NameTooLong, NotADirectory, NotFound, StaleHandle, UnionError
from .fsat import Roots

TYPE_CHECKING = False  # typing's own constant, without importing typing before INIT (logs.py)
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import NewType

    Inode = NewType("Inode", int)  # a node id, told apart from other ints by mypy
else:
    Inode = int  # the same at run time (an int stays itself)
ROOT_INODE = Inode(1)

_XINO_SHIFT = 48
_XINO_MAX_DEV = (1 << 15) - 1
_FALLBACK_BASE = 1 << 63
# Numbers that no (device, inode) pair can produce, in disjoint ranges above _FALLBACK_BASE:
# [+0, +2^40) fallback numbers for devices past _XINO_MAX_DEV, [+2^40, +2^41) fresh numbers for
# upper inodes reused while the dead file's node lives, [+2^41, ...) per-name nodes.
_FRESH_BASE = _FALLBACK_BASE + (1 << 40)  # an upper inode number reused after an unlink
_PER_NAME_BASE = _FALLBACK_BASE + (1 << 41)  # one node per name of a lower link (`_own_ino`)
# A lower object keeps its xattr answers (`xattr_answer`): these errnos, and values up to
# _XATTR_KEPT_MAX bytes (capabilities, ACLs and labels are tens of bytes; a big user value
# is read again each time rather than held for as long as the kernel holds the node)
_XATTR_ABSENT = frozenset({errno.ENODATA, errno.EOPNOTSUPP})
_XATTR_KEPT_MAX = 1024
# Names in a directory found by probing its layers for them (`_probe`) before a lookup lists
# it: past a few, a directory is being searched or walked, and one listing answers every
# later name (hits and misses) from a dict.
PROBES = 4


class DirLayer:
    """One real directory taking part in a merged directory.  For the upper layer (0 when
    there is an upper) `path` may be stale after a rename: use `LayerStack.dir_paths`.
    (Plain classes here and in `Entry`: importing `dataclasses` costs every mount ~7 ms.)"""

    __slots__ = ("layer", "path", "ino")

    def __init__(self, layer: int, path: bytes, ino: int) -> None:
        self.layer = layer
        self.path = path
        self.ino = ino  # the real st_ino, from readdir (d_ino) or lstat

    def __repr__(self) -> str:
        return f"DirLayer({self.layer}, {self.path!r}, {self.ino})"


class Entry:
    """An entry of a merged listing: the topmost real object of that name (DESIGN.md's
    Entry: a resolved name, its layer and kind).  Built with keywords."""

    __slots__ = ("kind", "layer", "path", "ino", "dirs", "trimmed", "node_ino", "covers")

    def __init__(
        self,
        *,
        kind: int,
        layer: int,
        path: bytes,
        ino: int,
        dirs: list[DirLayer] | None,
        trimmed: list[DirLayer] | None = None,
        node_ino: int = 0,
        covers: bool = False,
    ) -> None:
        self.kind = kind  # S_IFMT of the topmost object
        self.layer = layer
        self.path = path  # real path when listed (upper layer: recomputed from the parent)
        self.ino = ino
        self.dirs = dirs  # directories only: every layer where it is a directory
        self.trimmed = trimmed  # `dirs` cut at the first opaque one (lazily)
        self.node_ino = node_ino  # the merged inode number, once known
        self.covers = covers  # a lower layer also has this name (a whiteout is due on removal)

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={getattr(self, k)!r}" for k in self.__slots__)
        return f"Entry({fields})"


class Node:
    """A merged object known to the kernel (or the root).  See the module docstring.

    `layer` is where the topmost real object lives; 0 with an upper means "in the upper",
    and then its real path is derived from `parent` and `name` (so renames of an ancestor
    never leave stale paths).  Lower objects keep their real path in `lower_path`."""

    __slots__ = (
        "ino",
        "parent",
        "name",
        "kind",
        "layer",
        "lower_path",
        "dirs",
        "st",
        "xattrs",
        "lookups",
        "listing",
        "subdirs",
        "probed",
        "unlinked",
        "deleted",
        "data",
        "prot",
        "impure",
        "reply",
        "__weakref__",  # adapters key their per-node state (locks) on nodes
    )

    def __init__(
        self,
        ino: Inode,
        parent: Node | None,
        name: bytes,
        kind: int,
        layer: int,
        lower_path: bytes,
        dirs: list[DirLayer] | None,
    ) -> None:
        self.ino = ino
        self.parent = parent
        self.name = name
        self.kind = kind
        self.layer = layer
        self.lower_path = lower_path
        self.dirs = dirs
        self.st: os.stat_result | None = None
        self.xattrs: dict[bytes, bytes | int] | None = None  # lower objects: `getxattr`'s answers
        self.lookups = 0
        self.listing: dict[bytes, Entry] | None = None
        self.subdirs: int | None = None  # directories in `listing` (nlink), once counted
        # names looked up before the directory was listed, with what each was found to be
        # (`LayerStack.find`): a listing made later links their nodes (`node_ino`)
        self.probed: dict[bytes, Entry | None] | None = None
        # `unlinked`: no name of it is known any more, so it is reached only through a file
        # still open on it.  `deleted`: its real object is gone too (no link left).  An
        # unlinked node that is not deleted is a hard-linked file whose other names were
        # never looked up: a lookup of one of them finds this node again (one inode, as the
        # kernel's overlay has), not a second node whose cached size and data go stale.
        self.unlinked = False
        self.deleted = False
        # metacopy=on: the lower file holding the data of an upper file the kernel copied
        # up by its metadata only (`LayerStack._metacopy_data`); None once filled, or never
        self.data: bytes | None = None
        # immutable/append-only (fileattr.PROT bits) of its upper object's overlay.protattr;
        # None until asked (UnionOperations._prot), 0 for objects this mount made
        self.prot: int | None = None
        # a directory whose upper object this mount has marked `overlay.impure` (Writer)
        self.impure = False
        # the handlers' reply for an object whose attributes never change, until
        # `invalidate`: theirs alone (UnionOperations._entry); a slot, where a weak
        # dictionary keyed by node cost ~1 µs a reply made and ~0.4 µs a reply reused
        self.reply: object | None = None

    def invalidate(self) -> None:
        """Its attributes changed, or may have: drop the cached stat, xattrs and reply."""
        self.st = None
        self.xattrs = None
        self.reply = None

    @property
    def is_dir(self) -> bool:
        return self.kind == stat.S_IFDIR

    @property
    def merged(self) -> bool:
        return self.dirs is not None and len(self.dirs) > 1

    @property
    def has_lower(self) -> bool:
        """A directory with parts in lower layers (renaming it needs a redirect)."""
        return self.dirs is not None and any(d.layer > 0 for d in self.dirs)


class LayerStack:
    """The union of `layers` (top-first).  `has_upper` is True when layers[0] is writable."""

    def __init__(
        self,
        lowers: list[str],
        upper: str | None = None,
        index: bool = False,
        follow_redirects: bool = True,
        fs: Roots | None = None,
        metacopy: bool = False,
        data_layers: list[str] | None = None,
    ) -> None:
        paths = ([upper] if upper is not None else []) + list(lowers)
        self.layers: list[bytes] = [os.fsencode(os.path.abspath(p)) for p in paths]
        self.has_upper = upper is not None
        self.index = index
        # GAP(issue-14): the kernel's WORKDIR/index/ (an upper it wrote with index=on) is not
        # read: names of a hard-linked lower file it did not copy up show the lower file.
        # metacopy files (`overlay.metacopy`: the kernel with metacopy=on copied only the
        # metadata up, the data is still below): read with metacopy=on, in any layer; in the
        # upper refused (EPERM) without, as the kernel (`_metacopy_data`).  GAP(issue-14):
        # without metacopy=on, not looked for in lower layers.
        self.metacopy = metacopy
        # redirect_dir=nofollow: a moved directory found in the upper is refused (EPERM), as
        # the kernel refuses it, rather than shown without the lower part it was moved with
        self.follow_redirects = follow_redirects
        self.fs = fs if fs is not None else Roots()
        root_st = [self.fs.add(p) for p in self.layers]
        # data-only lower layers (`lowerdir=A::D`): never merged into the tree; the data of
        # a metacopy file in the lowest lower layer whose redirect is absolute is looked for
        # there, top first (`_metacopy_data`), and only by its open, as the kernel's lazy
        # lowerdata lookup: until then stat guesses its blocks from its size
        # (`data_unopened`), and a missing data file fails the open (ENOENT), not the lookup.
        self.data_layers = [os.fsencode(os.path.abspath(p)) for p in data_layers or ()]
        data_devs = {self.fs.add(p).st_dev for p in self.data_layers}
        self._data_opened: set[Inode] = set()
        self._data_outside: set[bytes] = set()  # data paths whose redirect has a `..`
        self.namemax = max(self.fs.statvfs(p).f_namemax for p in self.layers)
        self.devs = [st.st_dev for st in root_st]
        # `_probe` numbers what it finds by st_ino, a listing by d_ino: the same number on a
        # filesystem of a block device (ext4, xfs, ...); not always on the others (an
        # overlay, FUSE or btrfs layer), whose directories are always listed
        self._probing = all(os.major(dev) != 0 for dev in self.devs)
        # every layer on one filesystem: the kernel then lists a lower entry with its own
        # d_ino, without looking it up (`listed_unlooked`)
        self._one_fs = len({*self.devs, *data_devs}) == 1
        # The device index in the high bits of a number, fixed in layer order (upper first),
        # as the kernel's xino numbers its layers' filesystems at mount: handed out in order
        # of first use, a lower file's st_ino depended on what was looked up first, and
        # changed from one mount of the same layers to the next.
        self._dev_index: dict[int, int] = {}
        for dev in self.devs:
            self._dev_index.setdefault(dev, len(self._dev_index))
        # where stored origins are decoded (origin.py): one lower layer root per filesystem,
        # top first, as the kernel's ovl_check_origin tries its lower layers
        self._origin_roots: list[bytes] = []
        seen: set[int] = set()
        for layer in range(1, len(self.layers)):
            if self.devs[layer] not in seen:
                seen.add(self.devs[layer])
                self._origin_roots.append(self.layers[layer])
        self._fallback: dict[tuple[int, int], Inode] = {}
        # upper real inode -> merged inode, for objects copied up during this mount, so a
        # file keeps its st_ino across copy-up even after the kernel forgets it.
        self.origins: dict[int, Inode] = {}
        self._fresh = 0  # count of fresh numbers, kept apart from the fallback ones
        # node number of each name of a multiply-linked lower file that is a node of its own
        # (index=off; `_apart`), by real path, and the st_ino to report for nodes whose
        # number is not what stat shows.
        self._per_name: dict[tuple[int, bytes], Inode] = {}
        self.shown: dict[Inode, int] = {}
        # called with a directory whose listing changed other than by a request on it (a
        # name's st_ino, hence its d_ino, changed at copy-up): the native transport tells
        # the kernel to drop the listing it keeps (FUSE_NOTIFY_INVAL_INODE)
        self.listing_changed: Callable[[Node], None] | None = None
        # called with a node whose attributes changed other than by a request that answers
        # with them (a copy-up broke its hard link: new st_ino, nlink 1): the native
        # transport tells the kernel to drop the ones it keeps (FUSE_NOTIFY_INVAL_INODE)
        self.attrs_changed: Callable[[Node], None] | None = None
        self.nodes: dict[Inode, Node] = {}
        # Node objects still referenced, by number, once the kernel forgot them: a
        # forgotten directory stays the parent of nodes the kernel still holds by other
        # names (hard links) and the parent in their known aliases, so a new lookup of it
        # must find that same object, or a rename of it would leave their paths stale.
        self._objects: weakref.WeakValueDictionary[Inode, Node] = weakref.WeakValueDictionary()
        # Other known names of hard-linked files (only for nodes reached by two names).
        self.aliases: dict[Inode, list[tuple[Node, bytes]]] = {}
        root_dirs = [DirLayer(i, p, root_st[i].st_ino) for i, p in enumerate(self.layers)]
        self.root = Node(ROOT_INODE, None, b"", stat.S_IFDIR, 0, self.layers[0], root_dirs)
        self.root.lookups = 1  # the kernel never forgets the root
        self.nodes[ROOT_INODE] = self.root
        if self._one_fs:  # as the kernel there: the number of the topmost layer's root
            self.shown[ROOT_INODE] = root_st[0].st_ino
        self._views: dict[int, LayerStack] = {}  # the layers below a layer (`_view_below`)
        # copy-up origins (origin.py): read back for upper files this mount did not copy up
        self._read_origins = self.has_upper and origin.enabled()
        self.fs_uuids: origin.Uuids = {}
        # Directories that may hold xattr whiteouts (overlay.opaque=x), by real path.
        self._xwh: set[bytes] = set()
        # xattr answers that are all absences, shared by the lower nodes that got them
        self._absences: dict[frozenset[tuple[bytes, bytes | int]], dict[bytes, bytes | int]] = {}
        for d in root_dirs:
            if markers.dir_marks(d.path, self.fs).xwhiteouts:
                self._xwh.add(d.path)

    # ----- inode numbers -------------------------------------------------------------
    def ino_for(self, layer: int, real_ino: int) -> Inode:
        if self.has_upper and layer == 0:
            return self._upper_ino(real_ino)
        return self._xino(layer, real_ino)

    def st_ino(self, node: Node) -> int:
        """The number stat(2) and readdir report for `node` (not always its node number)."""
        return self.shown.get(node.ino, node.ino)

    def _name_ino(self, child: Entry, shared: Inode) -> tuple[Inode, os.stat_result | None]:
        """The node number of a lower non-directory's name: with index=off on a writable stack
        a multiply-linked one gets a number of its own (see the module docstring).  Also the
        lstat made to decide, if one was made (the new node keeps it: lower stats are cached)."""
        if self.index or not self.has_upper or child.layer == 0 or child.dirs is not None:
            return shared, None
        key = (child.layer, child.path)
        found = self._per_name.get(key)
        if found is not None:
            return found, None
        st = self.fs.lstat(child.path)
        if st.st_nlink <= 1:
            return shared, st
        found = self._own_ino(child)
        self.shown[found] = shared
        return found, st

    def _apart(self, node: Node, child: Entry) -> bool:
        """Is the lower name `child` an object of its own, though its number found `node`?
        An upper file copied up from a hard-linked lower one takes the lower file's number
        (index=on).  A name of that lower file where the copy was not linked still shows the
        lower file: an upper written by others (the kernel keeps these links in its own
        index), or a name the writer could not find.  Taken for `node` under another name,
        it sent requests to an upper path that does not exist (a stress run listed nothing
        in a directory whose only entry was such a name)."""
        return not node.is_dir and child.dirs is None and child.layer != 0 and self.in_upper(node)

    def _other_upper(self, node: Node, parent: Node, name: bytes, child: Entry) -> bool:
        """Is the upper object `child` (at `parent/name`) another object than `node`, whose
        number it was given?  Two upper objects can carry one origin: a file copied up with
        index=off and a later name of the same lower file (now hard-linked) copied up with
        index=on, or an upper directory copied by hand with its redirect.  Taken for one
        node, a write to one name went into the other file, and one directory listed the
        other's entries (xfstests overlay/042, 049).  A node found under another name is
        the same object only if it is the same real inode: a directory keeps its upper
        inode when it moves, a hard link is the same inode.  Not the kernel's answer for a
        copied directory (ESTALE: two redirects to one origin): each is shown, with its own
        number, as a plain upper directory would be."""
        if not self.has_upper or child.layer != 0 or not self.in_upper(node):
            return False
        if node.parent is parent and node.name == name:
            return False
        if node.is_dir:
            return bool(
                child.dirs and node.dirs and node.dirs[0].layer == 0
                and node.dirs[0].ino != child.dirs[0].ino
            )  # fmt: skip
        return not node.unlinked and not self._same_upper(node, child.ino)

    def _same_upper(self, node: Node, real_ino: int) -> bool:
        """Is upper non-directory `node` the real inode `real_ino`?  (True when its path no
        longer names anything: moved or removed behind the mount's back, nothing tells.)"""
        try:
            return self.fs.lstat(self.upper_path(node)).st_ino == real_ino
        except OSError:
            return True

    def _own_upper_ino(self, real_ino: int) -> Inode:
        """The number of upper object `real_ino` from its own inode, not its origin's."""
        self.origins[real_ino] = self._xino(0, real_ino)
        return self._upper_ino(real_ino)

    def _own_ino(self, child: Entry) -> Inode:
        """A number of its own for the lower name `child` (`_name_ino`, `_apart`), one per
        name."""
        key = (child.layer, child.path)
        found = self._per_name.get(key)
        if found is None:
            found = Inode(_PER_NAME_BASE + len(self._per_name))
            self._per_name[key] = found
        return found

    def break_link(self, node: Node, upper_ino: int) -> None:
        """index=off: `node`'s name of a hard-linked lower file was copied up alone, so from
        now on it reports its own upper file's number, as the kernel does."""
        self.shown[node.ino] = self._xino(0, upper_ino)
        if self.listing_changed is not None and node.parent is not None:
            self.listing_changed(node.parent)
        if self.attrs_changed is not None:
            # the kernel drops only ctime after a RENAME and nothing after an OPEN, so a
            # statx asking for st_ino or st_nlink alone was answered with the old ones
            self.attrs_changed(node)

    def _upper_ino(self, real_ino: int) -> Inode:
        """Upper inode numbers are reused by the filesystem once a file is deleted, while
        the kernel may still hold the dead file's inode: a number whose node is deleted is
        never handed out again for a new object."""
        ino = self.origins.get(real_ino)
        if ino is None:
            ino = self._xino(0, real_ino)
        node = self.nodes.get(ino)
        if node is not None and node.deleted:
            self._fresh += 1
            ino = Inode(_FRESH_BASE + self._fresh)
            self.origins[real_ino] = ino
        return ino

    def _copied_up_ino(self, real_ino: int, path: bytes) -> Inode:
        """The number of upper non-directory `path` (real inode `real_ino`) that no copy-up of
        this mount accounts for: its lower original's, when its stored origin (origin.py)
        still decodes to one — as the kernel reports it: not for a lower file with other
        links under index=off, whose copy-up broke the link — else its own."""
        found = self._stored_origin(path)
        if found is None or not origin.counts(found.st_nlink, self.index):
            return self._upper_ino(real_ino)
        if found.st_nlink > 1 and not self._indexed_copy(path):
            # index=on, and the lower file has other names now, but this copy was made of
            # it with one (index=off, or before the links were made): the link was never
            # kept, so, as the kernel (not indexed: ovl_getattr), its own number
            return self._upper_ino(real_ino)
        ino = self._xino_dev(found.st_dev, found.st_ino)
        node = self.nodes.get(ino)
        if node is not None and (
            node.deleted or not self.in_upper(node) or not self._same_upper(node, real_ino)
        ):
            return self._upper_ino(real_ino)  # never two live objects under one number
        self.origins[real_ino] = ino
        return ino

    def _indexed_copy(self, path: bytes) -> bool:
        """Was upper file `path` copied up as a name of a hard-linked lower file, with
        index=on?  Such a copy carries `overlay.nlink`, by the kernel's copy-up and by ours
        (Writer._set_origin); one copied up with a single link carries none."""
        try:
            self.fs.getxattr(path, origin.NLINK_XATTR)
        except OSError:
            return False
        return True

    def _stored_origin(self, path: bytes) -> os.stat_result | None:
        if not self._read_origins:
            return None
        try:
            return origin.lower_object(self.fs, path, self._origin_roots, self.fs_uuids)
        except PermissionError:  # root in a user namespace: stop asking
            self._read_origins = False
            return None

    def _xino(self, layer: int, real_ino: int) -> Inode:
        return self._xino_dev(self.devs[layer], real_ino)

    def _xino_dev(self, dev: int, real_ino: int) -> Inode:
        if self._one_fs and 1 < real_ino < _FALLBACK_BASE:
            # every layer on one filesystem: its own numbers are unique, and the kernel shows
            # them as they are (no xino bits), so a 32-bit program's stat(2) gets no
            # EOVERFLOW (1 stays the root's)
            return Inode(real_ino)
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

    def known(self, ino: int) -> Node | None:
        """The node numbered `ino` if the kernel holds it (or it was just made), else None."""
        return self.nodes.get(Inode(ino))

    def known_nodes(self) -> list[Node]:
        """Every node the kernel holds, as a list (safe to iterate while changing the stack)."""
        return list(self.nodes.values())

    def note_upper_origin(self, upper_ino: int, node: Node) -> None:
        """The upper object with real inode `upper_ino` is `node` (copied up or moved there),
        so a lookup of it later finds the same node number."""
        self.origins[upper_ino] = node.ino

    def set_entry(self, parent: Node, name: bytes, entry: Entry) -> None:
        """`parent/name` is now `entry` in the merged listing (the Writer's change)."""
        listing = self.listing(parent)
        old = listing.get(name)
        listing[name] = entry
        if parent.subdirs is not None:  # kept up to date: no recount per change
            parent.subdirs += (entry.dirs is not None) - (old is not None and old.dirs is not None)

    def drop_entry(self, parent: Node, name: bytes) -> None:
        """`parent/name` is gone from the merged listing (the Writer removed or moved it)."""
        old = self.listing(parent).pop(name)
        if parent.subdirs is not None and old.dirs is not None:
            parent.subdirs -= 1

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
            node.lookups = 0  # a new lookup may find this object again (`_objects`)
            del self.nodes[node.ino]
            # weakly, from now on: a weak entry for every node the kernel holds cost each
            # node ~140 bytes, where `nodes` finds those first anyway
            self._objects[node.ino] = node
            self.aliases.pop(node.ino, None)

    def add_alias(self, node: Node, parent: Node, name: bytes) -> None:
        known = self.aliases.setdefault(node.ino, [])
        if not any(p is parent and n == name for p, n in known):
            known.append((parent, name))

    def forget_alias(self, node: Node, parent: Node, name: bytes) -> bool:
        """`parent/name` stopped naming `node`.  If it was the node's primary name, switch
        to another known name that still lists it.  False when no name is known."""
        known = [
            (p, n) for p, n in self.aliases.get(node.ino, []) if not (p is parent and n == name)
        ]
        if known:
            self.aliases[node.ino] = known
        else:
            self.aliases.pop(node.ino, None)
        if node.parent is not parent or node.name != name:
            return True
        for p, n in known:
            try:  # (a directory only probed so far is listed now: this is rare)
                child = self.listing(p).get(n)
            except (OSError, UnionError):
                continue  # that directory is gone too
            if child is not None and child.node_ino == node.ino:
                node.parent, node.name = p, n
                return True
        return False

    # ----- real paths ----------------------------------------------------------------
    @staticmethod
    def merged_path(node: Node) -> bytes:
        """`node`'s path in the merged view, from its root, without a leading slash (b""
        for the root)."""
        parts: list[bytes] = []
        cur: Node | None = node
        while cur is not None and cur.parent is not None:
            parts.append(cur.name)
            cur = cur.parent
        return b"/".join(reversed(parts))

    def upper_path(self, node: Node) -> bytes:
        """Where `node` lives (or would live, once copied up) in the upper layer."""
        rel = self.merged_path(node)
        return self.layers[0] + b"/" + rel if rel else self.layers[0]

    def in_upper(self, node: Node) -> bool:
        return self.has_upper and node.layer == 0

    def real_path(self, node: Node) -> bytes:
        """The topmost real object of `node`."""
        if self.in_upper(node):
            return self.upper_path(node)
        if node.dirs is not None:
            return node.dirs[0].path
        return node.lower_path

    def dir_paths(self, node: Node) -> list[DirLayer]:
        assert node.dirs is not None
        if not self.in_upper(node):
            return node.dirs
        first = node.dirs[0]
        return [DirLayer(first.layer, self.upper_path(node), first.ino), *node.dirs[1:]]

    # ----- resolution ----------------------------------------------------------------
    def listing(self, node: Node) -> dict[bytes, Entry]:
        if not node.is_dir or node.dirs is None:
            raise NotADirectory()
        if node.listing is None:
            listing = self._merge(self.dir_paths(node))
            if node.probed is not None:
                # Its names looked up before: the nodes they found stay theirs (the Writer
                # finds a name's node by `node_ino`).  Nothing but a copy-up can have changed
                # them since: a removal, creation or rename in a directory lists it first.
                for name, before in node.probed.items():
                    now = listing.get(name)
                    if now is not None and before is not None and before.node_ino:
                        now.node_ino = before.node_ino
                node.probed = None
            node.listing = listing
            node.subdirs = None
        return node.listing

    def _merge(self, dirs: list[DirLayer]) -> dict[bytes, Entry]:
        result: dict[bytes, Entry] = {}
        blocked: set[bytes] = set()  # names a higher layer settled as non-dir or whiteout
        for d in dirs:
            whiteouts: list[bytes] = []
            xwh = d.path in self._xwh
            # OCI markers are read in lower layers only: the upper is written in the kernel's
            # format, and a user's own file named `.wh.x` there is just a file.
            oci = rules.oci_markers_count(d.layer, self.has_upper)
            with self.fs.scandir_str(d.path) as it:
                for de in it:
                    name: bytes = de.name.encode(_FSENC, _FSERR)
                    path = d.path + b"/" + name
                    if oci and name == markers.WH_OPAQUE:
                        continue
                    target = rules.hidden_by_oci_file(name) if oci else None
                    if target is not None:
                        whiteouts.append(target)
                        continue
                    kind = _kind(de)
                    if kind == stat.S_IFCHR or (xwh and kind == stat.S_IFREG):
                        st = de.stat(follow_symlinks=False)
                        if rules.is_whiteout(path, st, xwh, self.fs):
                            whiteouts.append(name)
                            continue
                    existing = result.get(name)
                    if name in blocked:
                        if existing is not None:
                            existing.covers = True
                        continue
                    if existing is None:
                        isdir = kind == stat.S_IFDIR
                        dl = [DirLayer(d.layer, path, de.inode())] if isdir else None
                        result[name] = Entry(
                            kind=kind, layer=d.layer, path=path, ino=de.inode(), dirs=dl
                        )
                        if not isdir:
                            blocked.add(name)
                    elif existing.dirs is not None and kind == stat.S_IFDIR:
                        existing.dirs.append(DirLayer(d.layer, path, de.inode()))
                        existing.covers = True
                    else:
                        existing.covers = True
                        blocked.add(name)
            blocked.update(whiteouts)
        return result

    def lookup(self, parent: Node, name: bytes) -> Node:
        """Resolve `name` in directory `parent`; the caller `remember`s the result."""
        node = self.find(parent, name)
        if node is None:
            raise NotFound()
        return node

    def find(self, parent: Node, name: bytes) -> Node | None:
        """`lookup`, with None for a name that is not there (no exception: FUSE's LOOKUP
        meets that at every file a program creates, and at every miss of a search path)."""
        if name == b".":
            return parent
        if name == b"..":
            return parent.parent or self.root
        if len(name) > self.namemax:
            raise NameTooLong()
        probed = parent.probed
        if parent.listing is None and self._probing and (probed is None or len(probed) < PROBES):
            child = self._probe(parent, name)
            if probed is None:
                probed = parent.probed = {}
            probed[name] = child
        else:
            child = self.listing(parent).get(name)
        if child is None:
            return None
        return self.node_for(parent, name, child)

    def _probe(self, parent: Node, name: bytes) -> Entry | None:
        """The entry `_merge` would give `name` in `parent`, from an lstat of the name in
        each of the directory's layers (and of its OCI whiteout where those count) instead
        of a listing of every layer: the first lookups in a directory, most of which are
        all it ever gets (a path walked through, a file opened by name), no longer cost a
        listing of it, which in a directory of 200,000 names took 420 ms.  The rules are
        `_merge`'s, for one name: a whiteout hides the name in the layers below its own; a
        non-directory hides it below; directories of the name merge; `covers` says whether
        a layer below also has it."""
        if parent.dirs is None:
            raise NotADirectory()
        entry: Entry | None = None
        blocked = False  # a layer above settled the name: a whiteout or a non-directory
        for d in self.dir_paths(parent):
            oci = rules.oci_markers_count(d.layer, self.has_upper)
            whiteout = False
            st = None
            if not (oci and (name == markers.WH_OPAQUE or rules.hidden_by_oci_file(name))):
                path = d.path + b"/" + name
                try:
                    st = self.fs.lstat(path)
                except (FileNotFoundError, NotADirectoryError):
                    pass
                if st is not None and rules.is_whiteout(path, st, d.path in self._xwh, self.fs):
                    whiteout, st = True, None
            if oci and not whiteout:
                whiteout = self.fs.exists(d.path + b"/" + markers.oci_whiteout_name(name))
            if st is not None:
                kind = stat.S_IFMT(st.st_mode)
                if blocked:
                    if entry is not None:
                        entry.covers = True
                elif entry is None:
                    isdir = kind == stat.S_IFDIR
                    dl = [DirLayer(d.layer, path, st.st_ino)] if isdir else None
                    entry = Entry(kind=kind, layer=d.layer, path=path, ino=st.st_ino, dirs=dl)
                    blocked = not isdir
                elif entry.dirs is not None and kind == stat.S_IFDIR:
                    entry.dirs.append(DirLayer(d.layer, path, st.st_ino))
                    entry.covers = True
                else:
                    entry.covers = blocked = True
            blocked = blocked or whiteout
            if blocked and (entry is None or entry.covers):
                break  # nothing below can change the answer
        return entry

    def node_for(self, parent: Node, name: bytes, child: Entry) -> Node:
        """The node of a listing entry: the known one, or a new one (not yet remembered)."""
        if child.node_ino:
            node = self.nodes.get(Inode(child.node_ino))
            if node is not None and node.parent is parent and node.name == name:
                return node
        if child.dirs is not None and child.trimmed is None:
            child.trimmed = self._trim(parent, name, child.dirs)
        dirs = child.trimmed
        origin_layer, origin_ino = (
            (dirs[-1].layer, dirs[-1].ino) if dirs else (child.layer, child.ino)
        )
        if dirs is None and origin_layer == 0 and self.has_upper and origin_ino not in self.origins:
            shared = self._copied_up_ino(origin_ino, self.upper_path(parent) + b"/" + name)
        else:
            shared = self.ino_for(origin_layer, origin_ino)
        ino, st = self._name_ino(child, shared)
        node = self._numbered(ino, child.kind)
        if node is not None and self._apart(node, child):
            ino = self._own_ino(child)
            node = self._numbered(ino, child.kind)
        elif node is not None and self._other_upper(node, parent, name, child):
            ino = self._own_upper_ino(child.ino)
            node = self._numbered(ino, child.kind)
        child.node_ino = ino
        if node is not None:
            # a directory has one place; a hard-linked file is reached by its latest name
            if node.unlinked:  # its known names went, and this is one it still has
                node.unlinked = False
                node.invalidate()
            elif not node.is_dir and (node.parent is not parent or node.name != name):
                if node.parent is not None:
                    self.add_alias(node, node.parent, node.name)
                self.add_alias(node, parent, name)
            node.parent, node.name = parent, name
            return node
        data = None
        if child.kind == stat.S_IFREG and (
            child.layer == 0 and self.has_upper or self.metacopy or self.data_layers
        ):
            # (an upper entry's own path may be stale: the lower one it was copied up from)
            upper = child.layer == 0 and self.has_upper
            path = self.upper_path(parent) + b"/" + name if upper else child.path
            data = self._metacopy_data(parent, name, path, child.layer)
        node = Node(
            ino,
            parent,
            name,
            child.kind,
            child.layer,
            child.path,
            list(dirs) if dirs is not None else None,
        )
        node.st = st
        node.data = data
        return node

    def _metacopy_data(self, parent: Node, name: bytes, path: bytes, layer: int) -> bytes | None:
        """For a file the kernel copied up with metacopy=on (only its metadata: its bytes
        are a hole of the right size) in `layer`, the file below that holds its data: where
        its `overlay.redirect` points (from the root of the layers below), or else the same
        name in the parent's parts below.  None for any other file.  Without metacopy=on
        such a file in the upper is refused (EPERM), as the kernel refuses it ("refusing to
        follow metacopy origin"): shown, it would read as zeros, and a change would be made
        to the zeros; with no data found below, EIO, as the kernel.  Asked once per node of
        a file the upper held before (one listxattr), and with metacopy=on once per node of
        a lower file too (an old upper stacked below a new one); files this mount makes
        never come here.  GAP(issue-14): without metacopy=on a lower one is not looked for."""
        try:
            names = {os.fsencode(n) for n in self.fs.listxattr(path)}
        except OSError:
            return None
        if not names.intersection(markers.METACOPY_XATTRS):
            return None
        redirect = None
        for xname in markers.REDIRECT_XATTRS:
            if xname in names:
                redirect = self.fs.getxattr(path, xname)
        if redirect is not None and (
            b"" in redirect.split(b"/")[1:] if redirect.startswith(b"/") else b"/" in redirect
        ):  # as the kernel checks a redirect it reads, before anything else
            raise OSError(errno.EINVAL, "an invalid redirect", path)
        if (
            self.data_layers
            and layer == len(self.layers) - 1
            and redirect is not None
            and redirect.startswith(b"/")
        ):
            # the lowest lower layer, whose absolute redirect leads into the data-only
            # layers: allowed without metacopy=on too, as the kernel allows this one form
            return self._in_data_layers(redirect)
        if not self.metacopy:
            raise OSError(errno.EPERM, "a metacopy file (its data is in a lower layer)", path)
        found = self._data_below(parent, name, redirect, layer)
        if found is None:
            raise OSError(errno.EIO, "a metacopy file whose data is in no lower layer", path)
        return found

    def _in_data_layers(self, redirect: bytes) -> bytes:
        """The regular file at the absolute path `redirect` in the first data-only layer
        that has one; if none has, that path in the first of them, which the open finds
        missing (ENOENT), as the kernel's lazy lookup fails there (`/` names a layer's
        root, never a regular file).  `.` is skipped; with a `..` the path is noted for
        `open_data` to refuse (EXDEV, as the kernel: it leads out of the layer), never
        looked up."""
        parts = [p for p in redirect.split(b"/")[1:] if p != b"."]  # (no empty: checked)
        rel = b"/".join(parts)
        if b".." in parts:
            outside = self.data_layers[0] + b"/" + rel
            self._data_outside.add(outside)
            return outside
        for root in self.data_layers:
            candidate = root + b"/" + rel
            try:
                st = self.fs.lstat(candidate)
            except (FileNotFoundError, NotADirectoryError):
                continue
            if stat.S_ISREG(st.st_mode):
                return candidate
        return self.data_layers[0] + b"/" + rel

    def listed_unlooked(self, child: Entry) -> bool:
        """Does the kernel list `child` when its lookup fails (a metacopy file it refuses)?
        A lower entry on a stack whose layers share one filesystem, yes: its d_ino is the
        real one, so nothing is looked up.  Any other entry it looks up for its d_ino
        first, and leaves out when that fails (ovl_calc_d_ino, ovl_cache_update)."""
        return self._one_fs and not (self.has_upper and child.layer == 0)

    def data_unopened(self, node: Node) -> bool:
        """Is `node`'s data in a data-only layer and not opened yet through this mount?  The
        kernel looks such data up only at the first open (its stat guesses the blocks)."""
        if node.data is None or node.ino in self._data_opened:
            return False
        return any(node.data.startswith(root + b"/") for root in self.data_layers)

    def open_data(self, node: Node) -> bool:
        """The first open of a node whose data is in a data-only layer: ENOENT (OSError) if
        the data file is missing, as the kernel's lazy lookup.  True when `node`'s
        attributes changed with it (stat now gives the data's own blocks)."""
        if not self.data_unopened(node):
            return False
        assert node.data is not None
        if node.data in self._data_outside:
            raise OSError(errno.EXDEV, "a redirect out of the data-only layers", node.data)
        st = self.fs.lstat(node.data)  # FileNotFoundError: ENOENT
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.ENOENT, "no data file in the data-only layers", node.data)
        self._data_opened.add(node.ino)
        node.invalidate()
        return True

    def _data_below(
        self, parent: Node, name: bytes, redirect: bytes | None, layer: int
    ) -> bytes | None:
        if redirect is not None and redirect.startswith(b"/"):
            if layer >= len(self.layers) - 1:
                return None
            view = self._view_below(layer)
            node: Node | None = view.root
            for part in redirect.strip(b"/").split(b"/"):
                if part in (b".", b".."):  # the kernel's lookup of one name refuses them
                    raise OSError(errno.EACCES, "a redirect through . or ..", redirect)
                if node is None or not node.is_dir:
                    return None
                node = view.find(node, part) if part else node
            if node is None or node.kind != stat.S_IFREG:
                return None
            return node.data or view.real_path(node)  # a metacopy file there: its data
        if redirect is not None:  # relative: a name in the same directory, as the kernel's
            name = redirect
        for d in parent.dirs or ():
            if d.layer <= layer:
                continue
            candidate = d.path + b"/" + name
            try:
                st = self.fs.lstat(candidate)
            except FileNotFoundError:
                continue
            if not stat.S_ISREG(st.st_mode):
                return None
            # itself a metacopy file (an upper with metacopy=on stacked below a new one
            # that copied it up again): its data is further down, as the kernel's lookup
            # goes on to the lower data
            return self._metacopy_data(parent, name, candidate, d.layer) or candidate
        return None

    def _numbered(self, ino: Inode, kind: int) -> Node | None:
        """The node object numbered `ino`, if one still stands for a live object of `kind`."""
        node = self.nodes.get(ino)
        if node is None:  # forgotten by the kernel, but maybe still some node's parent
            node = self._objects.get(ino)
            if node is not None and (node.deleted or node.kind != kind):
                node = None  # its object is gone; the number now names another
        return node

    def _trim(self, parent: Node, name: bytes, chain: list[DirLayer]) -> list[DirLayer]:
        """Cut a directory chain after its first opaque member; follow a redirect; note
        directories that hold xattr whiteouts.  A redirect counts in any layer but the
        bottom one, as in the kernel's lookup (`ovl_check_redirect` on every layer it
        walks): a directory moved in a layer that is now a lower one (the upper of an
        earlier mount, stacked below a new upper) still brings its lower part along."""
        upper_first = self.has_upper and chain[0].layer == 0
        bottom = len(self.layers) - 1
        if len(chain) == 1 and not upper_first and chain[0].layer == bottom:
            return list(chain)
        out: list[DirLayer] = []
        for pos, d in enumerate(chain):
            upper = d.layer == 0 and upper_first
            path = self.upper_path(parent) + b"/" + name if upper else d.path
            out.append(d)
            marks = markers.dir_marks(path, self.fs)
            if marks.xwhiteouts:
                self._xwh.add(path)
            if marks.redirect is not None and (upper or d.layer < bottom):
                redirect = rules.redirect_of(marks)
                if redirect is None:  # opaque: nothing below to find
                    return out
                below = [p for p in parent.dirs or () if p.layer > d.layer]
                if not self.follow_redirects and (upper or below):
                    raise UnionError(
                        "refusing to follow a redirect (redirect_dir=nofollow)", errno.EPERM
                    )
                if upper:
                    return out + self._redirected(parent, redirect)
                return out + self._redirected_below(parent, below, redirect, d.layer)
            if pos == len(chain) - 1:
                break
            oci = rules.oci_markers_count(d.layer, upper_first)
            if rules.is_opaque(path, marks, oci, self.fs):
                break
        return out

    def _view_below(self, layer: int) -> LayerStack:
        """The layers below `layer` as a stack of their own (read-only, cached: lower layers
        do not change), where redirects into them are resolved."""
        view = self._views.get(layer)
        if view is None:
            lowers = [os.fsdecode(p) for p in self.layers[layer + 1 :]]
            view = LayerStack(lowers, fs=self.fs, follow_redirects=self.follow_redirects,
                              metacopy=self.metacopy,
                              data_layers=[os.fsdecode(p) for p in self.data_layers])  # fmt: skip
            self._views[layer] = view
        return view

    def _resolve_below(self, layer: int, path: bytes) -> list[DirLayer]:
        """The directory parts of `path` (from the root) in the layers below `layer`."""
        view = self._view_below(layer)
        node = view.root
        try:
            for part in path.strip(b"/").split(b"/"):
                if part:
                    node = view.lookup(node, part)
        except (NotFound, NotADirectory):
            return []
        if node.dirs is None:
            return []
        return [DirLayer(d.layer + layer + 1, d.path, d.ino) for d in node.dirs]

    def _redirected(self, parent: Node, redirect: bytes) -> list[DirLayer]:
        """The lower part of a directory moved in the upper: its redirect path resolved
        through the lower layers only (overlayfs redirect_dir; absolute from the root, or
        relative to the parent)."""
        return self._resolve_below(0, rules.redirect_path(redirect, self.origin_path(parent)))

    def _redirected_below(
        self, parent: Node, below: list[DirLayer], redirect: bytes, layer: int
    ) -> list[DirLayer]:
        """The rest of a chain whose directory in lower `layer` carries `redirect`: an
        absolute one resolved from the roots of the layers below, a relative one (a name)
        looked up in the parent's directories below (`below`), as the kernel continues its
        lookup there under that name."""
        if redirect.startswith(b"/"):
            return self._resolve_below(layer, redirect)
        chain: list[DirLayer] = []
        for d in below:
            path = d.path + b"/" + redirect
            try:
                st = self.fs.lstat(path)
            except (FileNotFoundError, NotADirectoryError):
                st = None
            if st is not None:
                if not stat.S_ISDIR(st.st_mode):
                    break  # a whiteout or a non-directory ends the chain, as in a listing
                chain.append(DirLayer(d.layer, path, st.st_ino))
            if rules.oci_markers_count(d.layer, self.has_upper) and self.fs.exists(
                d.path + b"/" + markers.oci_whiteout_name(redirect)
            ):
                break
        return self._trim(parent, redirect, chain) if chain else []

    def origin_path(self, node: Node) -> bytes:
        """Where `node`'s lower part lives, as a path from the root of the lower stack: the
        kernel's walk (overlayfs `ovl_get_redirect`).  From `node` up, each directory gives
        its own redirect if it carries one (an absolute one ends the walk; a relative one is
        the name it had in its parent's lower part), else its name.  So a path under moved
        directories is the path where their lower parts are, never the merged one (which
        means nothing to the lower layers once the upper is mounted again)."""
        parts: list[bytes] = []
        cur = node
        while cur.parent is not None:
            redirect = self.redirect_of(cur)
            if redirect is not None and redirect.startswith(b"/"):
                parts.append(redirect.strip(b"/"))
                break
            parts.append(redirect if redirect is not None else cur.name)
            cur = cur.parent
        return b"/" + b"/".join(p for p in reversed(parts) if p)

    def redirect_of(self, node: Node) -> bytes | None:
        """The `overlay.redirect` of a directory, or of a metacopy file, in the upper (None
        when it has none)."""
        if not ((node.is_dir or node.data is not None) and self.in_upper(node)):
            return None
        redirect = markers.dir_marks(self.upper_path(node), self.fs).redirect
        return rules.clean_redirect(redirect) if redirect is not None else None

    def lower_has(self, parent: Node, name: bytes) -> bool:
        """Would removing the upper object named `name` reveal something below?  Then a
        whiteout must take its place (and only then: overlayfs creates no needless ones)."""
        if not self.has_upper:
            return True
        child = self.listing(parent).get(name)
        if child is None:
            # Not shown, yet something may lie below: a whiteout in the upper hides a lower
            # object there.  Whatever is renamed onto the name replaces that whiteout and
            # must take over hiding the object (a whiteout when it leaves, opaque if a
            # directory), as the kernel's ovl_lower_positive sees it.  A name hidden by a
            # lower layer's own whiteout, or by an opaque directory, needs nothing.
            return self._upper_whiteout(parent, name)
        # by name, as overlayfs decides: a redirected directory's lower part lives elsewhere
        return child.layer > 0 or child.covers

    def _upper_whiteout(self, parent: Node, name: bytes) -> bool:
        if not self.in_upper(parent):
            return False
        pdir = self.upper_path(parent)
        path = pdir + b"/" + name
        try:
            st = self.fs.lstat(path)
        except FileNotFoundError:
            return False
        return rules.is_whiteout(path, st, pdir in self._xwh, self.fs)

    # ----- attributes and content ---------------------------------------------------
    def immutable(self, node: Node) -> bool:
        """True when nothing can change the node's attributes: it lives in a lower layer."""
        return not self.in_upper(node)

    def stat(self, node: Node) -> os.stat_result:
        """lstat of the node's topmost real object; cached for objects in lower layers."""
        if node.st is not None:
            return node.st
        st = self.fs.lstat(self.real_path(node))
        if self.immutable(node):
            node.st = st
        return st

    def nlink(self, node: Node, st: os.stat_result) -> int:
        """Link count; for a merged directory, 2 + its merged subdirectories (the kernel
        reports 1 there; this is what a plain directory would say)."""
        if not node.merged:
            return st.st_nlink
        # GAP(issue-14): the kernel reports 1 for a merged directory; we count subdirectories
        # (counted once per listing and kept by set_entry/drop_entry: a GETATTR of the
        # directory follows every unlink in it)
        if node.subdirs is None:
            node.subdirs = sum(1 for c in self.listing(node).values() if c.dirs is not None)
        return 2 + node.subdirs

    def readlink(self, node: Node) -> bytes:
        if node.kind != stat.S_IFLNK:
            raise OSError(errno.EINVAL, "not a symlink")
        return self.fs.readlink(self.real_path(node))

    def getxattr(self, node: Node, name: bytes) -> bytes:
        found = self.xattr_answer(node, name)
        if isinstance(found, int):
            raise OSError(found, os.strerror(found))
        return found

    def xattr_answer(self, node: Node, name: bytes, fd: int | None = None) -> bytes | int:
        """The value of `name` on the node's topmost real object, or the errno saying it is
        absent (ENODATA, EOPNOTSUPP); other failures raise.  For an object in a lower layer
        the answer is kept, like its stat: lower layers never change, and the kernel caches
        no xattr but ACLs, so it asks again at every exec (security.capability) or getfattr.
        `fd`: read the object through this fd instead (an upper file whose name is gone)."""
        real = markers.real_xattr(name)
        if real is None:
            return errno.ENODATA
        name = real
        immutable = self.immutable(node)
        if immutable and node.xattrs is not None:
            found = node.xattrs.get(name)
            if found is not None:
                return found
        try:
            found = self.fs.getxattr(self.real_path(node) if fd is None else fd, name)
        except OSError as exc:
            if exc.errno not in _XATTR_ABSENT:
                raise  # EIO and the like are not the object's: ask again next time
            found = exc.errno
        if immutable and (isinstance(found, int) or len(found) <= _XATTR_KEPT_MAX):
            node.xattrs = self._kept_with(node.xattrs, name, found)
        return found

    def _kept_with(
        self, kept: dict[bytes, bytes | int] | None, name: bytes, found: bytes | int
    ) -> dict[bytes, bytes | int]:
        """A lower node's kept xattr answers with one more.  Most lower objects have no
        xattrs, and are asked the same few names (`ls -l` asks every entry for its ACL,
        an exec for `security.capability`): answers that are all absences are one dict
        shared by every node that got them (a dict of its own cost each node listed by
        `ls -l` ~260 bytes).  So a kept dict is never changed, only replaced."""
        answers = dict(kept) if kept else {}
        answers[name] = found
        if len(answers) > 4 or not all(isinstance(v, int) for v in answers.values()):
            return answers
        key = frozenset(answers.items())
        shared = self._absences.get(key)
        if shared is None:
            if len(self._absences) >= 64:  # names asked at random are not shared
                return answers
            shared = self._absences[key] = answers
        return shared

    def listxattr(self, node: Node, fd: int | None = None) -> list[bytes]:
        names = self.fs.listxattr(self.real_path(node) if fd is None else fd)
        shown = (markers.shown_xattr(n) for n in map(os.fsencode, names))
        return [n for n in shown if n is not None]

    def statvfs(self) -> os.statvfs_result:
        return self.fs.statvfs(self.layers[0])


_FSENC, _FSERR = sys.getfilesystemencoding(), sys.getfilesystemencodeerrors()  # os.fsencode


def _kind(de: os.DirEntry) -> int:  # type: ignore[type-arg]
    """S_IFMT from d_type where the filesystem gives it; lstat otherwise."""
    if de.is_dir(follow_symlinks=False):
        return stat.S_IFDIR
    if de.is_symlink():
        return stat.S_IFLNK
    if de.is_file(follow_symlinks=False):
        return stat.S_IFREG
    return stat.S_IFMT(de.stat(follow_symlinks=False).st_mode)
