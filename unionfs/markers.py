"""Whiteouts and opaque directories: the one module that knows how they are encoded.

Reading accepts every encoding found in the wild, so layers made by other tools mount:
  - whiteout: a character device 0/0 (kernel overlayfs, fuse-overlayfs); an OCI `.wh.NAME`
    file; a zero-size regular file with the `overlay.whiteout` xattr, honoured only inside a
    directory marked `overlay.opaque=x` (the kernel's rule, which spares an xattr read per file);
  - opaque directory: `overlay.opaque=y` (trusted. or user., see below),
    `user.fuseoverlayfs.opaque=y`, or an OCI `.wh..wh..opq` file inside it.
A moved directory carries `overlay.redirect` (the kernel's redirect_dir format): the path,
from the root, where its lower part lives.
Writing: this module is also the one place that writes markers (`make_whiteout`,
`set_opaque`, `set_redirect`, and the OCI names `oci_whiteout_name`/`oci_whiteout_path`/
`oci_opaque_path`): the daemon, the tar applier, the changeset and the demo all go through it.
The write side uses the kernel-overlayfs format only; tar layers carry the OCI names.
Internal xattrs are never shown to users as they are: `shown_xattr` is the single filter,
and `real_xattr` its inverse (a user's own `overlay.X` is kept escaped, `overlay.overlay.X`,
as kernel overlayfs keeps it for an overlay stacked on this one: Linux 6.7).
Which namespace markers are written in: `trusted.overlay.*` where this process may set
trusted xattrs (CAP_SYS_ADMIN in the host's user namespace), else `user.overlay.*`, as the
kernel's `userxattr` option.  Root of a user namespace (rootless podman runs its
mount_program so) is uid 0 without that right: `probe_trusted` asks the work dir once per
mount (`trusted`); until then uid 0 counts as able.  Otherwise pure functions.
xattrs are read through a `fsat.Roots` (the daemon's layer-root fds; `fsat.PLAIN` for plain
paths), so markers deeper than PATH_MAX are read too.
"""

from __future__ import annotations

import errno
import os
import stat

from .fsat import PLAIN, Roots

WH_PREFIX = b".wh."
WH_OPAQUE = b".wh..wh..opq"
AUFS_META_PREFIX = b".wh..wh."  # AUFS bookkeeping (`.wh..wh.plnk`, …) in old Docker layers

OVERLAY_PREFIXES: tuple[bytes, ...] = (b"trusted.overlay.", b"user.overlay.")
OWN_PREFIXES = (b"trusted.layerfs.", b"user.layerfs.")
FUSEOVERLAYFS_OPAQUE = b"user.fuseoverlayfs.opaque"
OPAQUE_XATTRS: tuple[bytes, ...] = (
    b"trusted.overlay.opaque",
    b"user.overlay.opaque",
    FUSEOVERLAYFS_OPAQUE,
)
WHITEOUT_XATTRS: tuple[bytes, ...] = (b"trusted.overlay.whiteout", b"user.overlay.whiteout")
REDIRECT_XATTRS: tuple[bytes, ...] = (b"trusted.overlay.redirect", b"user.overlay.redirect")
# a metadata-only copy-up (kernel overlayfs with metacopy=on): the file's data is still in a
# lower layer; the upper file holds only its metadata, its bytes a hole of the right size
METACOPY_XATTRS: tuple[bytes, ...] = (b"trusted.overlay.metacopy", b"user.overlay.metacopy")
# immutable ("i") and append-only ("a") of an upper object, kept here rather than on the real
# object, as the kernel keeps them since Linux 5.13 (fileattr.py)
PROTATTR_XATTRS: tuple[bytes, ...] = (b"trusted.overlay.protattr", b"user.overlay.protattr")


_INTERNAL_PREFIXES: tuple[bytes, ...] = (*OVERLAY_PREFIXES, *OWN_PREFIXES, b"user.fuseoverlayfs.")


def is_internal_xattr(name: bytes) -> bool:
    """True for real xattrs in the overlay and layerfs namespaces: union state, never shown
    as they are (`shown_xattr`), and left out of committed layers."""
    return name.startswith(_INTERNAL_PREFIXES)


# Overlayfs's escape for nesting (Linux 6.7): a user's `trusted.overlay.X` (an overlay
# mounted on top of this one keeps its state there) is stored as `trusted.overlay.overlay.X`,
# which this mount does not read as its own state, and shown unescaped again.
_ESCAPE = b"overlay."


def real_xattr(name: bytes) -> bytes | None:
    """The real name under which a user's xattr `name` is kept: overlay names escaped (one
    more `overlay.`), others as they are; None for names a user may not touch (layerfs's own,
    fuse-overlayfs's)."""
    if not name.startswith(_INTERNAL_PREFIXES):  # nearly every name: one call
        return name
    for prefix in OVERLAY_PREFIXES:
        if name.startswith(prefix):
            return prefix + _ESCAPE + name[len(prefix) :]
    return None  # layerfs's own, fuse-overlayfs's


def shown_xattr(real: bytes) -> bytes | None:
    """The name users see for the real xattr `real` (`real_xattr` undone); None for union
    state, which is never shown."""
    if not real.startswith(_INTERNAL_PREFIXES):
        return real
    for prefix in OVERLAY_PREFIXES:
        if real.startswith(prefix):
            rest = real[len(prefix) :]
            return prefix + rest[len(_ESCAPE) :] if rest.startswith(_ESCAPE) else None
    return None


def is_private_xattr(real: bytes) -> bool:
    """Union state of the object (not a user's escaped overlay xattr): a copy-up leaves it
    behind, as the kernel's ovl_copy_xattr leaves its private xattrs."""
    return shown_xattr(real) is None


def oci_whiteout_target(name: bytes) -> bytes | None:
    """`.wh.foo` → `foo`; None for ordinary names and for the opaque marker."""
    if name.startswith(WH_PREFIX) and name != WH_OPAQUE and len(name) > len(WH_PREFIX):
        return name[len(WH_PREFIX) :]
    return None


def oci_whiteout_name(name: bytes) -> bytes:
    """`foo` → `.wh.foo`: the OCI whiteout of `name` (a name in the same directory)."""
    return WH_PREFIX + name


def oci_whiteout_path(path: bytes) -> bytes:
    """`a/b/foo` → `a/b/.wh.foo`: the OCI whiteout entry of a relative path."""
    head, _, base = path.rpartition(b"/")
    return head + b"/" + oci_whiteout_name(base) if head else oci_whiteout_name(base)


def oci_opaque_path(dirpath: bytes) -> bytes:
    """`a/b` → `a/b/.wh..wh..opq`: the OCI marker making directory `dirpath` opaque."""
    return dirpath + b"/" + WH_OPAQUE


WHITEOUT_MODE = stat.S_IFCHR | 0o000
WHITEOUT_DEV = 0  # os.makedev(0, 0)


def make_whiteout(path: bytes, fs: Roots = PLAIN) -> None:
    """A kernel-format whiteout at `path`: a character device 0/0 (unprivileged since 5.8)."""
    fs.mknod(path, WHITEOUT_MODE, WHITEOUT_DEV)


def make_whiteout_at(dir_fd: int, name: bytes) -> None:
    """`make_whiteout` of `name` in the directory open as `dir_fd` (the tar applier's walk)."""
    os.mknod(name, WHITEOUT_MODE, WHITEOUT_DEV, dir_fd=dir_fd)


def set_opaque(path: bytes, fs: Roots = PLAIN) -> None:
    """Mark directory `path` opaque (`overlay.opaque=y`, trusted. as root, user. otherwise)."""
    fs.setxattr(path, opaque_xattr(), b"y")


def set_opaque_fd(fd: int) -> None:
    """`set_opaque` of the directory open as `fd`."""
    os.setxattr(fd, opaque_xattr(), b"y")


def set_redirect(path: bytes, target: bytes, fs: Roots = PLAIN) -> None:
    """Record where moved directory `path`'s lower part lives (`overlay.redirect`, the
    kernel's format: an absolute path from the root, or the old name in the same directory)."""
    fs.setxattr(path, redirect_xattr(), target)


def is_chardev_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def _getxattr(fs: Roots, path: bytes | int, name: bytes) -> bytes | None:
    try:
        return fs.getxattr(path, name)
    except OSError as exc:
        if exc.errno in (errno.ENODATA, errno.ENOTSUP, errno.EPERM, errno.EACCES):
            return None
        raise


class DirMarks:
    """What a real directory says about itself: opaque, and whether it holds xattr whiteouts."""

    __slots__ = ("opaque", "xwhiteouts", "redirect")

    def __init__(self, opaque: bool, xwhiteouts: bool, redirect: bytes | None = None) -> None:
        self.opaque = opaque
        self.xwhiteouts = xwhiteouts
        self.redirect = redirect


def dir_marks(path: bytes, fs: Roots = PLAIN) -> DirMarks:
    """Read a directory's opaque markers (one listxattr, plus a getxattr per marker present)."""
    try:
        names = fs.listxattr(path)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EACCES, errno.EPERM):
            return DirMarks(False, False)
        raise
    opaque = xwh = False
    redirect = None
    for raw in names:
        name = os.fsencode(raw)
        if name in REDIRECT_XATTRS:
            redirect = _getxattr(fs, path, name)
        if name in OPAQUE_XATTRS:
            value = _getxattr(fs, path, name)
            if value is None:
                continue
            value = value.rstrip(b"\0")
            if value == b"y":
                opaque = True
            elif value == b"x":
                xwh = True
    return DirMarks(opaque, xwh, redirect)


def is_xattr_whiteout(path: bytes, st: os.stat_result, fs: Roots = PLAIN) -> bool:
    """A zero-size regular file carrying `overlay.whiteout` (only asked inside opaque=x dirs)."""
    if not stat.S_ISREG(st.st_mode) or st.st_size != 0:
        return False
    return any(_getxattr(fs, path, name) is not None for name in WHITEOUT_XATTRS)


_FS_IMMUTABLE_FL, _FS_APPEND_FL = 0x10, 0x20  # fileattr.py's (not imported: no cycle)


def protattr(path: bytes | int, fs: Roots = PLAIN) -> int:
    """The immutable/append-only flags (FS_IMMUTABLE_FL, FS_APPEND_FL) an upper object's
    `overlay.protattr` holds: 0 without one.  A value of another format counts as none, as
    the kernel warns and ignores it (ovl_check_protattr)."""
    for name in PROTATTR_XATTRS:
        value = _getxattr(fs, path, name)
        if value is None:
            continue
        flags = 0
        for ch in value:
            if ch == ord("a"):
                flags |= _FS_APPEND_FL
            elif ch == ord("i"):
                flags |= _FS_IMMUTABLE_FL
            else:
                return 0
        return flags
    return 0


def set_protattr(target: bytes | int, flags: int, fs: Roots = PLAIN) -> None:
    """Record immutable/append-only `flags` of an upper object (a path or an fd) in the
    kernel's format ("a" then "i"), or remove the record when neither is set."""
    value = (b"a" if flags & _FS_APPEND_FL else b"") + (b"i" if flags & _FS_IMMUTABLE_FL else b"")
    name = _name(b"protattr")
    if value:
        fs.setxattr(target, name, value)
        return
    try:
        fs.removexattr(target, name)
    except OSError as exc:
        if exc.errno not in (errno.ENODATA, errno.ENOTSUP):
            raise


_trusted: bool | None = None  # `probe_trusted`'s answer; None: not asked
_user_only = False  # `use_user_xattrs`


def trusted() -> bool:
    """Does this process keep overlay state in trusted.* xattrs (where kernel overlayfs
    mounted by root reads it)?  Not without the right to set them, nor with `userxattr`."""
    return not _user_only and privileged()


def privileged() -> bool:
    """May this process set trusted.* xattrs (CAP_SYS_ADMIN in the host's namespace, which
    FUSE passthrough needs too)?"""
    if os.geteuid() != 0:  # asked again: a process may drop to a user after the probe
        return False
    return _trusted is not False


def use_user_xattrs() -> None:
    """The kernel's `userxattr`, for this process's mount, also as root: overlay state is
    written and read in user.overlay.* only, and a `trusted.overlay.*` xattr is a user's own,
    kept and shown as it is (not escaped), as that kernel mount leaves it.  Called once,
    before the layers are read (the daemon serves one mount)."""
    global _user_only, OVERLAY_PREFIXES, OPAQUE_XATTRS, WHITEOUT_XATTRS, REDIRECT_XATTRS
    global METACOPY_XATTRS, PROTATTR_XATTRS, _INTERNAL_PREFIXES
    _user_only = True
    OVERLAY_PREFIXES = (b"user.overlay.",)
    OPAQUE_XATTRS = (b"user.overlay.opaque", FUSEOVERLAYFS_OPAQUE)
    WHITEOUT_XATTRS = (b"user.overlay.whiteout",)
    REDIRECT_XATTRS = (b"user.overlay.redirect",)
    METACOPY_XATTRS = (b"user.overlay.metacopy",)
    PROTATTR_XATTRS = (b"user.overlay.protattr",)
    _INTERNAL_PREFIXES = (*OVERLAY_PREFIXES, *OWN_PREFIXES, b"user.fuseoverlayfs.")


def probe_trusted(directory: bytes | int, fs: Roots = PLAIN) -> bool:
    """Ask once, on a directory (a path or an fd) of the filesystem markers go to (the work
    dir; the store's layer being unpacked), whether a trusted xattr can be set there: EPERM
    is a process without CAP_SYS_ADMIN in the host's user namespace (uid 0 of a user
    namespace, a container without that capability), whose markers then go to
    user.overlay.*.  A filesystem without xattrs decides nothing."""
    global _trusted
    if os.geteuid() != 0:
        _trusted = False
        return False
    name = b"trusted.layerfs.probe"
    try:
        fs.setxattr(directory, name, b"")
        fs.removexattr(directory, name)
        _trusted = True
    except OSError as exc:
        if exc.errno in (errno.EPERM, errno.EACCES):
            _trusted = False
    return trusted()


def _name(marker: bytes) -> bytes:
    return (b"trusted.overlay." if trusted() else b"user.overlay.") + marker


def opaque_xattr() -> bytes:
    """The opaque marker this process writes (`trusted`)."""
    return _name(b"opaque")


def redirect_xattr() -> bytes:
    return _name(b"redirect")


def set_metacopy(target: bytes | int, fs: Roots = PLAIN) -> None:
    """Mark upper file `target` (a path or an fd) as holding only its metadata, its data
    still in the lower file (`overlay.metacopy`, empty: the kernel's form without fs-verity
    digest)."""
    fs.setxattr(target, _name(b"metacopy"), b"")


def init_uuid(upper_root: bytes, mode: str, fs: Roots = PLAIN) -> None:
    """The upper's persistent overlay uuid (`overlay.uuid`, 16 bytes on its root), as the
    kernel's ovl_init_uuid_xattr at every writable mount (Linux 6.6+): kept when there;
    with `uuid=on` written when absent; with `uuid=auto` (the kernel's default) written only
    on a new overlay, whose root is not yet marked impure (an old overlay stays without,
    which the kernel then mounts as uuid=null); with `off` and `null` never.  The kernel
    uses it as the overlay's s_uuid and f_fsid, which FUSE does not report: it is written
    so that the upper is the one kernel overlayfs would have left.  A filesystem without
    xattrs, or one that refuses this one, falls back to none, as the kernel (a warning)."""
    if mode not in ("auto", "on"):
        return
    try:
        fs.getxattr(upper_root, _name(b"uuid"))
        return  # kept (one of another size: left alone, as the kernel, which then uses none)
    except OSError as exc:
        if exc.errno != errno.ENODATA:
            return
    if mode == "auto":
        try:
            fs.getxattr(upper_root, _name(b"impure"))
            return  # an old overlay
        except OSError as exc:
            if exc.errno != errno.ENODATA:
                return
    try:
        fs.setxattr(upper_root, _name(b"uuid"), os.urandom(16))
    except OSError:
        pass


def set_impure(path: bytes, fs: Roots = PLAIN) -> None:
    """Mark upper directory `path` as holding objects whose inode numbers are not their own
    (`overlay.impure` = "y", the kernel's ovl_set_impure): copied up, or merged directories
    moved in.  Kernel overlayfs, reading such a directory, reports those entries' d_ino as
    their st_ino; in an unmarked one it reports the upper's own numbers.  A marker already
    there is left alone (nor is the directory's ctime touched); an upper without xattrs
    gets none, as on the kernel."""
    name = _name(b"impure")
    try:
        fs.setxattr(path, name, b"y", os.XATTR_CREATE)
    except OSError as exc:
        if exc.errno not in (errno.EEXIST, errno.ENOTSUP):
            raise
