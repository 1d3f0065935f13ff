"""Writer: every change to the merged view, made in the upper layer in kernel-overlayfs format.

Owns copy-up, whiteouts, opaque directories, redirects and the bookkeeping that keeps the
`LayerStack`'s nodes and listings in step with the upper directory.  Synchronous, like the
model: the one slow step, copying a regular file's data up, is split into `plan_copy_up`
(synchronous), `copy_data` (run by the adapter in a worker thread, under the node's lock) and
`finish_copy_up` (synchronous).  Everything else happens between two awaits of the adapter,
so it is atomic with respect to other requests.

Crash safety (kill -9 at any moment): new objects are built in the work directory and renamed
into place, so the upper holds the old view or the complete new object.  A name that lower
layers also have is replaced with renameat2(RENAME_WHITEOUT) or RENAME_EXCHANGE, so there is
no moment where the lower object shows through.  Leftovers in the work directory are debris,
removed at the next mount.  For a power cut, as the kernel: a copy-up's data is fsynced before
the rename (`sync_copies`, off only for `volatile`).

Hard-linked lower files (overlayfs's `index=`): with index=off, copy-up of one name breaks
the link (the stack then reports that name's own upper file).  With index=on the names stay
one inode, and the upper says so by itself: copy-up links the upper copy at every other name
that shows the lower file, and keeps one more link in `INDEX_SUBDIR` of the work dir for each
name of the lower file the merged view does not show (whited out, hidden), so the upper file's
link count is the kernel's (the lower count, then changed by link and unlink) for this mount,
after a remount, for the kernel mounting this upper, and for a commit (which sees the names
as one file).

Directory renames never fail with EXDEV: a directory with lower parts is copied up (without
its contents) and gets `overlay.redirect` = its original path, as kernel overlayfs does with
redirect_dir=on; a pure-upper directory moved over a lower name becomes opaque.

Every call on the upper, the lowers and the work dir goes through the stack's `fs` (a
`fsat.Roots`: relative to root fds opened before the mount, no path-length limit); the work
dir's fds are added to it here, before the mount too.
Size: over 500 lines because copy-up, whiteouts, renames and index=on links share their
bookkeeping of the stack's nodes and listings; each public method is one rule.
"""

from __future__ import annotations

import errno
import os
import stat

from . import fileattr, fsutil, markers, origin
from .acl import ACCESS as ACL_ACCESS
from .acl import DEFAULT as ACL_DEFAULT
from .acl import Inherited
from .dirlock import lock_dir
from .errors import (
    Exists,
    NameTooLong,
    NotEmpty,
    NotFound,
    StaleHandle,
    UnionError,
    WorkDirUnusable,
)
from .fsat import Roots, inside
from .logs import log
from .stack import DirLayer, Entry, LayerStack, Node

WORK_SUBDIR = "layerfs"
# a link to the shared whiteout refused by the filesystem, not by this one name
_NO_SHARED_WHITEOUT = frozenset({errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS, errno.EXDEV})
_CAPS = b"security.capability"
INDEX_SUBDIR = "layerfs-index"  # index=on: links that stand for lower names not shown


def _verify_root_origin(stack: LayerStack) -> None:
    """index=on, as the kernel's ovl_verify_origin of the upper root at mount: the upper's
    root records the topmost lower layer's root (its origin, set at the first such mount),
    and a later mount of that upper over other lower layers is refused (ESTALE there): its
    copies and links stand for lower files that are not there (xfstests overlay/037).
    Nothing where the lower filesystem gives no file handles or trusted xattrs cannot be
    set, as the kernel then falls back to index=off."""
    if not origin.enabled():
        return
    fs, upper, lower = stack.fs, stack.layers[0], stack.layers[1]
    value = origin.value_for(fs, lower, fs.lstat(lower), stack.fs_uuids)
    if value is None:
        return
    try:
        have = fs.getxattr(upper, origin.XATTR)
    except OSError as exc:
        if exc.errno == errno.ENODATA:
            fs.setxattr(upper, origin.XATTR, value)
        return
    if have != value:
        raise StaleHandle(
            f"upperdir {os.fsdecode(upper)} was made over other lower layers with index=on "
            f"(its root's origin is not lowerdir {os.fsdecode(lower)})"
        )


def _drop_acls(fs: Roots, work: bytes) -> None:
    """Remove the POSIX ACLs the new work dir inherited from the dir it is made in, as the
    kernel does with its own (ovl_make_workdir).  Objects are built there and moved into
    place: a default ACL of the workdir given (`setfacl -d -m o::rwx WORKDIR`) was passed
    on to every directory copied up, and from them to every file made in them, world
    writable (xfstests overlay/023)."""
    for name in (ACL_DEFAULT, ACL_ACCESS):
        try:
            fs.removexattr(work, name)
        except OSError as exc:
            if exc.errno not in (errno.ENODATA, errno.EOPNOTSUPP):
                raise


# Copy-ups of up to this many bytes, without fsync, stay on the trio thread (a hop to a worker
# thread costs more than the copy).
SMALL_COPY = 256 << 10
_O_DIRECT = getattr(os, "O_DIRECT", 0)


class CopyPlan:
    """A regular file's copy-up in progress: data goes from `src` to `tmp` in a thread.
    `tmp` is a path in the work dir, or b"" for a file with no name (O_TMPFILE) made there
    by `copy_data`, which leaves it open as `fd` until it is linked into place.
    (Not a dataclass: importing `dataclasses` costs every mount ~7 ms.)"""

    __slots__ = (
        "node",
        "src",
        "tmp",
        "st",
        "with_data",
        "fs",
        "sync",
        "work",
        "fd",
        "flags",
        "meta",
    )

    def __init__(
        self, node: Node, src: bytes, tmp: bytes, st: os.stat_result, with_data: bool, fs: Roots,
        sync: bool = False,
    ) -> None:  # fmt: skip
        self.node = node
        self.src = src
        self.tmp = tmp
        self.st = st
        self.with_data = with_data
        self.fs = fs
        self.sync = sync  # fsync the copied data before it goes into place (`Writer.sync_copies`)
        self.work = b""  # with no `tmp`: the work dir the nameless file is made in
        self.fd = -1  # the nameless file, once made
        self.flags = 0  # the lower file's inode flags, carried onto the copy (fileattr.py)
        self.meta = False  # metacopy=on: a copy of the metadata only (`Writer.plan_copy_up`)

    @property
    def blocks(self) -> bool:
        """Does `Writer.copy_data` wait for the disk (a big copy, or any fsync)?"""
        size = self.st.st_size
        return self.with_data and size > 0 and (self.sync or size > SMALL_COPY)


class Writer:
    def __init__(
        self, stack: LayerStack, workdir: str, create_redirects: bool = True,
        mountpoint: str | None = None, sync_copies: bool = True, uuid: str = "auto",
    ) -> None:  # fmt: skip
        self.stack = stack
        # As kernel overlayfs (ovl_copy_up_file, unless `volatile`): a copied-up file's data
        # is fsynced before the file goes into place.  Otherwise a power cut can leave the
        # renamed upper file empty or zero-filled (delayed allocation), hiding the lower
        # file's bytes: the user loses a file they only appended to.
        self.sync_copies = sync_copies
        # redirect_dir=on: a directory with lower parts can move (it gets a redirect); with
        # follow/off/nofollow it cannot, and rename(2) says EXDEV, as on the kernel
        self.create_redirects = create_redirects
        # the kernel's !ovl_allow_offline_changes: with these, a directory made new in a merged
        # one is marked opaque (`make`)
        self._no_offline_changes = create_redirects or stack.index or stack.metacopy
        self._locks: list[int] = []
        try:  # one mount per work and upper dir (dirlock)
            for path, what in ((workdir, "workdir"), (os.fsdecode(stack.layers[0]), "upperdir")):
                self._locks.append(lock_dir(path, what, mountpoint))
        except BaseException:
            self._unlock()
            raise
        self.workdir = os.path.abspath(workdir)  # as given by workdir=
        self.work = os.fsencode(os.path.join(self.workdir, WORK_SUBDIR))
        self.fs = fs = stack.fs
        try:
            fs.add(os.path.dirname(self.work))
            try:
                if fs.exists(self.work):  # debris of an interrupted run; never referenced
                    fs.rmtree(self.work)
                fs.mkdir(self.work, 0o700)
                _drop_acls(fs, self.work)
            except OSError as exc:
                # the upper filesystem is full or read-only: serving.open_stack mounts
                # read-only, as the kernel does
                raise WorkDirUnusable(exc.errno, exc.strerror, os.fsdecode(self.work)) from exc
            fs.add(self.work)
            markers.probe_trusted(self.work, fs)  # before any marker is written
            markers.init_uuid(stack.layers[0], uuid, fs)
            if stack.index:
                _verify_root_origin(stack)
        except BaseException:  # no mount: the dirs are free again
            self._unlock()
            raise
        self.index_dir = os.fsencode(os.path.join(os.path.abspath(workdir), INDEX_SUBDIR))
        self._seq = 0
        # copy-ups of regular files go through a nameless file (O_TMPFILE) linked into place,
        # as the kernel's (ovl_copy_up_tmpfile): None until tried (`_nameless`), False where
        # the filesystem or the daemon's privileges refuse it (then a named file is renamed)
        self._tmpfile: bool | None = None
        # the work dir's whiteout that new whiteouts link to (see `_whiteout`): None until
        # made, False once the filesystem refused a link to it
        self._shared_whiteout: bool | None = None
        self._linkmap_cache: dict[tuple[int, int], list[tuple[int, bytes]]] | None = None
        # upper directories carrying a redirect (`_redirected_dirs`), until a rename
        self._redirects: list[bytes] | None = None

    def _unlock(self) -> None:
        for fd in self._locks:
            os.close(fd)
        self._locks.clear()

    def tmpname(self) -> bytes:
        self._seq += 1
        return self.work + b"/t%d" % self._seq

    def _whiteout(self, path: bytes) -> None:
        """A whiteout at `path` (nothing is there): a hard link to one whiteout in the work
        dir, as kernel overlayfs makes them (`ovl_whiteout`, shared since Linux 5.8).  A link
        adds a name where mknod allocates an inode: 11 against 190-220 µs of system time on
        the test VM's ext4.  At the link limit (EMLINK) the next whiteout starts a new shared
        one; where the filesystem refuses the link, each whiteout is its own inode again."""
        shared = self.work + b"/whiteout"
        for _ in range(2):  # a second time after EMLINK, with a new shared whiteout
            if self._shared_whiteout is None:
                try:
                    markers.make_whiteout(shared, self.fs)
                    self._shared_whiteout = True
                except OSError:
                    self._shared_whiteout = False  # mknod at `path` says what is wrong
            if not self._shared_whiteout:
                break
            try:
                self.fs.link(shared, path)
                return
            except OSError as exc:
                if exc.errno == errno.EMLINK:
                    self.fs.unlink(shared)  # its links stay
                    self._shared_whiteout = None
                elif exc.errno in _NO_SHARED_WHITEOUT:
                    self._shared_whiteout = False
                else:
                    raise
        markers.make_whiteout(path, self.fs)

    # ----- copy-up ---------------------------------------------------------------------
    def copy_up_dir(self, node: Node) -> None:
        """Make `node` (a directory) and its ancestors exist in the upper, each with its own
        metadata.  Not opaque: the lower part keeps merging."""
        stack = self.stack
        if stack.in_upper(node):
            return
        assert node.parent is not None and node.dirs is not None
        self.copy_up_dir(node.parent)
        self._mark_impure(node.parent)
        src = node.dirs[0].path
        st = self.fs.lstat(src)
        flags = fileattr.lower_flags(self.fs, src, stat.S_IFDIR)
        tmp = self.tmpname()
        self.fs.mkdir(tmp, 0o700)
        fsutil.copy_xattrs(self.fs, src, tmp, markers.is_private_xattr)
        self._set_origin(src, st, tmp)
        fileattr.carry(self.fs, flags, tmp, stat.S_IFDIR)
        fsutil.copy_meta(self.fs, st, tmp)
        self._into_place(node.parent, tmp, node.name)
        node.prot = flags & fileattr.PROT
        new = self.fs.lstat(stack.upper_path(node))
        node.dirs.insert(0, DirLayer(0, stack.upper_path(node), new.st_ino))
        node.layer = 0
        node.invalidate()
        child = self._child(node)
        if child is not None:
            child.layer, child.covers = 0, True
            if child.dirs is not None:
                child.dirs.insert(0, DirLayer(0, stack.upper_path(node), new.st_ino))
            child.trimmed = node.dirs

    def plan_copy_up(
        self, node: Node, with_data: bool = True, meta: bool = False
    ) -> CopyPlan | None:
        """Start copying up a non-directory; None when nothing (more) is to be done.  `meta`:
        the change needs only the file's metadata in the upper (chmod, chown, utimes, xattrs,
        rename, link): with metacopy=on a regular file is then copied up as the kernel's
        metadata-only copy-up makes it (`_metacopy_ok`), its data left below (`Node.data`)."""
        stack = self.stack
        if stack.in_upper(node):
            return None
        if node.unlinked:
            raise NotFound("the file was removed")
        assert node.parent is not None
        self.copy_up_dir(node.parent)
        src = stack.real_path(node)
        st = self.fs.lstat(src)
        tmp = self.tmpname()
        if not stat.S_ISREG(st.st_mode):
            fsutil.make_like(self.fs, st, src, tmp)
            plan = CopyPlan(node, src, tmp, st, False, self.fs)
            self.finish_copy_up(plan)
            return None
        flags = fileattr.lower_flags(self.fs, src, stat.S_IFREG)
        if flags & fileattr.PROT:
            # an immutable or append-only file keeps its data, whatever the caller meant to
            # do (truncate it): the call is refused once the copy is made
            with_data = True
        meta = meta and self._metacopy_ok(st, flags)
        if meta or not with_data:
            fd = self.fs.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                if meta:  # a hole of the file's size, as the kernel's (ovl_set_size)
                    os.ftruncate(fd, st.st_size)
            finally:
                os.close(fd)
            with_data = False
        if with_data and node.data is not None:
            self.stack.open_data(node)  # data in a data-only layer: is it there (ENOENT)?
        plan = CopyPlan(node, src, tmp, st, with_data, self.fs, self.sync_copies)
        plan.flags = flags
        plan.meta = meta
        if with_data and self._nameless():
            plan.tmp, plan.work = b"", self.work
        return plan

    def _metacopy_ok(self, st: os.stat_result, flags: int) -> bool:
        """May this regular file be copied up by its metadata only?  With metacopy=on, as
        the kernel's ovl_need_meta_copy_up, and where the kernel would read the result:
        trusted markers (the kernel refuses metacopy=on with userxattr).  layerfs copies
        whole an immutable or append-only file (its data then never has to move under the
        flags) and, with index=on, a hard-linked one (its other names are linked to the
        copy, `_link_siblings`)."""
        return (
            self.stack.metacopy
            and markers.trusted()
            and stat.S_ISREG(st.st_mode)
            and not flags & fileattr.PROT
            and not (self.stack.index and st.st_nlink > 1)
        )

    def _nameless(self) -> bool:
        """Can copy-ups use a nameless file?  Tried once, at the first copy-up: one made and
        linked in the work dir.  A nameless copy leaves nothing behind if the daemon dies part
        way, and its fsync writes no directory: ext4 without a journal, at fsync, also writes
        the directory of a file new in it (ext4_sync_parent): 178 against 143 µs a file on
        the test VM (1,000 small copy-ups by hand, medians).  Refused (EOPNOTSUPP, EISDIR, or
        a link from it refused: no CAP_DAC_READ_SEARCH before Linux 6.10) means renames."""
        if self._tmpfile is None:
            probe = self.tmpname()
            try:
                fd = self.fs.open(self.work, os.O_WRONLY | os.O_TMPFILE, 0o600)
                try:
                    self.fs.link_fd(fd, probe)
                finally:
                    os.close(fd)
                self.fs.unlink(probe)
                self._tmpfile = True
            except OSError:
                self._tmpfile = False
        return self._tmpfile

    @staticmethod
    def copy_data(plan: CopyPlan) -> None:
        """The slow part: runs in a worker thread, touching nothing but the two files.  A
        metacopy file's data comes from the file below that holds it (`Node.data`)."""
        if plan.with_data:
            src = plan.node.data or plan.src
            if plan.tmp:
                fsutil.copy_data(plan.fs, src, plan.tmp, sync=plan.sync)
                return
            plan.fd = plan.fs.open(plan.work, os.O_WRONLY | os.O_TMPFILE, 0o600)
            fsutil.copy_data(plan.fs, src, plan.fd, sync=plan.sync)

    def abort_copy_up(self, plan: CopyPlan) -> None:
        if not plan.tmp:
            if plan.fd >= 0:  # nameless: gone with its fd
                os.close(plan.fd)
                plan.fd = -1
            return
        try:
            self.fs.unlink(plan.tmp)
        except FileNotFoundError:
            pass

    def finish_copy_up(self, plan: CopyPlan) -> None:
        stack, node = self.stack, plan.node
        if node.unlinked or stack.in_upper(node):
            self.abort_copy_up(plan)
            if node.unlinked:
                raise NotFound("the file was removed during copy-up")
            return
        assert node.parent is not None
        dst = plan.tmp or plan.fd
        try:
            # owner first: chown(2) drops security.capability (file capabilities), as it
            # must for a user's chown; the kernel's copy-up sets the owner without that
            # side effect
            fsutil.copy_meta(self.fs, plan.st, dst)
            fsutil.copy_xattrs(self.fs, plan.src, dst, markers.is_private_xattr)
            self._set_origin(plan.src, plan.st, dst)
            if plan.meta:
                markers.set_metacopy(dst, self.fs)
            fileattr.carry(self.fs, plan.flags, dst, stat.S_IFREG)
            self._mark_impure(node.parent)
            self._into_place(node.parent, dst, node.name)
            node.prot = plan.flags & fileattr.PROT
        finally:
            if plan.fd >= 0:
                os.close(plan.fd)
                plan.fd = -1
        # metacopy: the data stays in the lower file (or where a lower metacopy file's is);
        # else it is in the copy now
        node.data = (node.data or plan.src) if plan.meta else None
        upper_ino = self._now_in_upper(node, node.parent, node.name)
        if plan.st.st_nlink > 1 and not stack.index:
            stack.break_link(node, upper_ino)
        elif stat.S_ISREG(plan.st.st_mode) and plan.st.st_nlink > 1:
            self._link_siblings(node, plan)

    def _set_origin(self, src: bytes, st: os.stat_result, dst: bytes | int) -> None:
        """Record where the copy `dst` of lower object `src` (`st` its lstat) came from, as
        the kernel's copy-up does (origin.py), so a file's inode number survives a remount,
        for layerfs and for the kernel; directories get one too, as on the kernel (which
        otherwise adds it at its first lookup of the directory).  Best effort, as on the
        kernel: without file handles or trusted xattrs there is no origin.  With index=on a
        hard-linked lower file gets one too, as the kernel gives one to the files it indexes
        (layerfs writes no index entry beside it; the kernel, finding none, takes the file
        as not indexed and shows the upper file's own number)."""
        linked = not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1
        if not origin.enabled() or (linked and not self.stack.index):
            return
        value = origin.value_for(self.fs, src, st, self.stack.fs_uuids)
        if value is not None:
            try:
                self.fs.setxattr(dst, origin.XATTR, value)
                if linked:
                    # the kernel reads the link count of an upper copy of a hard-linked
                    # lower file from this ("failed to get index nlink" in dmesg without
                    # it): relative to the upper file's own count, which here holds every
                    # name (`_link_siblings`), as the kernel's own copy-up writes it
                    self.fs.setxattr(dst, origin.NLINK_XATTR, b"U+0")
            except OSError:
                pass

    def _has_origin(self, node: Node) -> bool:
        """The kernel's ovl_type_origin: a directory with lower parts (merged or redirected),
        or an upper non-directory that records the lower file it was copied up from."""
        if node.is_dir:
            return node.has_lower
        if not origin.enabled() or not self.stack.in_upper(node):
            return False
        try:
            self.fs.getxattr(self.stack.upper_path(node), origin.XATTR)
        except OSError:
            return False
        return True

    def _mark_impure(self, parent: Node) -> None:
        """`parent` (in the upper) is to hold an object whose inode number is not its upper
        object's own: a copy-up, or an object with an origin moved or linked in.  Mark its
        upper directory as the kernel does, before the change (markers.set_impure), once
        per directory and mount; the kernel mounting this upper reads it to give readdir
        the same numbers as stat."""
        if not parent.impure:
            markers.set_impure(self.stack.upper_path(parent), self.fs)
            parent.impure = True

    def _now_in_upper(self, node: Node, parent: Node, name: bytes) -> int:
        """Bookkeeping once `parent/name` is in the upper; returns its real inode number."""
        stack = self.stack
        upper = self.fs.lstat(stack.upper_path(parent) + b"/" + name)
        stack.note_upper_origin(upper.st_ino, node)
        node.layer = 0
        node.invalidate()
        child = (parent.listing or {}).get(name)
        if child is not None:
            child.layer, child.ino, child.covers = 0, upper.st_ino, True
            child.node_ino = node.ino
        return upper.st_ino

    def _link_siblings(self, node: Node, plan: CopyPlan) -> None:
        """index=on: link the new upper copy at every other name (in any lower layer) that
        still shows the same lower file, and once in the index for each name not shown."""
        stack = self.stack
        shown = 1
        copy_ino = 0  # the upper copy's own inode number, which each link now lists
        for layer, rel in self._linkmap().get((plan.st.st_dev, plan.st.st_ino), []):
            root = stack.layers[layer]
            found = self._visible_name(root, rel)
            if found is None or found[2].layer != layer:
                continue  # hidden or replaced in the merged view, or the name just copied
            parent, name, child = found
            self.copy_up_dir(parent)
            self._mark_impure(parent)  # a copy-up too: the name shows the lower file's number
            pdir = stack.upper_path(parent)
            pst = self.fs.lstat(pdir)
            self.fs.link(stack.upper_path(node), pdir + b"/" + name)
            self.fs.utime(pdir, ns=(pst.st_atime_ns, pst.st_mtime_ns))  # a copy-up, not a change
            if not copy_ino:
                copy_ino = self.fs.lstat(stack.upper_path(node)).st_ino
            # the entry is the upper link now, as a new listing would give it (the lower
            # file's number left in it made the name look like another upper file)
            child.layer, child.ino, child.covers, child.node_ino = 0, copy_ino, True, node.ino
            shown += 1
        if plan.st.st_nlink > shown:
            if not self.fs.exists(self.index_dir):
                self.fs.mkdir(self.index_dir, 0o700)
            for _ in range(plan.st.st_nlink - shown):
                name = b"%d-%s" % (plan.st.st_ino, os.urandom(8).hex().encode())
                self.fs.link(stack.upper_path(node), self.index_dir + b"/" + name)

    def _visible_name(self, root: bytes, rel: bytes) -> tuple[Node, bytes, Entry] | None:
        """Where the merged view shows the lower object `root + rel`: at the same path, or —
        when a directory above it was renamed (redirect) — in the known directory node that
        merges its lower parent, or else below whichever moved directory's lower part holds
        it (nodes the kernel forgot, or never looked up, are not known: a stress run linked
        a name shown through a moved directory into the index instead, and the name went on
        showing the lower file, apart from its copy)."""
        try:
            parent, name, child = self._resolve_entry(rel)
            if child.path == root + rel:
                return parent, name, child
        except UnionError:
            pass
        where, _, name = rel.rpartition(b"/")  # the lower parent, from the lower stack's root
        lower_parent = root + where
        for node in self.stack.known_nodes():
            if node.dirs is not None and any(d.path == lower_parent for d in node.dirs):
                entry = self.stack.listing(node).get(name)
                if entry is not None and entry.path == root + rel:
                    return node, name, entry
        for moved in self._redirected_dirs():
            try:
                mparent, mname, mentry = self._resolve_entry(moved)
                origin = self.stack.origin_path(self.stack.node_for(mparent, mname, mentry))
                if not inside(where, origin):
                    continue
                found = self._resolve_entry(moved + where[len(origin) :] + b"/" + name)
            except UnionError:
                continue
            if found[2].path == root + rel:
                return found
        return None

    def _redirected_dirs(self) -> list[bytes]:
        """Every upper directory carrying a redirect (paths from the upper root, which are
        their merged paths): where lower directories show under other names.  One walk of
        the upper, kept until a rename moves directories (only renames write redirects)."""
        found = self._redirects
        if found is None:
            upper = self.stack.layers[0]
            found = [
                path[len(upper) :]
                for path in self.fs.walk_dirs(upper)
                if markers.dir_marks(path, self.fs).redirect is not None
            ]
            self._redirects = found
        return found

    def _linkmap(self) -> dict[tuple[int, int], list[tuple[int, bytes]]]:
        """(st_dev, st_ino) -> (layer, path in layer) of every multiply-linked regular file of
        the lower layers (one walk, cached: lower layers never change)."""
        found = self._linkmap_cache
        if found is None:
            found = {}
            for layer in range(1 if self.stack.has_upper else 0, len(self.stack.layers)):
                root = self.stack.layers[layer]
                for p, st in self.fs.walk_stat(root):
                    if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
                        found.setdefault((st.st_dev, st.st_ino), []).append((layer, p[len(root) :]))
            self._linkmap_cache = found
        return found

    def _resolve_entry(self, rel: bytes) -> tuple[Node, bytes, Entry]:
        stack = self.stack
        parts = [p for p in rel.split(b"/") if p]
        node = stack.root
        for part in parts[:-1]:
            node = stack.lookup(node, part)
            if not node.is_dir:
                raise NotFound()
        child = stack.listing(node).get(parts[-1])
        if child is None:
            raise NotFound()
        return node, parts[-1], child

    # ----- helpers ------------------------------------------------------------------------
    def _child(self, node: Node) -> Entry | None:
        if node.parent is None or node.parent.listing is None:
            return None
        return node.parent.listing.get(node.name)

    def _into_place(self, parent: Node, tmp: bytes | int, name: bytes) -> None:
        """Rename a finished object from the work dir to parent/name (or link a nameless
        one there, open as fd `tmp`), keeping the parent's times (overlayfs does: a copy-up
        is not a change of the directory)."""
        pdir = self.stack.upper_path(parent)
        pst = self.fs.lstat(pdir)
        if isinstance(tmp, int):
            self.fs.link_fd(tmp, pdir + b"/" + name)
        else:
            self.fs.rename(tmp, pdir + b"/" + name)
        self.fs.utime(pdir, ns=(pst.st_atime_ns, pst.st_mtime_ns))

    def _target(self, parent: Node, name: bytes) -> tuple[bytes, bool]:
        """Copy up `parent`, and say where `name` goes and whether a whiteout is there."""
        if len(name) > self.stack.namemax:
            raise NameTooLong()
        if name in self.stack.listing(parent):
            raise Exists()
        self.copy_up_dir(parent)
        path = self.stack.upper_path(parent) + b"/" + name
        try:
            st = self.fs.lstat(path)
        except FileNotFoundError:
            return path, False
        if markers.is_chardev_whiteout(st):
            return path, True
        raise Exists("an upper object hides here")  # e.g. an OCI .wh. file: do not clobber

    def _owner(self, parent: Node, uid: int, gid: int) -> tuple[int, int, bool]:
        """The new object's owner: the caller's, or the directory's group when setgid."""
        pst = self.fs.lstat(self.stack.upper_path(parent))
        if pst.st_mode & stat.S_ISGID:
            return uid, pst.st_gid, True
        return uid, gid, False

    @staticmethod
    def _made(node: Node) -> Node:
        """`node` was made new by this mount: it has no immutable/append-only record
        (UnionOperations._prot need not read one)."""
        node.prot = 0
        return node

    def _register(self, parent: Node, name: bytes, covers: bool) -> Node:
        stack = self.stack
        path = stack.upper_path(parent) + b"/" + name
        st = self.fs.lstat(path)
        kind = stat.S_IFMT(st.st_mode)
        dirs = [DirLayer(0, path, st.st_ino)] if kind == stat.S_IFDIR else None
        ino = stack.ino_for(0, st.st_ino)
        child = Entry(
            kind=kind,
            layer=0,
            path=path,
            ino=st.st_ino,
            dirs=dirs,
            trimmed=list(dirs) if dirs else None,
            node_ino=ino,
            covers=covers,
        )
        stack.set_entry(parent, name, child)
        node = stack.known(ino) or Node(
            ino, parent, name, kind, 0, b"", list(dirs) if dirs else None
        )
        node.parent, node.name = parent, name
        node.invalidate()
        if dirs is not None:
            node.listing, node.subdirs, node.impure = {}, 0, False
        return node

    # ----- creating ----------------------------------------------------------------------
    def create(
        self, parent: Node, name: bytes, mode: int, flags: int, uid: int, gid: int,
        acls: Inherited | None = None,
    ) -> tuple[Node, int]:  # fmt: skip
        path, wh = self._target(parent, name)
        uid, gid, _ = self._owner(parent, uid, gid)
        # O_DIRECT stays with the caller's file: the daemon writes from buffers that are not
        # aligned for it (EINVAL at the first WRITE: xfstests' O_DIRECT probe), as OPEN drops it
        dropped = os.O_APPEND | os.O_CREAT | os.O_EXCL | os.O_TRUNC | os.O_NOCTTY | _O_DIRECT
        oflags = (flags & ~dropped) | os.O_CLOEXEC
        dest = self.tmpname() if wh else path
        fd = self.fs.open(dest, oflags | os.O_CREAT | os.O_EXCL, stat.S_IMODE(mode))
        try:
            self._own_new_file(fd, uid, gid, mode, acls)
            if wh:
                self.fs.rename(dest, path)  # atomically replaces the whiteout
        except BaseException:
            os.close(fd)
            raise
        return self._made(self._register(parent, name, wh)), fd

    def _own_new_file(self, fd: int, uid: int, gid: int, mode: int, acls: Inherited | None
                      ) -> None:  # fmt: skip
        """Owner, mode and inherited ACLs of a file `create` or `tmpfile` just made."""
        os.fchown(fd, uid, gid)
        os.fchmod(fd, stat.S_IMODE(mode))
        if acls is not None:
            _set_acls(fd, acls, self.fs)

    def fill_metacopy(self, node: Node) -> None:
        """Copy the data of a metadata-only upper file (`Node.data`, metacopy=on) into it,
        before its first change, as the kernel's copy-up of a metacopy file does: the bytes
        go into the upper file itself, and `overlay.metacopy` is removed only once the data
        is on disk (fsynced, unless volatile), so a crash part way leaves a file that still
        reads its data from below.  Its mtime becomes the time of the copy, as on the kernel
        (ovl_copy_up_meta_inode_data sets no times back: an open for writing that writes
        nothing moves it there too; the differential test found the difference).  May run
        in a worker thread (data in a data-only layer is looked up before: open_data)."""
        src = node.data
        assert src is not None
        path = self.stack.upper_path(node)
        fs = self.fs
        # writing the data drops the file's capabilities (the VFS's killpriv, for every
        # writer): kept and set back after, as the kernel's ovl_copy_up_meta_inode_data does
        # (a `chmod` copied the file up by its metadata, then an open for writing lost them:
        # xfstests overlay/064)
        try:
            caps: bytes | None = fs.getxattr(path, _CAPS)
        except OSError:
            caps = None
        fin = fs.open(src, os.O_RDONLY)
        try:
            fd = fs.open(path, os.O_WRONLY)
            try:
                st = os.fstat(fd)
                fsutil.copy_ranges(fin, fd, min(st.st_size, os.fstat(fin).st_size))
                if caps is not None:
                    fs.setxattr(fd, _CAPS, caps)
                if self.sync_copies:
                    os.fsync(fd)
            finally:
                os.close(fd)
        finally:
            os.close(fin)
        for name in markers.METACOPY_XATTRS:
            try:
                fs.removexattr(path, name)
            except OSError as exc:
                if exc.errno not in (errno.ENODATA, errno.EOPNOTSUPP):
                    raise
        node.data = None
        node.invalidate()

    def tmpfile(
        self, parent: Node, mode: int, flags: int, uid: int, gid: int,
        acls: Inherited | None = None,
    ) -> tuple[Node, int]:  # fmt: skip
        """open(2) with O_TMPFILE in `parent`: a file with no name, in the parent's upper
        directory (copied up first), as kernel overlayfs makes it (ovl_tmpfile, Linux 6.6).
        linkat(2) can give it a name later (`link`, with its fd); closed without one, it is
        gone.  Returns its node (no name: `unlinked`) and the fd."""
        self.copy_up_dir(parent)
        uid, gid, _ = self._owner(parent, uid, gid)
        keep = os.O_ACCMODE | os.O_EXCL | os.O_SYNC | os.O_DSYNC | os.O_NOATIME
        fd = self.fs.open(self.stack.upper_path(parent), (flags & keep) | os.O_TMPFILE,
                          stat.S_IMODE(mode))  # fmt: skip
        try:
            self._own_new_file(fd, uid, gid, mode, acls)
            st = os.fstat(fd)
        except BaseException:
            os.close(fd)
            raise
        node = self._made(
            Node(self.stack.ino_for(0, st.st_ino), parent, b"", stat.S_IFREG, 0, b"", None)
        )
        node.unlinked = True  # reached only through its fd (UnionOperations._gone_fd)
        return node, fd

    def make(
        self,
        parent: Node,
        name: bytes,
        kind: int,
        mode: int,
        uid: int,
        gid: int,
        rdev: int = 0,
        target: bytes = b"",
        acls: Inherited | None = None,
    ) -> Node:
        """mknod, mkdir and symlink.  A directory made over a whiteout is opaque, and so is
        one made in a merged directory where lower layers may not change offline
        (redirect_dir=on, index=on or metacopy=on), as the kernel's ovl_create_upper marks
        it ("just an optimization": nothing lies below it; a commit leaves the mark out)."""
        path, wh = self._target(parent, name)
        uid, gid, sgid = self._owner(parent, uid, gid)
        perm = stat.S_IMODE(mode)
        # Made in place, as the kernel's ovl_create_upper makes it, so that it gets what the
        # upper filesystem gives a new child of that directory (inherited inode flags:
        # chattr +C, +S, +D, DAX, a project id); over a whiteout, in the work dir, then
        # exchanged or renamed into place (ovl_create_over_whiteout).  As for `create`, the
        # object is the daemon's, mode 0700/0600, until its owner and mode are set; one
        # that fails half-made is removed again.
        at = self.tmpname() if wh else path
        if kind == stat.S_IFDIR:
            self.fs.mkdir(at, 0o700)
            if sgid:
                perm |= stat.S_ISGID
            if wh:
                markers.set_opaque(at, self.fs)
            elif parent.has_lower and self._no_offline_changes:
                try:
                    markers.set_opaque(at, self.fs)
                except OSError:
                    pass  # as on the kernel: allowed to fail
        elif kind == stat.S_IFLNK:
            self.fs.symlink(target, at)
        else:
            self.fs.mknod(at, kind | 0o600, rdev)
        try:
            self.fs.chown(at, uid, gid)
            if kind != stat.S_IFLNK:
                self.fs.chmod(at, perm)
                if acls is not None:  # the caller's, over any the upper gave it
                    _set_acls(at, acls, self.fs)
        except BaseException:
            if not wh:
                self._unmake(path, kind)
            raise
        if kind == stat.S_IFDIR and wh:
            self.fs.renameat2(at, path, fsutil.RENAME_EXCHANGE)
            self.fs.unlink(at)  # the whiteout, now in the work dir
        elif wh:
            self.fs.rename(at, path)
        return self._made(self._register(parent, name, wh))

    def _unmake(self, path: bytes, kind: int) -> None:
        """Remove what `make` left half-made in place (best effort: the error that stopped
        it is the one reported)."""
        try:
            if kind == stat.S_IFDIR:
                self.fs.rmdir(path)
            else:
                self.fs.unlink(path)
        except OSError as exc:
            log.warning("could not remove half-made %r: %s", path, exc)

    def link(self, node: Node, parent: Node, name: bytes, fd: int | None = None) -> Node:
        """Hard link (the caller has copied `node` up).  `fd`: for a node with no name left
        (an O_TMPFILE file: `tmpfile`), an fd open on it, which the link is made from."""
        path, wh = self._target(parent, name)
        if fd is None and self._has_origin(node):
            self._mark_impure(parent)
        if fd is None and node.data is not None:
            # a metacopy file's other name finds its data by an absolute redirect, as the
            # kernel's ovl_set_link_redirect gives it (on the inode: every name has it)
            self._set_redirect(node, samedir=False)
        dest = self.tmpname() if wh else path
        if fd is None:
            self.fs.link(self.stack.upper_path(node), dest)
        else:
            self.fs.link_fd(fd, dest)
        if wh:
            self.fs.rename(dest, path)  # atomically replaces the whiteout
        if fd is None:
            self.stack.add_alias(node, node.parent, node.name)  # type: ignore[arg-type]
        self._register(parent, name, wh)
        self.stack.add_alias(node, parent, name)
        if fd is not None:  # it had no name: this one is its name now
            node.unlinked = False
            node.parent, node.name = parent, name
        node.invalidate()
        return node

    # ----- removing ----------------------------------------------------------------------
    def unlink(self, parent: Node, name: bytes) -> Node | None:
        child = self.stack.listing(parent).get(name)
        if child is None:
            raise NotFound()
        if child.dirs is not None:
            raise UnionError("is a directory", errno.EISDIR)
        node = self.stack.known(child.node_ino) if child.node_ino else None
        links = 1
        if node is not None and self.stack.in_upper(node):  # other names we may not know
            links = _nlink(self.fs, self.stack.upper_path(parent) + b"/" + name)
        self._remove(parent, name, child, is_dir=False)
        if node is not None:
            self._drop_name(node, parent, name, links > 1)
        return node

    def rmdir(self, parent: Node, name: bytes) -> Node:
        stack = self.stack
        child = stack.listing(parent).get(name)
        if child is None:
            raise NotFound()
        if child.dirs is None:
            raise UnionError("not a directory", errno.ENOTDIR)
        node = stack.node_for(parent, name, child)
        if stack.listing(node):
            raise NotEmpty()
        gone = self.fs.lstat(stack.upper_path(node)) if stack.in_upper(node) else None
        self._remove(parent, name, child, is_dir=True)
        node.unlinked = node.deleted = True
        self._dead_dir(node, gone)
        return node

    def _remove(self, parent: Node, name: bytes, child: Entry, is_dir: bool) -> None:
        stack = self.stack
        whiteout = stack.lower_has(parent, name)
        self.copy_up_dir(parent)
        path = stack.upper_path(parent) + b"/" + name
        if child.layer == 0:
            if whiteout:
                tmp = self.tmpname()
                self._whiteout(tmp)
                if is_dir:
                    self.fs.renameat2(tmp, path, fsutil.RENAME_EXCHANGE)
                    self._purge(tmp)
                else:
                    self.fs.rename(tmp, path)
            elif is_dir:
                tmp = self.tmpname()
                self.fs.rename(path, tmp)
                self._purge(tmp)
            else:
                self.fs.unlink(path)
        else:
            self._whiteout(path)
        stack.drop_entry(parent, name)

    @staticmethod
    def _dead_dir(node: Node, st: os.stat_result | None) -> None:
        """An upper directory was removed (rmdir, or renamed over) while the kernel may still
        hold it open or as a cwd: keep what its fstat shows from now on (the kernel's fstat
        of an overlay directory whose upper one is gone: its last attributes, no link);
        its name may already hold another directory, never to be stat'ed for it."""
        if st is None:
            return
        node.invalidate()
        fields = list(st[:10])
        fields[3] = 0  # st_nlink
        extra = ("st_atime_ns", "st_mtime_ns", "st_ctime_ns", "st_blksize", "st_blocks", "st_rdev")
        node.st = os.stat_result(fields, {name: getattr(st, name) for name in extra})

    def _purge(self, path: bytes) -> None:
        """Remove a logically empty directory that may still hold whiteouts."""
        self.fs.rmtree(path)

    def _drop_name(self, node: Node, parent: Node, name: bytes, linked: bool) -> None:
        """`parent/name` no longer names `node`; it lives on if another name is known.
        `linked`: the real file still has other links (whether or not we know them)."""
        if not self.stack.forget_alias(node, parent, name):
            node.unlinked = True
            node.deleted = not linked
        node.invalidate()

    # ----- renaming ----------------------------------------------------------------------
    def rename(
        self, parent: Node, name: bytes, newparent: Node, newname: bytes, flags: int
    ) -> tuple[Node, Node | None]:
        """rename(2) with RENAME_NOREPLACE / RENAME_EXCHANGE.  The caller has copied up the
        non-directories involved.  Returns (moved node, replaced node or None)."""
        stack = self.stack
        self._redirects = None  # a directory may move, with redirects below it
        if len(newname) > stack.namemax:
            raise NameTooLong()
        src = stack.listing(parent).get(name)
        if src is None:
            raise NotFound()
        dst = stack.listing(newparent).get(newname)
        if dst is not None and flags & fsutil.RENAME_NOREPLACE:
            raise Exists()
        if flags & fsutil.RENAME_EXCHANGE:
            if dst is None:
                raise NotFound()
            return self._exchange(parent, name, src, newparent, newname, dst)
        node = stack.node_for(parent, name, src)
        old = stack.node_for(newparent, newname, dst) if dst is not None else None
        if old is node:
            return node, None
        if old is not None:
            self._check_replace(node, old)
        self._check_movable(node)
        self._prepare_move(node, newparent, newname)
        whiteout = stack.lower_has(parent, name)
        covers = stack.lower_has(newparent, newname)
        self.copy_up_dir(newparent)
        if newparent is not parent and self._has_origin(node):
            self._mark_impure(newparent)  # as the kernel's ovl_rename
        spath = stack.upper_path(parent) + b"/" + name
        dpath = stack.upper_path(newparent) + b"/" + newname
        old_links = _nlink(self.fs, dpath) if old is not None and not old.is_dir else 0
        gone = (
            self.fs.lstat(dpath) if old is not None and old.is_dir and stack.in_upper(old) else None
        )
        self._clear_target(dst, dpath, node.is_dir)
        if whiteout:
            try:
                self.fs.renameat2(spath, dpath, fsutil.RENAME_WHITEOUT)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                self.fs.rename(spath, dpath)
                self._whiteout(spath)
        else:
            self.fs.rename(spath, dpath)
        stack.drop_entry(parent, name)
        self._place(node, newparent, newname, covers)
        if old is not None:
            named = self.stack.forget_alias(old, newparent, newname)
            # a hard-linked file renamed over whose other names were never looked up keeps
            # no name we know: its node must not go on naming what now has this one
            old.unlinked = old.is_dir or old_links <= 1 or not stack.in_upper(old) or not named
            old.deleted = old.is_dir or old_links <= 1
            old.invalidate()
            self._dead_dir(old, gone)
        return node, old

    def _check_replace(self, node: Node, old: Node) -> None:
        if node.is_dir and not old.is_dir:
            raise UnionError("not a directory", errno.ENOTDIR)
        if not node.is_dir and old.is_dir:
            raise UnionError("is a directory", errno.EISDIR)
        if old.is_dir and self.stack.listing(old):
            raise NotEmpty()

    def _check_movable(self, node: Node) -> None:
        """Without redirects a directory with lower parts cannot move (overlayfs
        `ovl_can_move`): EXDEV, so that mv(1) falls back to copying."""
        if node.is_dir and node.has_lower and not self.create_redirects:
            raise UnionError(
                "a directory with lower parts cannot move without redirect_dir=on", errno.EXDEV
            )

    def _prepare_move(self, node: Node, newparent: Node, newname: bytes) -> None:
        """Copy a moving directory up and mark it so its lower part follows it (redirect),
        or so a lower directory at the destination does not merge into it (opaque).  A
        metacopy file (copied up by the caller) gets a redirect to its data, as the kernel
        gives one to a file whose data is still below."""
        stack = self.stack
        samedir = newparent is node.parent
        if not node.is_dir:
            if node.data is not None and stack.in_upper(node):
                self._set_redirect(node, samedir)
            return
        if node.has_lower:
            self._set_redirect(node, samedir)
        else:
            self.copy_up_dir(node)
            if stack.lower_has(newparent, newname):
                markers.set_opaque(stack.upper_path(node), self.fs)

    def _set_redirect(self, node: Node, samedir: bool) -> None:
        """Before `node` (a directory with lower parts, or a metacopy file) moves or gets
        another name: record where its lower part lives, as the kernel's ovl_set_redirect.
        Within one directory the redirect is relative (the name the lower part has there),
        across directories absolute; a relative one already present becomes absolute when
        the object leaves its parent, an absolute one stays."""
        stack = self.stack
        if node.is_dir:
            # (its copy and its ancestors' carry no redirect yet: the walk below is the same)
            self.copy_up_dir(node)
        current = stack.redirect_of(node)
        # a file whose lower file has other links gets an absolute one in any case (the
        # kernel's ovl_need_absolute_redirect: its names may end up in other directories)
        relative = samedir and (node.is_dir or self._lower_nlink(node) <= 1)
        if current is not None and (relative or current.startswith(b"/")):
            return
        redirect = node.name if relative else stack.origin_path(node)
        markers.set_redirect(stack.upper_path(node), redirect, self.fs)

    def _lower_nlink(self, node: Node) -> int:
        """The link count of a metacopy file's lower file: the one it was copied up from
        (`Node.lower_path`), or for one found in the upper the file holding its data."""
        path = node.lower_path
        if path.startswith(self.stack.layers[0] + b"/") or not path:
            path = node.data or b""
        try:
            return self.fs.lstat(path).st_nlink
        except OSError:
            return 1

    def _clear_target(self, dst: Entry | None, dpath: bytes, moving_dir: bool) -> None:
        """Make room at the destination for rename(2): an upper directory there (logically
        empty, maybe holding whiteouts) goes to the work dir; a whiteout under a directory
        that moves in is removed (rename cannot put a directory over a device)."""
        try:
            st = self.fs.lstat(dpath)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            tmp = self.tmpname()
            self.fs.rename(dpath, tmp)
            self._purge(tmp)
        elif moving_dir:
            self.fs.unlink(dpath)

    def _place(self, node: Node, newparent: Node, newname: bytes, covers: bool) -> None:
        stack = self.stack
        dpath = stack.upper_path(newparent) + b"/" + newname
        st = self.fs.lstat(dpath)
        dirs = node.dirs
        child = Entry(
            kind=node.kind,
            layer=0,
            path=dpath,
            ino=st.st_ino,
            dirs=list(dirs) if dirs else None,
            trimmed=list(dirs) if dirs else None,
            node_ino=node.ino,
            covers=covers,
        )
        stack.set_entry(newparent, newname, child)
        node.parent, node.name = newparent, newname
        node.invalidate()

    def _exchange(
        self, parent: Node, name: bytes, src: Entry, newparent: Node, newname: bytes, dst: Entry
    ) -> tuple[Node, Node | None]:
        stack = self.stack
        a = stack.node_for(parent, name, src)
        b = stack.node_for(newparent, newname, dst)
        self._check_movable(a)
        self._check_movable(b)
        self._prepare_move(a, newparent, newname)
        self._prepare_move(b, parent, name)
        self.copy_up_dir(parent)
        self.copy_up_dir(newparent)
        if newparent is not parent:
            if self._has_origin(a):
                self._mark_impure(newparent)
            if self._has_origin(b):
                self._mark_impure(parent)
        apath = stack.upper_path(parent) + b"/" + name
        bpath = stack.upper_path(newparent) + b"/" + newname
        self.fs.renameat2(apath, bpath, fsutil.RENAME_EXCHANGE)
        cov_a, cov_b = stack.lower_has(parent, name), stack.lower_has(newparent, newname)
        stack.drop_entry(parent, name)
        stack.drop_entry(newparent, newname)
        self._place(a, newparent, newname, cov_b)
        self._place(b, parent, name, cov_a)
        return a, b


def _nlink(fs: Roots, path: bytes) -> int:
    try:
        return fs.lstat(path).st_nlink
    except FileNotFoundError:
        return 0


def _set_acls(target: bytes | int, acls: Inherited, fs: Roots) -> None:
    """Store what a create inherits (acl.py) on the new object, a path or an open fd: after
    the chmod, since setting an access ACL sets the group bits to its mask."""
    for name, value in ((ACL_ACCESS, acls.access), (ACL_DEFAULT, acls.default)):
        if value is not None:
            fs.setxattr(target, name, value)
